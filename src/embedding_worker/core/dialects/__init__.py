"""API dialects beside OpenAI's: each turns its bodies into calls of the endpoint families and
their results into its own shapes. (Jina's fields live on OpenAI's `/v1/embeddings` itself.)"""
