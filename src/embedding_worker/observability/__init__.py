"""Logs, metrics and tracing: beside the core, used by every layer, knowing none of them."""
