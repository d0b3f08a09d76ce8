"""The RunPod "standard" job: one envelope for the RunPod handler and `POST /runsync`.

A job's `input` names a route of any dialect (`route` + `body`: `{"route": "/v2/embed", "body":
{...}}`, `/tei/<model>/embed` too), or an OpenAI route (`openai_route` + `openai_input`, as
RunPod's OpenAI proxy sends), or is an embedding or rerank body itself. Both transports run it here, so they give the
same output, the same error text and the same treatment of an unexpected exception.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..core.core import Core
from ..core.errors import APIError, BadRequest, NotFound
from ..core.schemas import without_nulls
from .routes import OPENAI_PATHS, find, openai_route

logger = logging.getLogger("embedding_worker")

JOB_SHAPES = (
    'expected {"route": "/v1/embeddings" | "/v2/embed" | "/embed" | ..., "body": {...}}, '
    '{"openai_route": "/v1/models" | "/v1/embeddings" | "/v1/rerank" | ..., "openai_input": {...}}, '
    'an embedding body {"model", "input", "modality"?}, or a rerank body {"model", "query", "docs"}'
)


async def dispatch(core: Core, job_input: Any) -> Any:
    """Route a job's `input` to the family operation it names."""
    if not isinstance(job_input, dict):
        raise BadRequest(f"job input must be a JSON object; {JOB_SHAPES}")
    job_input = without_nulls(job_input)  # its shape is told by the keys it gives
    if "route" in job_input:
        path, body = str(job_input["route"]), job_input.get("body")
        found = find(core, "GET" if body is None else "POST", path) or find(core, "POST", path)
        if found is None:
            raise NotFound(f"route {path!r} is not served; see the route table in README",
                           param="route")
        route, model = found
        return await route.bind(core)(body if body is not None else {}, model)
    if "openai_route" in job_input:
        named = openai_route(str(job_input["openai_route"]))
        if named is None:
            raise NotFound(
                f"openai_route {job_input['openai_route']!r} is not supported; expected one "
                f"of {', '.join(OPENAI_PATHS)}",
                param="openai_route",
            )
        return await named.bind(core)(job_input.get("openai_input") or {}, None)
    if "query" in job_input:
        return await core.rerank.create(job_input)
    if "input" in job_input:
        return await core.embeddings.create(job_input)
    raise BadRequest(f"unrecognised job input; {JOB_SHAPES}")


@dataclass
class JobResult:
    output: Any = None  # a route's body: an object, or a list for TEI's routes
    error: str | None = None  # the job failed with this message
    status: int = 200  # the HTTP status the same request would have had (for the log line)


async def run_job(core: Core, job_input: Any, job_id: str) -> JobResult:
    try:
        return JobResult(output=await dispatch(core, job_input))
    except APIError as exc:
        return JobResult(error=exc.message, status=exc.status)
    except Exception as exc:  # noqa: BLE001 - a job fails with a message, never silently
        logger.exception("job %s failed", job_id)
        return JobResult(error=f"internal error: {type(exc).__name__}", status=500)
