"""Precision by hardware: the lean engine's runtime and precision per CPU, and the bf16 guard.

The choice is a function of the CPU's flags, tested on every path here whatever this machine is;
the engine-level tests force a CPU by its flags (`runtime.cpu_flags`). bf16 outputs are held to
torch fp32 on the tiny models and on MiniLM: on a CPU with AMX they are real bf16, elsewhere
OpenVINO ignores the bf16 hint and computes f32 (the numbers must hold either way). The guard
refuses a model bf16 breaks: a real one where the CPU computes bf16, a forced verdict anywhere.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import MINILM, running, torch_logits
from embedding_worker.config import Settings, bundled_model_path
from embedding_worker.engine import onnx_export, precision, runtime
from embedding_worker.engine.ort import OrtModel
from embedding_worker.engine.runtime import BF16, FP32, ONNXRUNTIME, OPENVINO, Choice, choose
from models import make_bf16_fragile_embedder

AMX = frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
ZEN4 = frozenset({"avx512f", "avx512_bf16"})
ZEN3 = frozenset({"avx2"})
HAS_AMX = runtime.AMX_BF16 in runtime.cpu_flags()


@pytest.mark.parametrize("dtype, flags, openvino, expected, why", [
    ("auto", AMX, True, (OPENVINO, BF16), "AMX"),
    ("bfloat16", AMX, True, (OPENVINO, BF16), "AMX"),
    ("auto", ZEN4, True, (ONNXRUNTIME, FP32), "no AMX"),
    ("auto", ZEN3, True, (ONNXRUNTIME, FP32), "no AMX"),
    ("bfloat16", ZEN3, True, (ONNXRUNTIME, FP32), "emulated"),
    ("auto", AMX, False, (ONNXRUNTIME, FP32), "openvino is not installed"),
    ("float32", AMX, True, (ONNXRUNTIME, FP32), "float32"),
])
def test_the_choice_per_cpu(dtype, flags, openvino, expected, why):
    choice = choose(dtype, flags, openvino)
    assert (choice.runtime, choice.precision) == expected and why in choice.reason


def test_flags_and_name_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 amx_bf16\n")
    assert runtime.cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert runtime.cpu_name(str(info)) == "Some Xeon"
    assert runtime.cpu_flags(str(tmp_path / "none")) == frozenset()


def test_judge_embeddings_and_scores():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(8, 16))
    assert precision.judge(rows, rows * 3 + 1e-6, cross_encoder=False).ok  # scale is no change
    bent = rows.copy()
    bent[2, :4] += 0.05
    verdict = precision.judge(rows, bent, cross_encoder=False)
    assert not verdict.ok and "min cosine 0.99" in verdict.detail
    n = len(precision.PROBE_TEXTS)
    logits = np.linspace(-4, 4, 2 * n)
    assert precision.judge(logits, logits + 0.01, cross_encoder=True).ok
    assert not precision.judge(logits, logits + 0.2, cross_encoder=True).ok  # scores too far
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    scores = np.linspace(0.05, 0.95, 2 * n)
    scores[4] = scores[3] + 0.015  # apart by more than 0.01
    moved = scores.copy()
    moved[3], moved[4] = scores[3] + 0.009, scores[4] - 0.009  # each within 0.01, order changed
    verdict = precision.judge(logit(scores), logit(moved), cross_encoder=True)
    assert not verdict.ok and "max score gap 0.009" in verdict.detail and "changed" in verdict.detail
    tie = scores.copy()
    tie[4] = scores[3] + 0.005
    close = tie.copy()
    close[3], close[4] = tie[4], tie[3]  # a tie at this tolerance: its order is not held
    assert precision.judge(logit(tie), logit(close), cross_encoder=True).ok


def test_a_verdict_is_kept_per_runtime_version(tmp_path):
    calls = []

    def run(items):
        calls.append(len(items))
        return np.eye(len(items), 16)

    assert precision.kept_verdict(tmp_path, "openvino 1") is None
    first = precision.probe(tmp_path, "openvino 1", False, run, run)
    assert first.ok and len(calls) == 2
    kept = precision.kept_verdict(tmp_path, "openvino 1")
    assert kept is not None and kept.ok and kept.detail.endswith("(kept)")
    assert precision.kept_verdict(tmp_path, "openvino 2") is None  # a new runtime: probed again
    again = precision.probe(tmp_path, "openvino 2", False, run, run)
    assert again.ok and len(calls) == 4
    assert json.loads((tmp_path / precision.VERDICT_FILE).read_text())["runtime_version"] == \
        "openvino 2"


def embed(model: OrtModel, texts):
    return np.asarray(model.embed_now(texts))


def min_cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runtime-onnx"))


def lean(source, onnx_cache, choice) -> OrtModel:
    settings = Settings(model_names=str(source))
    spec = settings.models[0]
    return OrtModel(spec, onnx_export.prepare(spec.source, onnx_cache), settings, choice)


OV_BF16 = Choice(OPENVINO, BF16, "test")


def test_bf16_embeddings_hold_to_torch_fp32(tiny_models, onnx_cache):
    from sentence_transformers import SentenceTransformer

    texts = precision.PROBE_TEXTS + ["tides " * 150]
    for source in (tiny_models["embed"], bundled_model_path()):
        expected = SentenceTransformer(str(source), device="cpu").encode(texts)
        assert min_cosine(embed(lean(source, onnx_cache, OV_BF16), texts), expected) >= 0.9999


def test_bf16_rerank_scores_hold_to_torch_fp32(tiny_models, onnx_cache):
    """The guard's own rule against torch: sigmoid scores within 0.01, and the order of the
    documents whose scores are further apart kept."""
    model = lean(tiny_models["rerank"], onnx_cache, OV_BF16)
    pairs = precision.probe_pairs()
    expected = np.concatenate([torch_logits(tiny_models["rerank"], query, precision.PROBE_TEXTS)
                               for query in precision.PROBE_QUERIES])
    verdict = precision.judge(expected, np.asarray(model.embed_now(pairs)), cross_encoder=True)
    assert verdict.ok, verdict.detail


def test_shapes_are_few_and_never_past_the_window():
    shapes = set()
    for rows in range(1, 257):
        for width in range(1, 513):
            padded_rows, padded_width = runtime.bucketed(rows, width, 512)
            assert rows <= padded_rows <= max(rows * 3 // 2, rows + 1)  # at most a third padding
            assert width <= padded_width <= 512 and padded_width - width < max(16, width // 4)
            shapes.add((padded_rows, padded_width))
    assert len(shapes) <= 16 * 32
    assert runtime.bucketed(5, 70, 77) == (6, 77)  # a window that is not a step: capped at it
    assert runtime.bucketed(300, 20, 512) == (300, 32)  # past the last bucket: rows as they are


def test_openvino_runs_its_own_form_on_few_shapes(tiny_models, onnx_cache):
    """bf16 compiles the export's OpenVINO form (fp16 weights), and a mix of batch sizes and
    lengths reaches it as a few padded shapes whose padding is sliced off the answer."""
    model = lean(tiny_models["embed"], onnx_cache, OV_BF16)
    assert model.session.source == model.session.source.parent / runtime.OPENVINO_IR
    reference = lean(tiny_models["embed"], onnx_cache, Choice(ONNXRUNTIME, FP32, ""))
    seen, run = [], model.session.run

    def recording(feed):
        mask = feed["attention_mask"]
        real = (int((mask.sum(1) > 0).sum()), int(mask.sum(1).max()))
        seen.append((real, feed["input_ids"].shape))
        return run(feed)

    model.session.run = recording
    rng = np.random.default_rng(5)
    words = "tide harbour lantern quartz meadow signal orbit copper".split()
    for _ in range(40):
        texts = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(rng.integers(1, 20))]
        assert min_cosine(embed(model, texts), embed(reference, texts)) >= 0.9999
    assert all(shape == runtime.bucketed(*real, model.window) for real, shape in seen)
    assert len({shape for _, shape in seen}) * 2 < len({real for real, _ in seen})


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    return make_bf16_fragile_embedder(tmp_path_factory.mktemp("fragile") / "m")


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX: bf16 is not computed here")
def test_the_fragile_model_fails_the_guard_in_real_bf16(fragile, onnx_cache):
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(fragile), device="cpu").encode(precision.PROBE_TEXTS)
    fp32 = embed(lean(fragile, onnx_cache, Choice(ONNXRUNTIME, FP32, "")), precision.PROBE_TEXTS)
    assert min_cosine(fp32, expected) >= 0.9999  # fp32 keeps its numbers
    bf16 = embed(lean(fragile, onnx_cache, OV_BF16), precision.PROBE_TEXTS)
    assert not precision.judge(fp32, bf16, cross_encoder=False).ok


def card(core, name):
    return next(c for c in (core.models.card(n) for n in core.models.names) if c["id"] == name)


@pytest.mark.parametrize("flags, dtypes, expected", [
    (AMX, "auto", ("bfloat16", "openvino")),
    (ZEN3, "auto", ("float32", "onnxruntime")),
    (AMX, "fp32", ("float32", "onnxruntime")),
])
async def test_the_engine_serves_each_cpus_choice(monkeypatch, tmp_path, flags, dtypes, expected,
                                                  caplog):
    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": flags)
    caplog.set_level(logging.INFO, logger="embedding_worker")
    async with running(onnx_cache=str(tmp_path), dtypes=dtypes) as core:
        got = card(core, MINILM)
        assert (got["dtype"], got["runtime"]) == expected
        out = await core.embeddings.create({"model": MINILM, "input": ["hello", "tides"]})
        assert len(out["data"]) == 2
    assert f"runtime={expected[1]}" in caplog.text  # the start-up line says which, and why


@pytest.mark.parametrize("dtypes, expected", [("auto", ("float32", "onnxruntime")),
                                              ("bf16", ("bfloat16", "openvino"))])
async def test_a_model_failing_the_guard(monkeypatch, tmp_path, caplog, fragile, dtypes,
                                         expected):
    """Forced on any CPU: an AMX CPU, and a guard no bf16 can pass (where the CPU computes bf16,
    the fragile model fails the real one: previous test)."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": AMX)
    if not HAS_AMX:
        monkeypatch.setattr(precision, "MIN_COSINE", 1.5)
    caplog.set_level(logging.INFO, logger="embedding_worker")
    async with running(model_names=str(fragile), served_model_names="fragile",
                       onnx_cache=str(tmp_path), dtypes=dtypes) as core:
        got = card(core, "fragile")
        assert (got["dtype"], got["runtime"]) == expected
    if dtypes == "auto":
        assert "bf16 would change its numbers (min cosine" in caplog.text
        caplog.clear()  # a second start reads the kept verdict, and compiles no bf16 graph
        async with running(model_names=str(fragile), served_model_names="fragile",
                           onnx_cache=str(tmp_path), dtypes=dtypes) as core:
            assert (card(core, "fragile")["dtype"], card(core, "fragile")["runtime"]) == expected
        assert "(kept))" in caplog.text
    else:
        assert "bf16 changes its numbers" in caplog.text  # served as asked, with a warning


