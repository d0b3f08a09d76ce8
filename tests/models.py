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
        **{"max_position_embeddings": 512, **extra},
    )


def make_tiny_embedder(path: Path, *, positions: int = 512, seed: int = 0, window: int = 128,
                       prompts: dict[str, str] | None = None,
                       default_prompt_name: str | None = None, normalize: bool = True,
                       pooling: str = "mean") -> Path:
    """A BERT embedder in sentence-transformers layout (`pooling`, mean by default, + normalise
    unless not `normalize`), 128 tokens; `prompts` go into its config_sentence_transformers.json."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    raw = path / "raw"
    BertModel(_tiny_bert_config(max_position_embeddings=positions)).save_pretrained(raw)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=window)
    modules = [transformer, models.Pooling(HIDDEN, pooling), *([models.Normalize()] if normalize else [])]
    st = SentenceTransformer(
        modules=modules, device="cpu",
        prompts=prompts, default_prompt_name=default_prompt_name,
    )
    st.save(str(path))
    return path


def make_bf16_fragile_embedder(path: Path) -> Path:
    """A tiny embedder whose numbers bf16 cannot keep (fp32 keeps them): its last layer's output
    is a difference of two equal activations weighted 1000 and -(1000 - d), |d| < 2. In fp32 the
    difference d * g survives; bf16 rounds -(1000 - d) to -1000 (its step there is 4) and the
    signal, which dominates the layer's output, cancels to nothing."""
    import torch
    from sentence_transformers import SentenceTransformer

    make_tiny_embedder(path, seed=5)
    st = SentenceTransformer(str(path), device="cpu")
    layer = st[0].auto_model.encoder.layer[-1]
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        up, down = layer.intermediate.dense, layer.output.dense
        up.weight[1::2], up.bias[1::2] = up.weight[0::2], up.bias[0::2]  # equal pairs
        sign = torch.randint(0, 2, (down.weight.shape[0], down.weight.shape[1] // 2),
                             generator=rng) * 2 - 1.0
        d = torch.rand(sign.shape, generator=rng) * 3.6 - 1.8
        down.weight[:, 0::2], down.weight[:, 1::2] = 1000 * sign, -1000 * sign + d
    st.save(str(path))
    return path


def make_faulty_embedder(path: Path) -> Path:
    """A broken model, as found in the wild: its sentence-transformers config claims 128 tokens
    but the BERT has position embeddings for 16, so the forward pass raises on any text longer
    than 16 tokens (and works on shorter ones)."""
    return make_tiny_embedder(path, positions=16, seed=2)


def make_faulty_reranker(path: Path) -> Path:
    """The same fault for a cross-encoder: the tokenizer allows 512 tokens, the BERT has
    positions for 16, so a (query, document) pair longer than that raises."""
    return make_tiny_reranker(path, positions=16)


def make_tiny_reranker(path: Path, *, positions: int = 512) -> Path:
    """A BERT cross-encoder with one output label (infinity serves it as a reranker)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(1)
    config = _tiny_bert_config(num_labels=1, architectures=["BertForSequenceClassification"],
                               max_position_embeddings=positions)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # spread the scores so the order is well defined
        model.classifier.weight.mul_(40)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    return path


def make_tiny_classifier(path: Path, *, positions: int = 512) -> Path:
    """A BERT sequence classifier with three named labels (infinity serves it as a classifier);
    `positions` below the tokenizer's 512 make it fail on longer texts, as make_faulty_embedder."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(3)
    labels = ["negative", "neutral", "positive"]
    config = _tiny_bert_config(num_labels=3, architectures=["BertForSequenceClassification"],
                               max_position_embeddings=positions, id2label=dict(enumerate(labels)),
                               label2id={label: i for i, label in enumerate(labels)})
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # spread the logits so that the labels differ between texts
        model.classifier.weight.mul_(40)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    return path


def make_tiny_clip(path: Path) -> Path:
    """A CLIP model (text + vision towers) with a BPE tokenizer trained on a few sentences."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer, CLIPTokenizerFast)

    corpus = ["a photo of a cat", "a photo of a dog", "a red square", "a blue circle",
              "the quick brown fox jumps over the lazy dog", "hello world"] * 20
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>", initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")))
    vocab_dir = path / "bpe"
    vocab_dir.mkdir(parents=True)
    bpe.model.save(str(vocab_dir))
    CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt")).save_pretrained(vocab_dir)
    tokenizer = CLIPTokenizerFast.from_pretrained(vocab_dir)

    torch.manual_seed(2)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def make_tiny_splade(path: Path, *, st_format: bool = True, pooling: str = "max") -> Path:
    """A tiny BERT masked-LM as a SPLADE model: in sentence-transformers' SparseEncoder format
    (MLMTransformer + SpladePooling, written as sentence-transformers 5 saves them), or a plain
    `BertForMaskedLM` directory (`st_format=False`)."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    torch.manual_seed(7)
    BertForMaskedLM(_tiny_bert_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    if st_format:
        write_splade_modules(path, pooling, window=128)
    return path


def write_splade_modules(path: Path, pooling: str = "max", window: int = 128) -> None:
    """sentence-transformers 5's SparseEncoder files beside a masked-LM (MLMTransformer +
    SpladePooling), as it saves them."""
    import json

    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "",
         "type": "sentence_transformers.sparse_encoder.modules.mlm_transformer.MLMTransformer"},
        {"idx": 1, "name": "1", "path": "1_SpladePooling",
         "type": "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"}]))
    (path / "1_SpladePooling").mkdir(exist_ok=True)
    (path / "1_SpladePooling" / "config.json").write_text(json.dumps(
        {"pooling_strategy": pooling, "activation_function": "relu", "embedding_dimension": None}))
    (path / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": window, "do_lower_case": False}))
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SparseEncoder", "prompts": {"query": "", "document": ""},
         "default_prompt_name": None, "similarity_fn_name": "dot"}))


