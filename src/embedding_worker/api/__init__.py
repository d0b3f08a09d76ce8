"""The transports: the HTTP app, the RunPod handler, their middleware and the BentoML batchable
adapters. Each parses, calls the core and serialises; none holds logic of its own."""
