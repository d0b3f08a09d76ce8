"""BACKEND=optimum (ONNX Runtime): exported offline once, and held to BACKEND=torch's numbers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from embedding_worker.engine import onnx_export, runtime
from embedding_worker.config import ConfigError, bundled_model_path
from conftest import running, torch_logits
from server import BentoServer

TEXTS = [
    "Hello world",
    "东京是日本的首都。",
    "a",
    # past MiniLM's 256-token window: truncated there, not at its 512 position embeddings
    "A much longer passage about batching, padding and truncation. " * 60,
]
DOCUMENTS = ["the cat sat on the mat", "dogs bark loudly at night", "x",
             "paris is the capital of france " * 30]


def assert_like_sentence_transformers(result, model_dir):
    from sentence_transformers import SentenceTransformer

    got = np.array([d["embedding"] for d in result["data"]])
    st = SentenceTransformer(str(model_dir), device="cpu")
    np.testing.assert_allclose(got, st.encode(TEXTS, normalize_embeddings=True), atol=2e-5)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
async def core(tiny_models, onnx_cache):
    async with running(backend="optimum", onnx_cache=str(onnx_cache),
                       model_names=f"{bundled_model_path()};{tiny_models['rerank']}",
                       served_model_names="minilm;tiny-rerank") as core:
        assert core.engine.ready, core.engine.failure
        yield core


async def test_bundled_minilm_is_exported_offline_and_matches_sentence_transformers(core, onnx_cache):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(bundled_model_path(), device="cpu")
    result = await core.embeddings.create({"model": "minilm", "input": TEXTS})
    got = np.array([d["embedding"] for d in result["data"]])
    np.testing.assert_allclose(got, st.encode(TEXTS, normalize_embeddings=True), atol=2e-5)
    window = st.max_seq_length - 2  # text tokens the model sees, special tokens excluded
    expected = sum(min(window, len(st.tokenizer(t, add_special_tokens=False)["input_ids"]))
                   for t in TEXTS)
    assert result["usage"]["prompt_tokens"] == expected
    card = core.models.card("minilm")
    assert card["backend"] == "optimum"
    assert core.models.get("minilm").info.window == 256
    assert sorted(p.name for p in onnx_cache.glob("*/model.onnx")) == ["model.onnx"] * 2
    # the weights beside the graph, mapped by ONNX Runtime rather than copied; readable by the
    # image's serving user when the build (root) made the export
    for weights in onnx_cache.glob("*/model.onnx_data"):
        assert weights.stat().st_size > 10 * (weights.parent / "model.onnx").stat().st_size
        assert weights.stat().st_mode & 0o044 == 0o044
    assert len(list(onnx_cache.glob("*/model.onnx_data"))) == 2


async def test_bert_reranker_scores_match_torch_with_token_types(core, tiny_models):
    query = "where do cats sit"
    result = await core.rerank.create({"model": "tiny-rerank", "query": query, "documents": DOCUMENTS,
                                "raw_scores": True})
    logits = torch_logits(tiny_models["rerank"], query, DOCUMENTS)
    got = {r["index"]: r["relevance_score"] for r in result["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], logits, atol=1e-5)
    assert [r["index"] for r in result["results"]] == list(np.argsort(-logits, kind="stable"))


def test_an_export_is_made_once_and_found_again(tiny_models, tmp_path):
    first = onnx_export.prepare(str(tiny_models["embed"]), str(tmp_path))
    exported = tmp_path / first.directory.rsplit("/", 1)[-1] / "model.onnx"
    stamp = exported.stat().st_mtime_ns
    again = onnx_export.prepare(str(tiny_models["embed"]), str(tmp_path))
    assert again == first and exported.stat().st_mtime_ns == stamp
    assert first.pooling == "mean" and first.window == 128
    assert [p.name for p in tmp_path.iterdir()] == [exported.parent.name]  # no staging left


def test_an_image_layer_that_keeps_whole_seconds_still_finds_the_export(tiny_models, tmp_path):
    """An export made at image build time is keyed on the model's files; tar layers keep their
    mtimes to the second only, so the key must not see finer (found by a real build)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["embed"], model)
    first = onnx_export.prepare(str(model), str(tmp_path / "cache"))
    for file in model.rglob("*"):
        seconds = int(file.stat().st_mtime)
        os.utime(file, ns=(seconds * 10**9, seconds * 10**9))  # as the image has them
    assert onnx_export.prepare(str(model), str(tmp_path / "cache")) == first
    (model / "config.json").write_text((model / "config.json").read_text() + " ")  # a real change
    assert onnx_export.prepare(str(model), str(tmp_path / "cache")) != first


