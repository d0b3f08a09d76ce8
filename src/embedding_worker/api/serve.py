"""`embedding-worker serve`: the BentoML service in one process.

`bentoml serve` starts an arbiter that imports BentoML and the service, then a worker process
that imports them again and serves: two processes, two imports of everything, for one worker.
Here the process that reads the settings serves the very app BentoML's worker would
(`Service.to_asgi`: the routes, the batchable methods, the lifecycle hooks, `/metrics`, the
middleware) with uvicorn, as BentoML's worker does. What the arbiter added is restarting a worker
that died; a container's restart policy does that (docs/deployment.md). `bentoml serve` keeps
working, and is tested beside this.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import startgc
from ..config import Settings, prepare_single_process
from . import readahead


def serve(settings: Settings, service_dir: Path) -> None:
    readahead.begin(settings)  # first: the reads it starts are what the imports below wait on
    prepare_single_process()  # before BentoML is imported: /metrics reads its directory
    from ..core.core import Core

    # the weights load while BentoML and the service import (~0.3 s of a start, measured)
    core = Core.preload(settings)
    readahead.remember_when_ready(settings, lambda: core.ready)
    sys.path.insert(0, str(service_dir))
    import uvicorn
    from bentoml import server_context

    import service  # the module `bentoml serve` would load

    definition = service.InfinityEmbedding
    server_context.service_name = definition.name
    server_context.service_type = "entry_service"
    app = definition.to_asgi(is_main=True)
    startgc.resume()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging, configured by the caller
        server_header=False,
        # SIGTERM: stop accepting, finish what was accepted (within the request deadline), then
        # the shutdown hook stops the engines
        timeout_graceful_shutdown=int(settings.request_timeout) + 5,
    )