async def test_bf16_asked_for_on_a_cpu_without_amx_is_torch_with_a_warning(monkeypatch, tmp_path,
                                                                            tiny_models, caplog):
    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": ZEN3)
    caplog.set_level(logging.INFO, logger="embedding_worker")
    async with running(model_names=str(tiny_models["embed"]), served_model_names="tiny",
                       onnx_cache=str(tmp_path), dtypes="bf16") as core:
        assert card(core, "tiny")["backend"] == "torch"
    assert ("DTYPES asks for bf16, which the CPU engine does not serve here (the CPU has no AMX "
            "(amx_bf16): bf16 would be emulated): served by torch") in caplog.text


def test_usage_reads_the_models_own_encoding_and_counts_alike(tiny_models, onnx_cache):
    """A text the model has encoded is counted from that encoding (no second tokenisation on the
    event loop), the same as a text it has not: special tokens out, cut at the window."""
    model = lean(tiny_models["embed"], onnx_cache, Choice(ONNXRUNTIME, FP32, ""))
    texts = ["a short one", "tides " * 40, "word " * (model.window + 50)]  # the last one is cut
    fresh = [model.usage([text]) for text in texts]
    assert fresh[2] == model.window - model.special and fresh[0] < fresh[1] < fresh[2]
    model.embed_now(texts)
    assert all(text in model._counts for text in texts)  # kept from the model's own encoding
    assert [model.usage([text]) for text in texts] == fresh
    assert model.usage(texts + ["never embedded text"]) == sum(fresh) + model.usage(
        ["never embedded text"])