async def test_a_model_that_ships_its_onnx_file_is_used_as_it_is(tiny_models, tmp_path):
    # the hub's sentence-transformers layout: the export under onnx/ beside the torch weights
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_models["embed"], shipped)
    export = onnx_export.prepare(str(shipped), str(tmp_path / "scratch"))
    (shipped / "onnx").mkdir()
    for file in Path(export.directory).glob("model.onnx*"):  # the graph and its weights
        shutil.copy(file, shipped / "onnx" / file.name)
    assert onnx_export.prepare(str(shipped), str(tmp_path / "unused")).directory == str(shipped)
    assert not (tmp_path / "unused").exists()

    async with running(backend="optimum", onnx_cache=str(tmp_path / "unused"),
                       model_names=str(shipped), served_model_names="shipped") as core:
        assert core.engine.ready, core.engine.failure
        result = await core.embeddings.create({"model": "shipped", "input": TEXTS})
    assert_like_sentence_transformers(result, tiny_models["embed"])


def _with_pooling(source, target, **modes):
    shutil.copytree(source, target)
    config = target / "1_Pooling" / "config.json"
    pooling = json.loads(config.read_text())
    pooling.update({k: False for k in pooling if k.startswith("pooling_mode_")})
    pooling.update({f"pooling_mode_{k}": v for k, v in modes.items()})
    config.write_text(json.dumps(pooling))
    return target


def test_pooling_is_read_from_the_model_and_unsupported_pooling_is_refused(tiny_models, tmp_path):
    cls = _with_pooling(tiny_models["embed"], tmp_path / "cls", cls_token=True)
    assert onnx_export.prepare(str(cls), str(tmp_path / "cache")).pooling == "cls"
    last = _with_pooling(tiny_models["embed"], tmp_path / "last", lasttoken=True)
    assert onnx_export.prepare(str(last), str(tmp_path / "cache")).pooling == "last"
    max_ = _with_pooling(tiny_models["embed"], tmp_path / "max", max_tokens=True)
    with pytest.raises(ConfigError, match="pools by max_tokens; the ONNX path pools by mean, CLS "
                                          "or last token only: use BACKEND=torch"):
        onnx_export.prepare(str(max_), str(tmp_path / "cache"))


@pytest.mark.parametrize("mode", ["cls_token", "lasttoken"])
async def test_cls_and_last_token_pooling_match_sentence_transformers(tiny_models, tmp_path, mode):
    model = _with_pooling(tiny_models["embed"], tmp_path / mode, **{mode: True})
    async with running(backend="optimum", onnx_cache=str(tmp_path / "cache"),
                       model_names=str(model), served_model_names="pooled") as core:
        assert core.engine.ready, core.engine.failure
        result = await core.embeddings.create({"model": "pooled", "input": TEXTS})
    assert_like_sentence_transformers(result, model)


def test_modules_the_export_would_leave_out_are_refused(tiny_models, tmp_path):
    dense = tmp_path / "dense"
    shutil.copytree(tiny_models["embed"], dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="has sentence-transformers modules Dense that the ONNX "
                                          "path leaves out; use BACKEND=torch"):
        onnx_export.prepare(str(dense), str(tmp_path / "cache"))


