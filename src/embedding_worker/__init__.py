"""infinity-embedding-worker: OpenAI-compatible embeddings and reranking over Infinity engines."""

__version__ = "0.1.0"
