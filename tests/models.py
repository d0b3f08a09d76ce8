"""Tiny random-weight models generated on disk for the tests (no hub, real loading code)."""

from __future__ import annotations

from pathlib import Path

from embedding_worker.config import bundled_model_path

HIDDEN = 32


def _tiny_bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        **extra,
    )


def make_tiny_embedder(path: Path) -> Path:
    """A BERT embedder in sentence-transformers layout (mean pooling + normalise)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(0)
    raw = path / "raw"
    BertModel(_tiny_bert_config()).save_pretrained(raw)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=128)
    st = SentenceTransformer(
        modules=[transformer, models.Pooling(HIDDEN, "mean"), models.Normalize()], device="cpu"
    )
    st.save(str(path))
    return path


def make_tiny_reranker(path: Path) -> Path:
    """A BERT cross-encoder with one output label (infinity serves it as a reranker)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(1)
    config = _tiny_bert_config(num_labels=1, architectures=["BertForSequenceClassification"])
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # spread the scores so the order is well defined
        model.classifier.weight.mul_(40)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    return path
