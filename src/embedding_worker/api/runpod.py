"""RunPod serverless worker: a job's `input` goes through the same job envelope as `/runsync`."""

from __future__ import annotations

import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import startgc
from ..config import Settings
from ..core.core import Core
from ..core.encoding import jsonable
from ..observability.logs import one_line, request_log
from .jobs import run_job

logger = logging.getLogger("embedding_worker")


def make_handler(core: Core):
    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        # Infinity binds its batch loops to the running event loop: start them in the SDK's loop.
        await core.start()
        job_input = job.get("input")
        route = job_input.get("openai_route", "job") if isinstance(job_input, dict) else "job"
        with request_log("JOB", str(route), core.settings.log_requests) as record:
            result = await run_job(core, job_input, str(job.get("id")))
            record.status = result.status
            if result.error is not None:
                return {"error": result.error}  # a top-level "error" string fails the job
            # The SDK posts results with json.dumps and silently drops what it cannot
            # serialise (the client then waits forever): hand it plain Python only.
            return jsonable(result.output)

    return handler


def cpu_name_without_a_subprocess() -> None:
    """The SDK's debugger module asks py-cpuinfo for the CPU's name at import, and py-cpuinfo
    starts a second Python to find it: 1.2 s of a 2.4 s start (docs/performance.md). On Linux the
    name is /proc/cpuinfo's `model name`, which is what it reports there: hand it that."""
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
        import cpuinfo
    except (OSError, ImportError):
        return
    if names:
        cpuinfo.get_cpu_info = lambda: {"brand_raw": names[0]}


def start(settings: Settings) -> None:
    """Load the weights before taking jobs (a cold start pays it once), then run the SDK loop.
    The SDK reads its own flags (`--rp_serve_api`, ...) from sys.argv."""
    cpu_name_without_a_subprocess()
    # the SDK's import (~0.5 s) overlaps the weights' loading rather than precede it
    with ThreadPoolExecutor(1) as pool:
        sdk = pool.submit(importlib.import_module, "runpod")
        core = Core(settings)
        try:
            core.engine.load()
        except Exception as exc:  # RunPod restarts a worker that exits; say why in one line
            logger.error("model loading failed: %s", one_line(exc))
            raise SystemExit(1) from None
        runpod = sdk.result()
    startgc.resume()
    runpod.serverless.start({
        "handler": make_handler(core),
        "concurrency_modifier": lambda _current: settings.runpod_max_concurrency,
    })
