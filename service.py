"""BentoML entry point: wiring only. The logic lives in src/embedding_worker."""

from __future__ import annotations

from typing import Annotated

import bentoml

from embedding_worker.api.batch import served_with
from embedding_worker.api.http import create_app
from embedding_worker.api.middleware import RequestGuard
from embedding_worker.config import load_settings_or_exit
from embedding_worker.core.core import Core
from embedding_worker.core.schemas import EmbedItem, RerankItem
from embedding_worker.observability.logs import configure_logging
from embedding_worker.observability.tracing import tracing_config

settings = load_settings_or_exit()
configure_logging(settings)
# cheap: the engines load in the start-up hook (or began to, `embedding-worker serve`)
core = Core.for_process(settings)
openai_app = create_app(core)


@bentoml.asgi_app(openai_app, path="/")
@bentoml.service(
    name="infinity-embedding-worker",
    resources={"gpu": 1},  # only sets CUDA_VISIBLE_DEVICES; harmless on CPU-only machines
    traffic={"timeout": settings.traffic_timeout},
    # per-request access lines cost CPU the model needs (see docs/performance.md); DEBUG has them
    logging={"access": {"enabled": settings.log_level == "DEBUG"}},
    tracing=tracing_config(),
    # BentoML 1.4.31+ recycles its in-process aiohttp session under load and fails batched calls
    # unless the connection lives for the whole process.
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
)
class InfinityEmbedding:
    @bentoml.on_startup
    async def start_engines(self) -> None:
        await core.start()

    @bentoml.on_shutdown
    async def stop_engines(self) -> None:
        await core.stop()

    def __is_ready__(self) -> bool:
        return core.ready

    # Batchable methods for Bento-to-Bento callers (adaptive batching across requests). The OpenAI
    # routes call the core directly: the core batches across requests already.
    @bentoml.api(batchable=True, route="/batch/embed")
    async def embed(
        self, items: list[Annotated[EmbedItem, served_with(core, "embed")]]
    ) -> list[list[float]]:
        return await core.embeddings.items(items)

    @bentoml.api(batchable=True, route="/batch/rerank")
    async def rerank(
        self, items: list[Annotated[RerankItem, served_with(core, "rerank")]]
    ) -> list[float]:
        return await core.rerank.items(items)


# auth, body cap and request log for every route, BentoML's own included
InfinityEmbedding.add_asgi_middleware(RequestGuard, settings=settings)