async def test_a_model_openvino_cannot_compile_is_served_by_onnx_runtime(monkeypatch, tmp_path,
                                                                          tiny_models, caplog):
    """The export's OpenVINO form damaged (a disk error, a half-written cache): OpenVINO refuses
    it, ONNX Runtime serves the model in fp32 from the same export, and the start-up line says
    why; its numbers are the model's own."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": AMX)
    names = dict(model_names=str(tiny_models["embed"]), served_model_names="tiny",
                 onnx_cache=str(tmp_path))
    async with running(**names) as core:  # exports it, OpenVINO form included
        assert card(core, "tiny")["runtime"] == "openvino"
        expected = await core.embeddings.create({"model": "tiny", "input": ["tides", "a harbour"]})
    (ir,) = tmp_path.rglob(runtime.OPENVINO_IR)
    ir.write_text("<net><layers>truncated")
    caplog.set_level(logging.INFO, logger="embedding_worker")
    async with running(**names) as core:
        got = card(core, "tiny")
        assert (got["dtype"], got["runtime"], got["backend"]) == ("float32", "onnxruntime", "optimum")
        out = await core.embeddings.create({"model": "tiny", "input": ["tides", "a harbour"]})
    assert "openvino could not compile it" in caplog.text
    assert min_cosine(np.array([d["embedding"] for d in out["data"]]),
                      np.array([d["embedding"] for d in expected["data"]])) >= 0.9999