def test_image_models_and_classifiers_are_refused_with_the_reason(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="serves text models only; .* is an image or audio model"):
        onnx_export.prepare(str(tiny_models["clip"]), str(tmp_path / "cache"))
    classifier = tmp_path / "classifier"
    shutil.copytree(tiny_models["rerank"], classifier)
    config = json.loads((classifier / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "positive"}
    (classifier / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="serves embedders and rerankers; .* is a classifier"):
        onnx_export.prepare(str(classifier), str(tmp_path / "cache"))


async def test_auto_falls_back_to_torch_when_onnx_runtime_cannot_load(tiny_models, tmp_path,
                                                                      caplog):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["embed"], broken)
    (broken / "onnx").mkdir()
    (broken / "onnx" / "model.onnx").write_bytes(b"not an ONNX graph")
    with caplog.at_level("WARNING", logger="embedding_worker"):
        async with running(model_names=f"{broken};{tiny_models['rerank']}",
                           served_model_names="broken;rerank") as core:
            assert core.engine.ready, core.engine.failure
            # per model: the other stays on ONNX Runtime
            assert {n: core.models.card(n)["backend"] for n in ("broken", "rerank")} == {
                "broken": "torch", "rerank": "optimum"}
            result = await core.embeddings.create({"model": "broken", "input": TEXTS})
    assert "model broken: ONNX Runtime could not load it, served by torch: InvalidProtobuf" \
        in caplog.text
    assert_like_sentence_transformers(result, tiny_models["embed"])
    # asked for ONNX Runtime explicitly: unready, with the reason
    async with running(backend="optimum",
                       model_names=str(broken), served_model_names="broken") as core:
        assert core.engine.state == "failed" and core.engine.failure


async def test_auto_serves_with_torch_what_onnx_runtime_cannot(tiny_models, tmp_path, caplog):
    # a model ONNX Runtime cannot serve (max pooling) goes to torch, and one asked for in
    # bfloat16 too unless the CPU computes bf16 (then the lean engine on OpenVINO); the rest to
    # ONNX Runtime; the start-up log says why
    max_ = _with_pooling(tiny_models["embed"], tmp_path / "max", max_tokens=True)
    with caplog.at_level("INFO", logger="embedding_worker"):
        async with running(dtypes="auto;bf16;auto",
                           model_names=f"{max_};{tiny_models['embed']};{tiny_models['rerank']}",
                           served_model_names="max;bf16;rerank") as core:
            assert core.engine.ready, core.engine.failure
            backends = {name: core.models.card(name)["backend"]
                        for name in ("max", "bf16", "rerank")}
            lean_bf16 = runtime.for_this_cpu("bfloat16").precision == "bfloat16"
            assert backends == {"max": "torch", "bf16": "optimum" if lean_bf16 else "torch",
                                "rerank": "optimum"}
            result = await core.embeddings.create({"model": "max", "input": TEXTS})
    assert ("model max: served by torch, not ONNX Runtime: ConfigError: BACKEND=optimum: "
            f"{max_} pools by max_tokens") in caplog.text
    assert_like_sentence_transformers(result, max_)


async def test_a_refused_model_leaves_the_service_unready_with_the_reason(tiny_models, tmp_path):
    async with running(backend="optimum", onnx_cache=str(tmp_path),
                       model_names=str(tiny_models["clip"]), served_model_names="clip") as core:
        assert core.engine.state == "failed"
        assert "BACKEND=optimum serves text models only" in core.engine.failure


@pytest.mark.slow
def test_bentoml_serve_with_the_onnx_backend_answers_the_openai_client(tiny_models, tmp_path):
    from sentence_transformers import SentenceTransformer

    srv = BentoServer({"BACKEND": "optimum", "ONNX_CACHE": str(tmp_path / "cache"),
                       "MODEL_NAMES": f"{bundled_model_path()};{tiny_models['rerank']}",
                       "SERVED_MODEL_NAMES": "minilm;tiny-rerank"},
                      tmp_path / "server.log").start()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        result = client.embeddings.create(model="minilm", input=TEXTS)
        got = np.array([d.embedding for d in result.data])
        st = SentenceTransformer(bundled_model_path(), device="cpu")
        np.testing.assert_allclose(got, st.encode(TEXTS, normalize_embeddings=True), atol=2e-5)
        response = httpx.post(f"{srv.url}/v1/rerank", json={
            "model": "tiny-rerank", "query": "cats", "documents": DOCUMENTS, "raw_scores": True})
        assert response.status_code == 200, response.text
        got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))],
                                   torch_logits(tiny_models["rerank"], "cats", DOCUMENTS), atol=1e-5)
        assert f"model minilm: source={bundled_model_path()} backend=optimum" in srv.logs()
        assert f"onnx={tmp_path / 'cache'}/" in srv.logs()
    finally:
        srv.stop()
