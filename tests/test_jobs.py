"""One job envelope for RunPod and `/runsync`: an unexpected exception inside the core fails the
job with the same text in both, and the same text the HTTP route's 500 carries.

No real engine raises an unexpected exception (model errors are contained as faults), so this
test serves the core through a second implementation of the engine seam whose model raises."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from embedding_worker.api.http import create_app
from embedding_worker.api.runpod import make_handler
from embedding_worker.config import Settings
from embedding_worker.core.core import Core
from embedding_worker.engine.base import Engine, Heartbeat, ModelBackend, ModelInfo, QueueStats


class RaisingModel(ModelBackend):
    def __init__(self, name: str):
        self.info = ModelInfo(name=name, source=name, backend="test", dtype="float32", device="cpu",
                              batch_size=8, capabilities=frozenset({"embed"}), window=None)
        self.heartbeat = Heartbeat(60)

    @property
    def last_fault(self) -> str:
        return ""

    async def embed(self, texts: list[str]) -> Any:
        raise RuntimeError("not an API error")

    embed_images = score = classify = embed

    def usage(self, texts: list[str]) -> int:
        return 0

    def count_tokens(self, texts: list[str], pairs_with: str | None = None) -> None:
        return None

    def tokenize(self, texts: list[str], add_special_tokens: bool = False) -> None:
        return None

    def decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> None:
        return None

    def queue(self) -> QueueStats:
        return QueueStats(0.0, 0, 0)


class RaisingEngine(Engine):
    def __init__(self, name: str):
        self.state, self.failure, self.models = "starting", "", {name: RaisingModel(name)}

    def load(self) -> None:
        pass

    async def start(self) -> None:
        self.state = "ready"

    async def stop(self) -> None:
        self.state = "stopped"


@pytest.fixture
async def core():
    core = Core(Settings(model_names="raising"), engine=RaisingEngine("raising"))
    await core.start()
    yield core
    await core.stop()


async def test_an_unexpected_exception_reads_the_same_in_every_transport(core):
    body = {"model": "raising", "input": "x"}
    job = await make_handler(core)({"id": "job-1", "input": body})
    with TestClient(create_app(core), raise_server_exceptions=False) as http:
        runsync = http.post("/runsync", json={"input": body}).json()
        route = http.post("/v1/embeddings", json=body)
    message = "internal error: RuntimeError"
    assert job == {"error": message}
    assert runsync["status"] == "FAILED" and runsync["error"] == message
    assert route.status_code == 500 and route.json()["error"]["message"] == message
    assert core.pipeline.in_flight == 0
