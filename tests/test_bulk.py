"""Bulk embedding (api/bulk.py): the Ray Data stage gives the server's bytes, rows the API refuses
get their message in an `error` column, and `embedding-worker bulk` runs files through a real local
Ray cluster (a child process) into Parquet with each id once."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import MINILM
from embedding_worker.api.bulk import Embedder, Placement, placement
from embedding_worker.api.bulk_progress import line
from embedding_worker.config import bundled_model_path
from embedding_worker.core.encoding import dumps

TEXTS = [f"passage {i}: the tides of autumn and a lantern in the harbour" + " again" * (i % 7)
         for i in range(40)]


@pytest.fixture(scope="module")
def embedder_settings():
    # as the dialect server serves MiniLM (DTYPES=auto: bf16 on a CPU with AMX)
    return {"model_names": bundled_model_path(), "served_model_names": MINILM}


def server_vectors(server, texts, output_dtype="float", **body) -> list[np.ndarray]:
    encoding = "base64" if output_dtype == "float" else "float"
    response = httpx.post(server.url + "/v1/embeddings", timeout=120, json={
        "model": MINILM, "input": texts, "output_dtype": output_dtype,
        "encoding_format": encoding, **body})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    if output_dtype == "float":
        return [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data]
    return [np.asarray(d["embedding"]) for d in data]


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"output_dtype": "int8", "input_type": "query"},
                                     {"output_dtype": "ubinary", "dimensions": 128}])
def test_the_stage_gives_the_servers_bytes(dialect_server, embedder_settings, options):
    stage = Embedder(MINILM, settings=embedder_settings, **options)
    out = stage({"id": np.arange(len(TEXTS)), "text": np.array(TEXTS, dtype=object)})
    assert out.column_names == ["id", "embedding", "error"]
    assert out.column("error").null_count == len(TEXTS)
    got = np.asarray(out.column("embedding").to_pylist())
    expected = np.asarray(server_vectors(dialect_server, TEXTS, **options))
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)  # bit for bit


def test_rows_the_api_refuses_get_their_message(embedder_settings):
    stage = Embedder(settings={**embedder_settings, "truncate_inputs": False,
                               "max_text_chars": 2500})
    texts = ["fine", "", None, "word " * 400, "also fine", "a " * 1300]
    out = stage({"id": np.arange(6), "text": np.array(texts, dtype=object)})
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[4] is None
    assert errors[1] == "text: empty string"
    assert errors[2] == "text: expected a string, got null"
    assert errors[3].startswith("text: it is 402 tokens, over the model's window of 256")
    # a 413 of one row's (MAX_TEXT_CHARS) is that row's too, not the job's
    assert errors[5] == "text: 2600 characters, at most 2500 per text (MAX_TEXT_CHARS)"
    vectors = np.asarray(out.column("embedding").to_pylist())
    assert not vectors[[1, 2, 3, 5]].any()  # zeros where the row failed
    alone = np.asarray(stage({"text": np.array(["fine", "also fine"], dtype=object)})
                       .column("embedding").to_pylist())
    np.testing.assert_array_equal(vectors[[0, 4]], alone)


def test_a_batch_bigger_than_a_request_is_embedded_in_requests(embedder_settings):
    """A batch of more rows than MAX_INPUT_ITEMS gives what one request would, and each batch's
    rows are reported done once."""
    done: list[int] = []
    small = Embedder(settings={**embedder_settings, "max_input_items": 4}, progress=done.append)
    texts = np.array([*TEXTS[:9], ""], dtype=object)
    out = small({"text": texts})
    whole = Embedder(settings=embedder_settings)({"text": texts})
    np.testing.assert_array_equal(np.asarray(out.column("embedding").to_pylist()),
                                  np.asarray(whole.column("embedding").to_pylist()))
    assert out.column("error").to_pylist() == [None] * 9 + ["text: empty string"]
    assert done == [10]


@pytest.mark.parametrize("cluster, given, expected", [
    ({"CPU": 4}, {}, Placement(1, 2, 0)),  # a local cluster of 2 cores (and 2 spare CPUs)
    ({"CPU": 3}, {}, Placement(1, 1, 0)),
    ({"CPU": 10}, {"workers": 3}, Placement(3, 2, 0)),
    ({"CPU": 18, "GPU": 4}, {}, Placement(4, 4, 1)),  # one worker per GPU
    ({"CPU": 18, "GPU": 4}, {"gpus": 0.5}, Placement(8, 2, 0.5)),
    ({"CPU": 18, "GPU": 4}, {"workers": 2, "cpus": 3}, Placement(2, 3, 1)),
    ({"CPU": 18, "GPU": 4}, {"gpus": 0}, Placement(1, 16, 0)),
])
def test_placement(cluster, given, expected):
    assert placement(cluster, **given) == expected


def test_the_progress_line():
    assert line(12288, 20000, 257.0) == \
        "12,288 of 20,000 rows (61 %), 257 rows/s, about 0:00:30 left"
    assert line(0, 20000, 0.0) == "0 of 20,000 rows (0 %), 0 rows/s"
    assert line(5000, None, 312.4) == "5,000 rows, 312 rows/s"  # a size not known
    assert line(4000, 1000, 100.0) == "4,000 of 1,000 rows (100 %), 100 rows/s"
    assert line(1, 2_000_000, 10.0).endswith("about 55:33:20 left")


def test_a_bad_option_fails_at_the_start(embedder_settings):
    with pytest.raises(Exception, match="dimensions: 999 is out of range"):
        Embedder(settings=embedder_settings, dimensions=999)


@pytest.mark.slow
def test_the_command_on_a_local_ray_cluster(tmp_path, embedder_settings):
    """Parquet and JSON lines in, Parquet out (a fixed-size list column, ids passed through, each
    once), through `embedding-worker bulk` on a Ray cluster it starts; the vectors are the
    stage's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [*TEXTS[:30], ""]
    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(len(texts))], "body": texts}),
                   tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"doc": f"d{i}", "body": t}) + "\n"
                                               for i, t in enumerate(texts)))
    env = {**os.environ, "MODEL_NAMES": bundled_model_path(), "SERVED_MODEL_NAMES": MINILM,
           "RAY_ADDRESS": ""}
    stage = Embedder(settings=embedder_settings, output_dtype="int8", text_column="body")
    expected = np.asarray(stage({"body": np.array(texts, dtype=object)})
                          .column("embedding").to_pylist())
    for source in ("in.parquet", "in.jsonl"):
        target = tmp_path / f"out-{source}"
        done = subprocess.run(
            [sys.executable, "-m", "embedding_worker", "bulk", str(tmp_path / source), str(target),
             "--text-column", "body", "--id-column", "doc", "--output-dtype", "int8",
             "--batch-size", "8"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        table = pq.read_table(target)
        assert str(table.schema.field("embedding").type) == "fixed_size_list<element: int8>[384]"
        rows = sorted(zip(table.column("doc").to_pylist(), table.column("embedding").to_pylist(),
                          table.column("error").to_pylist()), key=lambda r: int(r[0][1:]))
        assert [r[0] for r in rows] == [f"d{i}" for i in range(len(texts))]  # each id once
        np.testing.assert_array_equal(np.asarray([r[1] for r in rows]), expected)
        assert [r[2] for r in rows] == [None] * 30 + ["body: empty string"]
    # a column the input lacks: said before any model loads
    done = subprocess.run(
        [sys.executable, "-m", "embedding_worker", "bulk", str(tmp_path / "in.parquet"),
         str(tmp_path / "out-none"), "--text-column", "text"], env=env, capture_output=True,
        text=True, timeout=300)
    assert done.returncode != 0
    assert "has no column 'text' (--text-column); its columns: doc, body" in done.stderr


@pytest.mark.slow
def test_a_killed_job_rerun_writes_each_id_once(tmp_path):
    """The driver (and the local cluster it started) SIGKILLed once output is being written,
    then the same command again: every id in the output, each once (Ray Data's checkpoint of
    the ids written, kept after success, so a rerun of a finished job writes nothing)."""
    import signal
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "in"
    source.mkdir()
    for part in range(6):
        ids = list(range(part * 100, (part + 1) * 100))
        pq.write_table(pa.table({"id": ids, "text": [f"{TEXTS[i % 40]} ({i})" for i in ids]}),
                       source / f"part-{part}.parquet")
    target = tmp_path / "out"
    command = [sys.executable, "-m", "embedding_worker", "bulk", str(source), str(target),
               "--format", "parquet", "--id-column", "id", "--batch-size", "25",
               "--progress-every", "0.5"]
    env = {**os.environ, "MODEL_NAMES": bundled_model_path(), "RAY_ADDRESS": ""}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(target.glob("*.parquet")) and first.poll() is None:
        assert time.monotonic() < deadline, "no output"
        time.sleep(0.05)
    try:
        os.killpg(first.pid, signal.SIGKILL)  # the driver, its raylet and workers
    except ProcessLookupError:  # it had finished: the rerun must then write nothing
        pass
    first.wait()
    for rerun in range(2):  # a rerun, and a rerun of a finished job
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        ids = pq.read_table(list(target.glob("*.parquet"))).column("id").to_pylist()
        assert sorted(ids) == list(range(600))
        # the progress counts the rows left: those the checkpoint has are not counted again
        totals = {int(found) for found in re.findall(r"^bulk: \d+ of (\d+) rows", done.stderr,
                                                     re.MULTILINE)}
        assert len(totals) == 1 and totals.pop() <= 600
        if rerun:
            assert "bulk: 0 of 0 rows" in done.stderr
            assert "bulk: done, 0 rows in " in done.stderr


@pytest.mark.slow
def test_an_openai_batch_file_round_trip(tmp_path, embedder_settings):
    """OpenAI's batch input lines in (any route of this service), its batch output lines out,
    each body as the server's; a refused request is its status and error envelope, a line that
    is no request an error; a rerun answers nothing twice, and a line cut by a kill is redone."""
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": MINILM, "input": TEXTS[:3], "encoding_format": "base64"}},
        {"custom_id": "b", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": MINILM, "input": ["x"], "output_dtype": "int8", "dimensions": 64}},
        {"custom_id": "c", "method": "POST", "url": "/v1/rerank",
         "body": {"model": MINILM, "query": "q", "documents": ["a"]}},
        {"custom_id": "d", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": MINILM, "input": [""]}},
        {"custom_id": "e", "method": "POST", "url": "/v1/nothing", "body": {}},
    ]
    source, target = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    env = {**os.environ, "MODEL_NAMES": bundled_model_path(), "SERVED_MODEL_NAMES": MINILM,
           "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "embedding_worker", "bulk", str(source), str(target),
               "--format", "openai-batch"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = {a["custom_id"]: a for a in map(json.loads, target.read_text().splitlines())}
    assert set(answers) == {"a", "b", "c", "d", "e", None}
    assert all(a["id"].startswith("batch_req_") for a in answers.values())
    stage = Embedder(settings=embedder_settings)
    for name in ("a", "b"):
        response = answers[name]["response"]
        assert response["status_code"] == 200 and answers[name]["error"] is None
        body = next(line["body"] for line in lines if line["custom_id"] == name)
        expected = stage.loop.run_until_complete(stage.core.embeddings.create(body))
        assert response["body"]["data"] == json.loads(dumps(expected["data"]))  # as served
    assert answers["c"]["response"]["status_code"] == 400  # MiniLM does not rerank
    assert answers["d"]["response"]["body"]["error"]["message"] == "input[0]: empty string"
    assert answers["e"]["response"]["status_code"] == 404
    assert answers[None]["response"] is None and answers[None]["error"]["code"] == "invalid_request"
    # a kill left the last line half written: the rerun drops it and answers that request again
    text = target.read_text()
    kept = text.splitlines()[:-1]
    last = json.loads(text.splitlines()[-1])
    target.write_text("\n".join(kept) + "\n" + text.splitlines()[-1][:20])
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    ids = [json.loads(line)["custom_id"] for line in target.read_text().splitlines()]
    assert sorted(ids, key=str) == sorted([*answers], key=str)  # each once
    assert last["custom_id"] in ids


CRASHING = """
import os, sys
import ray, ray.data
from embedding_worker.api import bulk
marker = sys.argv[1]
class Crashing(bulk.Embedder):
    def __call__(self, batch):
        if not os.path.exists(marker):  # the first batch: its worker process dies inside it
            open(marker, "w").close()
            os._exit(1)
        return super().__call__(batch)
ray.init(address="local", num_cpus=(os.cpu_count() or 1) + bulk.SPARE_CPUS,
         include_dashboard=False)
rows = ray.data.from_items([{"id": i, "text": f"text {i}"} for i in range(200)],
                           override_num_blocks=4)
out = rows.map_batches(Crashing, fn_constructor_kwargs={"settings": {}}, batch_format="pyarrow",
                       batch_size=25, concurrency=1, num_cpus=1).take_all()
print("IDS", sorted(r["id"] for r in out))
"""


@pytest.mark.slow
def test_a_worker_killed_in_a_batch_is_replaced_and_its_batch_redone(tmp_path):
    marker = tmp_path / "crashed"
    env = {**os.environ, "MODEL_NAMES": bundled_model_path(), "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", CRASHING, str(marker)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.exists()  # it did crash
    found = next(line for line in done.stdout.splitlines() if line.startswith("IDS "))
    assert json.loads(found[4:]) == list(range(200))  # every row, each once


def start_head(tmp_path):
    """`ray start --head` with one GPU declared, once it says it has started (its raylet is up);
    a port taken between choosing it and binding it (`ray start` then exits) is chosen again."""
    import time

    from server import free_port

    for attempt in range(3):
        port, log = free_port(), tmp_path / f"head-{attempt}.log"
        with open(log, "w") as out:
            head = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
                 "--block", f"--port={port}", "--num-cpus=4", "--num-gpus=1",
                 "--include-dashboard=false", "--disable-usage-stats"],
                env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text() and head.poll() is None:
            assert time.monotonic() < deadline, f"no cluster: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        if head.poll() is None:
            return head, port
    raise AssertionError(f"ray start failed three times: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_the_command_on_an_existing_cluster_with_a_gpu(tmp_path):
    """`--address` joins a cluster started apart (`ray start --head`, one GPU declared): one
    worker holds the GPU, relative paths work, progress lines say rows, rate and time left."""
    import signal

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"{TEXTS[i % 40]} ({i})" for i in range(300)]
    pq.write_table(pa.table({"id": list(range(300)), "text": texts}), tmp_path / "in.parquet")
    head, port = start_head(tmp_path)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "embedding_worker", "bulk", "in.parquet", "out",
             "--id-column", "id", "--batch-size", "20", "--address", f"127.0.0.1:{port}",
             "--progress-every", "1"],
            env={**os.environ, "MODEL_NAMES": bundled_model_path(), "RAY_ADDRESS": ""},
            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # `ray start` and the daemons it started
        head.wait()
    said = [line for line in done.stderr.splitlines() if line.startswith("bulk: ")]
    assert said[0] == "bulk: 1 worker of 2 CPUs, 1 GPU"
    assert said[1].startswith("bulk: 0 of 300 rows (0 %)") or " of 300 rows (" in said[1]
    assert said[-1].startswith("bulk: done, 300 rows in ")
    ids = pq.read_table(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == list(range(300))


REMOTE = """
import json, sys
import fsspec
from embedding_worker.api import bulk
memory = fsspec.filesystem("memory")
lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                     "body": {"model": sys.argv[1], "input": [f"text {i}"], "dimensions": 8,
                              "encoding_format": "float"}})
         for i in range(6)]
memory.pipe("/in/first.jsonl", ("\\n".join(lines[:3]) + "\\n").encode())
memory.pipe("/in/all.jsonl", ("\\n".join(lines) + "\\n").encode())
first = bulk.run_requests("memory://in/first.jsonl", "memory://out/answers.jsonl", settings={})
text = memory.cat("/out/answers.jsonl").decode()
memory.pipe("/out/answers.jsonl", (text + text.splitlines()[0][:30]).encode())  # a cut line
again = bulk.run_requests("memory://in/all.jsonl", "memory://out/answers.jsonl", settings={})
print("RESULT", json.dumps({"first": first, "again": again,
                            "lines": memory.cat("/out/answers.jsonl").decode().splitlines()}))
"""


@pytest.mark.slow
def test_an_openai_batch_file_on_a_remote_filesystem(tmp_path):
    """A batch file read from and answered into a filesystem that is not local (fsspec's memory
    filesystem, through pyarrow's, as an object store would be): a rerun keeps the answers
    there, drops a cut line and answers only the rest."""
    env = {**os.environ, "MODEL_NAMES": bundled_model_path(), "SERVED_MODEL_NAMES": MINILM,
           "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", REMOTE, MINILM], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(next(line for line in done.stdout.splitlines()
                            if line.startswith("RESULT "))[7:])
    assert (found["first"], found["again"]) == (3, 3)
    answers = [json.loads(line) for line in found["lines"]]
    assert [a["custom_id"] for a in answers] == [f"r{i}" for i in range(6)]  # each once, in order
    assert all(a["response"]["status_code"] == 200 for a in answers)
    assert all(len(a["response"]["body"]["data"][0]["embedding"]) == 8 for a in answers)
