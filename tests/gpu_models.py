"""BERT embedders of any shape with random weights, for the GPU checks (tests/test_gpu.py and the
throughput harness of bench/gpu-check): real loading code, real compute, meaningless vectors."""

from __future__ import annotations

from pathlib import Path

from embedding_worker.config import bundled_model_path


def make_bert(path: Path, *, layers: int, hidden: int, heads: int, intermediate: int,
              window: int = 512, seed: int = 0) -> Path:
    """A BERT in sentence-transformers layout (mean pooling + normalise) with the bundled model's
    tokenizer (bert-base-uncased's vocabulary) and a `window`-token input."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    raw = path / "raw"
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max(512, window))
    BertModel(config).save_pretrained(raw)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=window)
    st = SentenceTransformer(modules=[transformer, models.Pooling(hidden, "mean"), models.Normalize()],
                             device="cpu")
    st.save(str(path))
    return path

