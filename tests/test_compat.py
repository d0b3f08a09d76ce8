"""engine/compat.py checks every infinity attribute it touches before it touches one: on a real
infinity engine with one attribute taken away or changed, the check names it; a process whose
infinity lacks one stops with that one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from embedding_worker.engine import compat
from embedding_worker.engine.base import Heartbeat
from embedding_worker.engine.fault_guard import FaultGuard


async def started(path):
    from infinity_emb import AsyncEngineArray, EngineArgs

    array = AsyncEngineArray.from_args([EngineArgs(
        model_name_or_path=str(path), engine="torch", device="cpu",
        lengths_via_tokenize=True, bettertransformer=False, model_warmup=False)])
    await array.astart()
    return array


@pytest.fixture
async def infinity_engine(tiny_models):
    """A real infinity engine on the tiny embedder, started but not adapted."""
    array = await started(tiny_models["embed"])
    yield array[0]
    await array.astop()


@pytest.fixture
async def classifier_engine(tiny_models):
    array = await started(tiny_models["classify"])
    yield array[0]
    await array.astop()


def adapt(engine):
    return compat.adapt(engine, cpu=True, guard=FaultGuard("tiny", Heartbeat(60)))


async def test_a_compatible_engine_is_adapted(infinity_engine):
    adapted = adapt(infinity_engine)
    assert adapted.window == 128 and adapted.tokenizer is not None
    vectors, _ = await infinity_engine.embed(sentences=["a text"])  # the adapted stages serve
    assert len(vectors) == 1


@pytest.mark.parametrize("breakage, named", [
    (lambda e: delattr(e, "_model_replicas"), "AsyncEmbeddingEngine._model_replicas is missing"),
    (lambda e: setattr(e._batch_handler, "_schedule", lambda *a: None),
     "BatchHandler._schedule is not a coroutine function"),
    (lambda e: setattr(e._batch_handler.model_worker[0], "_batch_delay", "5ms"),
     "._batch_delay is a str"),
    (lambda e: delattr(e._model_replicas[0], "_infinity_tokenizer"),
     "SentenceTransformerPatched._infinity_tokenizer is missing"),
])
async def test_a_missing_or_changed_attribute_is_named(infinity_engine, breakage, named):
    breakage(infinity_engine)
    with pytest.raises(compat.IncompatibleInfinity, match=named.replace(".", r"\.")) as err:
        adapt(infinity_engine)
    assert "was written for infinity-emb 0.0.78" in str(err.value)
    assert "\n" not in str(err.value)


async def test_the_embedder_gives_its_own_vectors(infinity_engine):
    assert adapt(infinity_engine).raw_vectors  # the tiny embedder's modules normalise already
    vectors, _ = await infinity_engine.embed(sentences=["a text"])
    assert abs(float((vectors[0] ** 2).sum()) - 1) < 1e-5


async def test_the_classifier_gives_logits_in_label_order(classifier_engine):
    adapted = adapt(classifier_engine)
    assert adapted.labels == ("negative", "neutral", "positive")
    assert adapted.label_activation == "softmax" and adapted.window == 512
    rows, usage = await classifier_engine.classify(sentences=["one text"], raw_scores=True)
    assert rows[0].shape == (3,) and usage == 2
    assert not abs(float(rows[0].sum()) - 1) < 1e-3  # logits, not probabilities


async def test_a_changed_classifier_is_named(classifier_engine):
    del classifier_engine._model_replicas[0]._pipe
    with pytest.raises(compat.IncompatibleInfinity, match=r"SentenceClassifier\._pipe is missing"):
        adapt(classifier_engine)


def test_a_missing_module_attribute_is_named(monkeypatch):
    from infinity_emb import primitives

    monkeypatch.delattr(primitives, "ReRankSingle")
    with pytest.raises(compat.IncompatibleInfinity,
                       match=r"infinity_emb\.primitives\.ReRankSingle is missing"):
        compat.check_modules()


def test_the_process_stops_with_one_line_naming_it(tiny_models):
    script = textwrap.dedent(f"""
        import asyncio, infinity_emb.primitives
        del infinity_emb.primitives.ReRankSingle  # as if an upgrade had renamed it
        from embedding_worker.config import Settings
        from embedding_worker.core.core import Core
        from embedding_worker.observability.logs import configure_logging
        settings = Settings(model_names={str(tiny_models["embed"])!r}, backend="torch")
        configure_logging(settings)
        asyncio.run(Core(settings).start())
        print("served anyway")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == compat.EXIT_INCOMPATIBLE, done.stderr
    assert "served anyway" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if "stopping:" in line]
    assert len(lines) == 1, done.stderr
    assert "infinity_emb.primitives.ReRankSingle is missing" in lines[0]
    assert "'pair scoring' workaround" in lines[0]
    assert "Traceback" not in done.stderr
