from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # service.py lives at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ONNX exports made by tests (a new directory per run for the generated models) go to a scratch
# cache removed at exit, not the user's. An ONNX_CACHE set by the caller is kept.
SCRATCH_CACHE = tempfile.mkdtemp(prefix="test-cache-")
atexit.register(shutil.rmtree, SCRATCH_CACHE, ignore_errors=True)
os.environ.setdefault("ONNX_CACHE", os.path.join(SCRATCH_CACHE, "infinity-embedding-worker", "onnx"))

from embedding_worker.config import BUNDLED_MODEL_ID, Settings, bundled_model_path  # noqa: E402
from embedding_worker.core.core import Core  # noqa: E402
from imagehost import ImageHost  # noqa: E402
from models import (  # noqa: E402
    make_tiny_classifier,
    make_tiny_clip,
    make_tiny_embedder,
    make_tiny_reranker,
)

MINILM = BUNDLED_MODEL_ID


@contextlib.asynccontextmanager
async def running(**settings):
    """A started core, ready or not (some tests expect a failed start)."""
    core = Core(Settings(**settings))
    await core.start()
    try:
        yield core
    finally:
        await core.stop()


def assert_like(vectors, expected) -> None:
    """A default server's vectors against sentence-transformers' fp32 ones: on a CPU with AMX the
    default is bf16, which keeps each vector to cosine >= 0.9999 (engine/precision.py), not to
    fp32's 1e-4 per component."""
    a, b = np.asarray(vectors, np.float64), np.asarray(expected, np.float64)
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert a.shape == b.shape and cosines.min() >= 0.9999, cosines


def hidden_states(model_dir, texts):
    """Each text's last hidden states as transformers computes them (special tokens included)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].numpy()
                for text in texts]


def torch_logits(model_dir, query, documents):
    """The cross-encoder's raw logits as transformers computes them (token types included)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        features = tokenizer([query] * len(documents), documents, padding=True, truncation=True,
                             return_tensors="pt")
        return model(**features).logits[:, 0].numpy()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "embed": make_tiny_embedder(root / "tiny-embed"),
        "rerank": make_tiny_reranker(root / "tiny-rerank"),
        "clip": make_tiny_clip(root / "tiny-clip"),
        "classify": make_tiny_classifier(root / "tiny-classify"),
    }


@pytest.fixture(scope="session")
def image_host():
    with ImageHost() as host:
        yield host


@pytest.fixture(scope="session")
def served_env(tiny_models) -> dict[str, str]:
    """The in-process service: the bundled MiniLM plus the tiny generated models."""
    return {
        "MODEL_NAMES": f"{bundled_model_path()};{tiny_models['embed']};{tiny_models['rerank']};{tiny_models['clip']}",
        "SERVED_MODEL_NAMES": f"{MINILM};tiny-embed;tiny-rerank;tiny-clip",
        "PROMPTS": "query=query: |document=passage: ;;;",
        "BATCH_SIZES": "16",
        # the numbers these tests hold to torch's are fp32's (bf16's: tests/test_runtime.py)
        "DTYPES": "fp32",
        "MAX_INPUT_ITEMS": "100",
        "MAX_RERANK_DOCUMENTS": "50",
        # private addresses stay refused, except the image host's own 127.0.0.2
        "IMAGE_FETCH_ALLOWED_NETWORKS": "127.0.0.2/32",
        "HTTP_CLIENT_TIMEOUT": "2",
        "MAX_IMAGES_PER_REQUEST": "8",
    }


@pytest.fixture(scope="session")
def client(served_env):
    """The real BentoML app in-process (lifecycle hooks included). Built once per process:
    a second `to_asgi()` re-registers BentoML's Prometheus metrics."""
    from starlette.testclient import TestClient

    saved = dict(os.environ)
    os.environ.update(served_env)
    try:
        import service  # reads the settings at import
    finally:
        os.environ.clear()
        os.environ.update(saved)

    with TestClient(service.InfinityEmbedding.to_asgi()) as c:
        deadline = time.monotonic() + 120
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "engines did not start"
            time.sleep(0.2)
        yield c


DIALECT_SERVED = (MINILM, "tiny-raw", "tiny-rerank", "tiny-classify", "tiny-clip",
                  "tiny-classify-faulty")


@pytest.fixture(scope="session")
def dialect_models(tiny_models, tmp_path_factory):
    """One model of each kind, for the dialects' and the clients' server."""
    root = tmp_path_factory.mktemp("dialect-models")
    return {"raw": make_tiny_embedder(root / "tiny-raw", normalize=False, seed=4),
            "classify": make_tiny_classifier(root / "tiny-classify"),
            "faulty": make_tiny_classifier(root / "tiny-classify-faulty", positions=16),
            **tiny_models}


@pytest.fixture(scope="session")
def dialect_server(dialect_models, tmp_path_factory):
    """One real `bentoml serve` process shared by the dialect and client suites (slow tests):
    the bundled MiniLM and the tiny models of `dialect_models`, named as DIALECT_SERVED."""
    from server import BentoServer

    m = dialect_models
    sources = [bundled_model_path(), m["raw"], m["rerank"], m["classify"], m["clip"], m["faulty"]]
    srv = BentoServer({
        "MODEL_NAMES": ";".join(map(str, sources)), "SERVED_MODEL_NAMES": ";".join(DIALECT_SERVED),
        "BATCH_SIZES": "8", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        # the tiny reranker's scores lie ~1e-4 apart, finer than bf16 resolves (on AMX its
        # documents tie): the clients' tests need distinct scores to catch one given to the
        # wrong document
        "DTYPES": ";".join("fp32" if name == "tiny-rerank" else "auto" for name in DIALECT_SERVED),
    }, tmp_path_factory.mktemp("dialects") / "server.log")
    yield srv.start()
    srv.stop()