def make_tiny_m3(path: Path) -> Path:
    """A tiny BGE-M3: an XLM-RoBERTa encoder in sentence-transformers layout (CLS pooling,
    Normalize: its dense vector), with BGE-M3's two heads beside it as FlagEmbedding saves them
    (`colbert_linear.pt`: hidden -> hidden, `sparse_linear.pt`: hidden -> 1). BERT's vocabulary,
    for want of a SentencePiece model offline; the heads do not care."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(11)
    raw = path / "raw"
    config = XLMRobertaConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=514, pad_token_id=0)
    XLMRobertaModel(config).save_pretrained(raw)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=128)
    SentenceTransformer(modules=[transformer, models.Pooling(HIDDEN, "cls"), models.Normalize()],
                        device="cpu").save(str(path))
    torch.save(torch.nn.Linear(HIDDEN, HIDDEN).state_dict(), path / "colbert_linear.pt")
    torch.save(torch.nn.Linear(HIDDEN, 1).state_dict(), path / "sparse_linear.pt")
    return path


def make_tiny_hf_colbert(path: Path, *, query_maxlen: int = 12, doc_maxlen: int = 40,
                         attend_to_mask_tokens: bool = False) -> Path:
    """A tiny ColBERT in Stanford's `HF_ColBERT` format, as colbert-ai saves one: a BERT under
    `bert.` and its projection `linear` (no bias) in one checkpoint, `artifact.metadata` beside."""
    import json

    import torch
    from transformers import AutoTokenizer, BertModel, BertPreTrainedModel

    class HF_ColBERT(BertPreTrainedModel):  # noqa: N801 - the architecture's own name
        def __init__(self, config):
            super().__init__(config)
            self.bert = BertModel(config)
            self.linear = torch.nn.Linear(config.hidden_size, 16, bias=False)
            self.post_init()

    torch.manual_seed(5)
    HF_ColBERT(_tiny_bert_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    (path / "artifact.metadata").write_text(json.dumps({
        "query_token_id": "[unused0]", "doc_token_id": "[unused1]", "query_maxlen": query_maxlen,
        "doc_maxlen": doc_maxlen, "attend_to_mask_tokens": attend_to_mask_tokens,
        "mask_punctuation": True, "similarity": "cosine", "dim": 16}))
    return path


# PyLate makes its own model (its files as it saves them), from a tiny BERT: run by
# tests/references.py beside PyLate's pinned sentence-transformers
MAKE_PYLATE = """
import torch
from pylate import models
torch.manual_seed(ARGS["seed"])
model = models.ColBERT(model_name_or_path=ARGS["raw"], embedding_size=16, device="cpu",
                       query_length=ARGS["query_length"], document_length=ARGS["document_length"],
                       attend_to_expansion_tokens=ARGS["attend"])
model.save(ARGS["path"])
print(json.dumps({}))
"""


def make_tiny_bert(path: Path, seed: int = 3) -> Path:
    """A bare tiny BERT with MiniLM's tokenizer (what PyLate starts a ColBERT model from)."""
    import torch
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    BertModel(_tiny_bert_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    return path


CLAP_SENTENCES = ["a dog barks in the distance", "rain falls on a tin roof",
                  "a violin plays a slow melody", "people talk in a busy cafe",
                  "the sound of waves on the shore", "a car engine starts"]


def make_tiny_clap_audio(path: Path, *, fusion: bool) -> Path:
    """A tiny CLAP (audio and text; random weights) as LAION's are saved: an HTSAT audio encoder
    (fused or not) at 48 kHz over 1-second windows, a RoBERTa text encoder of 80 positions with a
    byte-level BPE tokenizer trained here on a few sentences, and their feature extractor."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel,
                              ClapProcessor, ClapTextConfig, RobertaTokenizerFast)

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CLAP_SENTENCES * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    (path / "bpe").mkdir(exist_ok=True)
    bpe.save_model(str(path / "bpe"))
    tokenizer = RobertaTokenizerFast(vocab_file=str(path / "bpe/vocab.json"),
                                     merges_file=str(path / "bpe/merges.txt"), model_max_length=78)
    text = ClapTextConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=80,
                          projection_dim=16, pad_token_id=tokenizer.pad_token_id)
    # spec_size 128 over 64 mel bins: up to 256 frames, a 1-second window's 101 fit
    audio = ClapAudioConfig(window_size=4, num_mel_bins=64, spec_size=128, patch_size=4,
                            patch_stride=[4, 4], hidden_size=32, projection_dim=16, depths=[1, 1],
                            num_attention_heads=[2, 2], patch_embeds_hidden_size=16,
                            enable_fusion=fusion, fusion_type="aff_2d" if fusion else None,
                            num_hidden_layers=2)
    torch.manual_seed(5 if fusion else 4)
    model = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(),
                                 projection_dim=16)).eval()
    extractor = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480,
                                     max_length_s=1, fft_window_size=1024,
                                     truncation="fusion" if fusion else "rand_trunc",
                                     padding="repeatpad")
    model.save_pretrained(path)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    return path
