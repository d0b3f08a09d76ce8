"""Schema fuzzing of the running service from its own OpenAPI document.

A real `bentoml serve` process (tiny generated models) publishes /v1/openapi.json; schemathesis
loads it and generates requests for every documented operation: its coverage phase (boundary and
invalid values for every field, missing fields, wrong types and media types, unexpected methods),
then Hypothesis-driven fuzzing in positive (schema-valid) and negative (schema-invalid) modes.

Most generated `model` names are unknown (404), so a share of the cases gets a served model's name
instead, and `/runsync` jobs get embedding/rerank bodies as their `input`, so that the fuzzed
texts, `dimensions`, `top_n`, ... reach the engines too.

Every response must pass schemathesis' checks: no 5xx, a documented status code, the documented content type, a body valid
against the documented response schema. Failures are collected, not raised one by one: each test
runs its whole budget and then fails with every distinct finding (operation, check, status), each
with the smallest request that showed it as a curl command and the response it got.

Time: about 30 s of setup (tiny models, server start), then the per-operation budgets below
(~4 min for the 32 operations of every dialect on 2 cores).
`FUZZ_SECONDS` scales them (e.g. FUZZ_SECONDS=600 for a longer hunt); `FUZZ_SEED` fixes the seed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, Verbosity, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server import BentoServer  # noqa: E402

pytestmark = pytest.mark.slow

SERVED = ("tiny-embed", "tiny-rerank", "tiny-clip", "tiny-classify")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

# Seconds of fuzzing per operation (after its coverage cases), split between the two modes; the
# whole file stays under ~3 minutes on 2 cores (~100 requests/s).
_SCALE = float(os.environ.get("FUZZ_SECONDS", "120")) / 120
BUDGET_S = {
    "POST /v1/embeddings": 40 * _SCALE,
    "POST /v1/rerank": 35 * _SCALE,
    "POST /runsync": 35 * _SCALE,
    "GET /v1/models": 10 * _SCALE,
    # the other dialects' routes share the families' code: shorter budgets
    **{f"POST {path}": 5 * _SCALE for path in (
        "/v1/classify", "/v1/tokenize", "/v2/embed", "/v1/embed", "/rerank", "/embed",
        "/predict", "/tokenize", "/decode", "/similarity", "/", "/embeddings", "/classify",
        "/embed_sparse", "/embed_all")},
    **{f"POST {path}": 2 * _SCALE for path in ("/embeddings_image", "/embeddings_audio")},
    **{f"POST /tei/{{model}}{path}": 2 * _SCALE for path in (
        "/embed", "/rerank", "/predict", "/tokenize", "/decode", "/similarity", "",
        "/embed_sparse", "/embed_all")},
    **{f"GET {path}": 2 * _SCALE for path in (
        "/info", "/health", "/models", "/tei/{model}/info", "/tei/{model}/health")},
}
# where the steering checks that the engines were reached, not only validation
ENGINE_REACHED = ("POST /v1/embeddings", "POST /v1/rerank", "POST /runsync")
MAX_EXAMPLES = 100_000  # per mode: the time budget is what stops a run
SEED = os.environ.get("FUZZ_SEED")


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    srv = BentoServer({
        "MODEL_NAMES": ";".join(str(tiny_models[k]) for k in ("embed", "rerank", "clip", "classify")),
        "SERVED_MODEL_NAMES": ";".join(SERVED),
        "BATCH_SIZES": "8",
        # small limits, so that generated lists cross them (413) as well as stay under
        "MAX_INPUT_ITEMS": "16",
        "MAX_RERANK_DOCUMENTS": "16",
        "MAX_IMAGES_PER_REQUEST": "4",
        "HTTP_CLIENT_TIMEOUT": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }, tmp_path_factory.mktemp("fuzz") / "server.log")
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def schema(server):
    config = schemathesis.Config.from_dict({
        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx"]}},
    })
    return schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json", config=config)


def operation(schema, label: str):
    method, path = label.split(" ", 1)
    return schema[path][method]


def test_every_documented_operation_is_fuzzed(schema):
    documented = {result.ok().label for result in schema.get_all_operations()}
    assert documented == set(BUDGET_S)


# --- generation ---------------------------------------------------------------------------------


def coverage_cases(op) -> list:
    """Schemathesis' coverage phase for one operation, both modes. It is not public API (the pytest
    plugin and the CLI run it); if it moves, fuzzing alone still runs."""
    try:
        from schemathesis.generation.drivers import CoverageGenerator
        from schemathesis.generation.feedback import FeedbackSources
        from schemathesis.generation.overrides import Override

        return list(CoverageGenerator(
            operation=op,
            generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=op.schema.config.generation_for(operation=op, phase="coverage"),
            auth_storage=None,
            override=Override(),
            feedback=FeedbackSources(),
        ))
    except (ImportError, TypeError, AttributeError) as exc:  # pragma: no cover - schemathesis moved
        print(f"coverage phase unavailable ({type(exc).__name__}: {exc}); fuzzing only")
        return []


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False  # raw bytes: the negative mode's bodies for other media types
    return True


def bodies(schema, label: str, mode: GenerationMode) -> st.SearchStrategy:
    cases = operation(schema, label).as_strategy(generation_mode=mode)
    return cases.map(lambda case: case.body).filter(_is_json)


@st.composite
def steered(draw, op, mode: GenerationMode, job_inputs: st.SearchStrategy | None):
    """A generated case, three times in four pointed at a served model (mostly one that fits the
    operation, sometimes one that lacks the capability); /runsync jobs get
    embedding or rerank bodies (bare, or as openai_input) half of the time."""
    case = draw(op.as_strategy(generation_mode=mode))
    if isinstance(case.path_parameters, dict) and "model" in case.path_parameters \
            and draw(st.integers(0, 3)):
        case.path_parameters["model"] = draw(st.sampled_from(SERVED))
    body = case.body
    if job_inputs is not None and isinstance(body, dict) and draw(st.booleans()):
        body["input"] = draw(job_inputs)
    target = body.get("input") if job_inputs is not None and isinstance(body, dict) else body
    if isinstance(target, dict) and isinstance(target.get("openai_input"), dict):
        target = target["openai_input"]
    if isinstance(target, dict) and draw(st.integers(0, 3)):
        label = op.label
        fitting = ("tiny-classify" if "classify" in label or "predict" in label else
                   "tiny-rerank" if "query" in target else "tiny-embed")
        target["model"] = draw(st.one_of(st.just(fitting), st.sampled_from(SERVED)))
        if draw(st.integers(0, 3)) == 0:
            target["modality"] = draw(st.sampled_from(["text", "image", "audio", "TEXT"]))
    return case


def job_inputs(schema, mode: GenerationMode) -> st.SearchStrategy:
    embed = bodies(schema, "POST /v1/embeddings", mode)
    rerank = bodies(schema, "POST /v1/rerank", mode)
    routes = st.sampled_from(["/v1/embeddings", "/v1/rerank", "/v1/models", "/openai/v1/embeddings",
                              "/rerank", "/v1/nope"])
    wrapped = st.builds(lambda route, body: {"openai_route": route, "openai_input": body},
                        routes, st.one_of(embed, rerank))
    return st.one_of(embed, rerank, wrapped)


# --- running and recording ----------------------------------------------------------------------


@dataclass
class Finding:
    """One distinct failure: an operation, a check, a status; up to three example requests
    with different responses, the smallest of each."""

    operation: str
    check: str
    status: int | None
    count: int = 0
    examples: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def add(self, curl: str, response: str, detail: str) -> None:
        self.count += 1
        variant = response[:80] if response else detail[:80]
        old = self.examples.get(variant)
        if old is not None and len(curl) < len(old[0]):
            self.examples[variant] = (curl, response, detail)
        elif old is None and len(self.examples) < 3:
            self.examples[variant] = (curl, response, detail)

    def __str__(self) -> str:
        lines = [f"[{self.operation}] {self.check} (status {self.status}; {self.count} requests)"]
        for curl, response, detail in self.examples.values():
            lines += [f"  request:  {curl}", f"  response: {response}",
                      "  detail:   " + detail.replace("\n", "\n            ")]
        return "\n".join(lines)


@dataclass
class Fuzzer:
    base_url: str
    session: requests.Session = field(default_factory=requests.Session)
    statuses: Counter = field(default_factory=Counter)
    findings: dict[tuple, Finding] = field(default_factory=dict)
    sent: int = 0
    completed: int = 0

    def exercise(self, case) -> None:
        self.sent += 1
        label = case.operation.label
        try:
            response = case.call(base_url=self.base_url, session=self.session, timeout=30)
        except requests.RequestException as exc:
            self._record(case, label, f"no response: {type(exc).__name__}", None, None, str(exc))
            return
        self.statuses[response.status_code] += 1
        if response.status_code == 200 and _json(response).get("status", "COMPLETED") == "COMPLETED":
            self.completed += 1  # a /runsync job answers 200 even when it FAILED
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            for failure in group.exceptions:
                self._record(case, label, f"{failure.title}", response.status_code, response,
                             failure.message)

    def _record(self, case, label, check, status, response, detail) -> None:
        curl = case.as_curl_command(base_url=self.base_url)
        shown = "" if response is None else (
            f"{response.status_code} {_content_type(response)} {response.text[:600]}")
        finding = self.findings.setdefault((label, check, status), Finding(label, check, status))
        finding.add(curl, shown, detail.strip()[:800])

    def report(self) -> str:
        return "\n\n".join(str(f) for f in sorted(self.findings.values(), key=lambda f: f.check))


def _content_type(response) -> str | None:
    value = response.headers.get("content-type")  # schemathesis keeps every header as a list
    return value[0] if isinstance(value, list) and value else value


def _json(response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def tracebacks(log: str, limit: int = 10) -> list[str]:
    """The distinct tracebacks in a log, each as its last three lines."""
    found: dict[str, None] = {}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = i + 1
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end]):
                end += 1
            found.setdefault("\n".join(lines[max(i, end - 2):end + 1]), None)
    return list(found)[:limit]


class _OutOfTime(Exception):
    """Ends a Hypothesis run when its time budget is spent (Hypothesis has no time limit)."""


def fuzz(fuzzer: Fuzzer, strategy: st.SearchStrategy, seconds: float) -> None:
    deadline = time.monotonic() + seconds

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False,
              verbosity=Verbosity.quiet)  # quiet: no "Falsifying example" for the _OutOfTime stop
    @given(case=strategy)
    def run(case) -> None:
        if time.monotonic() > deadline:
            raise _OutOfTime
        fuzzer.exercise(case)

    if SEED is not None:
        run = hypothesis.seed(int(SEED))(run)
    try:
        run()
    except _OutOfTime:
        pass
    except Unsatisfiable:
        pass  # negative mode with nothing to negate (GET /v1/models takes no parameters)


@pytest.mark.parametrize("label", list(BUDGET_S))
def test_responses_conform_to_the_openapi_document(schema, server, label):
    op = operation(schema, label)
    fuzzer = Fuzzer(server.url)
    started = time.monotonic()
    log_start = len(server.logs())

    for case in coverage_cases(op):
        fuzzer.exercise(case)
    covered = fuzzer.sent

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        inner = job_inputs(schema, mode) if label == "POST /runsync" else None
        fuzz(fuzzer, steered(op, mode, inner), BUDGET_S[label] / 2)

    elapsed = time.monotonic() - started
    print(f"\n{label}: {fuzzer.sent} requests ({covered} coverage) in {elapsed:.0f}s; "
          f"statuses {dict(sorted(fuzzer.statuses.items()))}, {fuzzer.completed} completed; "
          f"{len(fuzzer.findings)} findings")
    assert not fuzzer.findings, (
        f"{len(fuzzer.findings)} distinct findings from {fuzzer.sent} requests to {label}:\n\n"
        f"{fuzzer.report()}\n\nserver tracebacks meanwhile (distinct, last lines):\n"
        + "\n".join(tracebacks(server.logs()[log_start:]))
    )
    if label in ENGINE_REACHED:
        # the steering must reach the engines, not only the validation paths
        assert fuzzer.completed >= 10, dict(fuzzer.statuses)
