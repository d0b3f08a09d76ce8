"""`Core`: the engine, the pipeline and the endpoint families of one process, started together.

Transports call the families (`core.models`, `core.embeddings`, `core.rerank`, `core.classify`,
`core.tokenize`, and the batch items) or a dialect over them (`core.cohere`, `core.tei`,
`core.infinity`) with parsed JSON bodies and get response dicts back (embeddings as numpy rows,
see `encoding.dumps`) or an `errors.APIError`. Nothing here knows HTTP or RunPod.
"""

from __future__ import annotations

import logging

from ..config import Settings
from ..engine import create_engine
from ..engine.base import Engine
from .cache import EmbeddingCache
from .classify import Classify
from .dialects.cohere import CohereEmbed
from .dialects.infinity import Infinity
from .dialects.tei import Tei
from .embed import Embeddings
from .media import MediaFetcher
from .models import Models
from .pipeline import Pipeline
from .rerank import Rerank
from .tokenize import Tokenize


logger = logging.getLogger("embedding_worker")


class Core:
    _preloaded: Core | None = None

    @classmethod
    def preload(cls, settings: Settings) -> Core:
        """Make this process's core now and begin loading its engines in the background, before
        the transport's imports (serve mode: BentoML's); `for_process` hands it out."""
        core = cls._preloaded = cls(settings)
        core.engine.preload()
        return core

    @classmethod
    def for_process(cls, settings: Settings) -> Core:
        """The core `preload` made, when its settings are these; otherwise a new one."""
        core, cls._preloaded = cls._preloaded, None
        return core if core is not None and core.settings == settings else cls(settings)

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.engine = engine if engine is not None else create_engine(settings)
        self.media = MediaFetcher(settings)
        self.pipeline = Pipeline(settings)
        self.models = Models(settings, self.engine)
        cache_bytes = int(settings.embedding_cache_mb * 2**20)
        self.cache = EmbeddingCache(cache_bytes) if cache_bytes else None
        self.embeddings = Embeddings(self.pipeline, self.models, self.media, self.cache)
        self.rerank = Rerank(self.pipeline, self.models, self.embeddings.outputs)
        self.classify = Classify(self.pipeline, self.models)
        self.tokenize = Tokenize(self.pipeline, self.models)
        # the dialects beside OpenAI's, over the same families
        self.cohere = CohereEmbed(self.embeddings, self.models)
        self.tei = Tei(self.models, self.embeddings, self.rerank, self.classify, self.tokenize)
        self.infinity = Infinity(self.models, self.embeddings, self.rerank, self.classify)

    async def start(self) -> None:
        await self.engine.start()  # the media fetcher opens its client at its first fetch

    async def stop(self) -> None:
        await self.engine.stop()
        await self.media.stop()
        logger.info("stopped: the engines are shut down")

    @property
    def stalled(self) -> list[str]:
        """Models whose batch loop has left work waiting past ENGINE_STALL_TIMEOUT."""
        return [name for name, model in self.engine.models.items() if model.heartbeat.stalled]

    @property
    def ready(self) -> bool:
        """Started, and no model's batch loop stalled."""
        return self.engine.ready and not self.stalled
