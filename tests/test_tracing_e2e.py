"""Tracing: no spans unless an exporter is configured; a configured exporter gets every span."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from server import ROOT, BentoServer, clean_env

pytestmark = pytest.mark.slow


class Collector:
    """A loopback OTLP/HTTP endpoint that keeps the bodies posted to it."""

    def __init__(self):
        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"


def exporter_options(endpoint: str) -> str:
    return (f"tracing.exporter_type=otlp tracing.sample_rate=1.0 tracing.otlp.protocol=http "
            f"tracing.otlp.endpoint={endpoint}")


@pytest.mark.parametrize("options, expected", [
    ("", {"excluded_urls": ".*"}),
    (exporter_options("http://127.0.0.1:9/v1/traces"),
     {"exporter_type": "otlp", "sample_rate": 1.0,
      "otlp": {"protocol": "http", "endpoint": "http://127.0.0.1:9/v1/traces"},
      "jaeger": {"protocol": "thrift"}}),  # BentoML's one non-empty default
])
def test_service_traces_no_url_unless_an_exporter_is_configured(options, expected):
    env = clean_env(BENTOML_CONFIG_OPTIONS=options)
    # what a BentoML worker does with the service's config, then what its tracing middleware reads
    code = ("import json, service\n"
            "from bentoml._internal.configuration.containers import BentoMLContainer as C\n"
            "service.InfinityEmbedding.inject_config()\n"
            "skipped = C.tracing_excluded_urls.get().url_disabled('http://h/v1/embeddings')\n"
            "print(json.dumps([service.InfinityEmbedding.config.get('tracing'), skipped,\n"
            "                  C.config.tracing.exporter_type.get()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    config, skipped, exporter = json.loads(out.strip().splitlines()[-1])
    assert config == expected
    assert skipped == (not options)  # no exporter: the middleware makes no span
    assert exporter == (expected.get("exporter_type"))


def test_configured_exporter_receives_the_request_spans(tmp_path, tiny_models):
    collector = Collector()
    env = {"MODEL_NAMES": str(tiny_models["embed"]), "SERVED_MODEL_NAMES": "tiny-embed",
           "BENTOML_CONFIG_OPTIONS": exporter_options(collector.endpoint)}
    srv = BentoServer(env, tmp_path / "server.log").start()
    try:
        response = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "tiny-embed", "input": ["hi"]})
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 30  # the batch span processor exports every 5 s
        while not any(b"/v1/embeddings" in body for _, body in collector.bodies):
            assert time.monotonic() < deadline, f"no span reached the exporter:\n{srv.logs()}"
            time.sleep(0.2)
    finally:
        srv.stop()
        collector.server.shutdown()
    assert {path for path, _ in collector.bodies} == {"/v1/traces"}
