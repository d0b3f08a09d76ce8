"""A minimal stand-in for RunPod's job queue on loopback: hands out jobs, collects results."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJobQueue:
    def __init__(self, jobs: list[dict]):
        self.pending = list(jobs)
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.expected = len(jobs)
        queue = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802  job-take (the SDK also GETs other endpoints, e.g. job-stop)
                take = urllib.parse.urlparse(self.path).path.startswith(("/job-take/", "/job-take-batch/"))
                with queue.lock:
                    job = queue.pending.pop(0) if take and queue.pending else None
                if job is None:
                    self.send_response(204)
                    self.end_headers()
                    return
                body = json.dumps(job).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802  job-done: the SDK posts json.dumps(result) as the body
                job_id = urllib.parse.urlparse(self.path).path.rsplit("/", 1)[1]
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with queue.lock:
                    queue.results[job_id] = json.loads(raw)
                    if len(queue.results) >= queue.expected:
                        queue.done.set()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def env(self) -> dict[str, str]:
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_POD_ID": "test-worker",
        }

    def __enter__(self) -> "FakeJobQueue":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
