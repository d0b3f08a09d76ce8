"""Bulk embedding of a corpus: `Embedder`, a stage for Ray Data's `map_batches`, and `run`, what
`embedding-worker bulk` runs (files in, Parquet out, on a local Ray cluster or an existing one).

The stage runs the service's own core and engine in its process, so a corpus is embedded with
the same prompts, truncation, dimensions, normalisation and output types as `/v1/embeddings`, and
the same bytes (floats are taken from the core's base64, as the server sends them). A row the API
would refuse (an empty text, a text over the window with truncate=NONE) gets its message in the
`error` column (and zeros for a vector); the other rows of its batch are embedded. Ray (the
`bulk` extra) is imported by `run` only: the service never imports it, and `Embedder` works
without it. OpenAI batch files (`Requests`, `run_requests`) go through the route table.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Settings
from ..core.core import Core
from ..core.encoding import dumps
from ..core.errors import APIError, BadRequest

# the output types and the numpy type of their values (binary: signed bytes of packed bits)
VALUE_TYPES = {"float": np.float32, "int8": np.int8, "uint8": np.uint8, "binary": np.int8,
               "ubinary": np.uint8}
_ITEM = re.compile(r"^input\[(\d+)\]")


class _InProcess:
    """A started Core of this process's own, driven from synchronous code (Ray Data's calls)."""

    def __init__(self, settings: dict[str, Any] | None):
        self.loop = asyncio.new_event_loop()
        self.core = Core(Settings(**(settings or {})))
        self.loop.run_until_complete(self.core.start())
        if not self.core.engine.ready:
            raise RuntimeError(f"the models did not load: {self.core.engine.failure}")

    def __del__(self) -> None:
        try:
            self.loop.run_until_complete(self.core.stop())
            self.loop.close()
        except Exception:  # noqa: BLE001 - an interpreter shutting down
            pass


class Embedder(_InProcess):
    """`map_batches(Embedder, fn_constructor_kwargs={...}, batch_format="pyarrow")`: each batch
    (a pyarrow Table, or a dict of columns) comes back with every column but the text, plus
    `embedding` (a fixed-size list of the output type's values; zeros where the row failed) and
    `error` (null, or the API's message for that row).

    `model`: a served name (default: the first model that embeds); the other options are
    `/v1/embeddings`' fields. `settings`: Settings' fields (MODEL_NAMES as `model_names`, ...)
    over the environment's."""

    def __init__(self, model: str | None = None, *, text_column: str = "text",
                 input_type: str | None = None, prompt_name: str | None = None,
                 dimensions: int | None = None, output_dtype: str = "float",
                 truncate: str | None = None, normalized: bool = True,
                 settings: dict[str, Any] | None = None):
        if output_dtype not in VALUE_TYPES:
            raise ValueError(f"output_dtype: {output_dtype!r}; expected one of "
                             f"{', '.join(VALUE_TYPES)}")
        super().__init__(settings)
        self.text_column = text_column
        model = model or self.core.models.default("embed")
        self.value_type = VALUE_TYPES[output_dtype]
        self.body: dict[str, Any] = {
            "model": model, "input_type": input_type, "prompt_name": prompt_name,
            "dimensions": dimensions, "output_dtype": output_dtype, "truncate": truncate,
            "normalized": normalized,
            "encoding_format": "base64" if output_dtype == "float" else "float"}
        # options are checked once, here: a bad one fails the job at its start, not each row
        self.dimensions = len(self._vectors(["dimensions"])[0])

    def _vectors(self, texts: list[Any]) -> list[np.ndarray]:
        result = self.loop.run_until_complete(
            self.core.embeddings.create({**self.body, "input": texts}))
        if self.value_type is np.float32:
            return [np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
                    for item in result["data"]]
        return [np.asarray(item["embedding"], dtype=self.value_type) for item in result["data"]]

    def embed(self, texts: list[Any]) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Each text's vector, or its error: a row the API refuses by name (`input[i]: ...`) is
        set aside and the rest embedded again."""
        vectors: list[np.ndarray | None] = [None] * len(texts)
        errors: list[str | None] = [None] * len(texts)
        pending = list(range(len(texts)))
        while pending:
            try:
                found = self._vectors([texts[i] for i in pending])
            except BadRequest as exc:
                named = _ITEM.match(exc.message)
                if named is None:  # not one row's fault: every row gets it
                    for i in pending:
                        errors[i] = exc.message
                    break
                row = pending.pop(int(named[1]))
                errors[row] = _ITEM.sub(self.text_column, exc.message, count=1)
                continue
            for i, vector in zip(pending, found):
                vectors[i] = vector
            break
        return vectors, errors

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        texts = table.column(self.text_column).to_pylist()
        vectors, errors = self.embed(texts)
        # a failed row's vector is zeros (Parquet cannot write a null fixed-size list entry);
        # its `error` says why
        values = np.zeros((len(texts), self.dimensions), dtype=self.value_type)
        for i, vector in enumerate(vectors):
            if vector is not None:
                values[i] = vector
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), self.dimensions)
        kept = table.drop_columns([self.text_column])
        return kept.append_column("embedding", embedding).append_column(
            "error", pa.array(errors, type=pa.string()))


class Requests(_InProcess):
    """OpenAI batch file lines (`{"custom_id", "method", "url", "body"}`) in a `line` column, each
    answered as the server answers its route (any route of any dialect: `api.jobs.dispatch`),
    into output lines of OpenAI's batch output shape."""

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        return pa.table({"line": [self.answer(line) for line in table.column("line").to_pylist()]})

    def answer(self, line: str) -> str:
        from .jobs import dispatch

        identity = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": None}
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str):
                raise ValueError("a line must be a JSON object with a string custom_id")
            identity["custom_id"] = request["custom_id"]
            if request.get("method", "POST") != "POST" or not isinstance(request.get("url"), str):
                raise ValueError("method must be POST and url a route, e.g. /v1/embeddings")
        except ValueError as exc:
            return dumps({**identity, "response": None,
                          "error": {"code": "invalid_request", "message": str(exc)}}).decode()
        try:
            status, body = 200, self.loop.run_until_complete(dispatch(
                self.core, {"route": request["url"], "body": request.get("body") or {}}))
        except APIError as exc:
            status, body = exc.status, exc.envelope()
        response = {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}
        return dumps({**identity, "response": response, "error": None}).decode()  # the server's


# Ray's CPUs left to Ray Data's own tasks (listing, reading, the checkpoint's filter, writing:
# I/O mostly), which take a whole CPU each: with the workers holding every CPU, they waited for
# them forever (seen on 2 CPUs)
SPARE_CPUS = 2
BATCHES_PER_BLOCK = 4
# input formats by file suffix -> Ray Data's reader
READERS = {"parquet": "read_parquet", "jsonl": "read_json", "json": "read_json", "csv": "read_csv"}


def input_format(source: str, given: str | None) -> str:
    if given:
        return given
    suffix = source.rstrip("/").rsplit(".", 1)[-1].lower()
    if suffix not in READERS:
        raise SystemExit(f"bulk: cannot tell the format of {source!r} from its name; give "
                         f"--format ({', '.join(READERS)})")
    return suffix


def _start_ray(address: str | None, workers: int, cpus_per_worker: int | None) -> int:
    """Ray started (a local cluster, or the one at `address`); each worker's CPUs (its threads)."""
    import ray

    if address:
        ray.init(address=address)
        machine = max(1, int(ray.cluster_resources().get("CPU", 1)) - SPARE_CPUS)
    else:  # a local cluster of this machine's CPUs, and the spare ones Ray Data's tasks take
        machine = os.cpu_count() or 1
        ray.init(num_cpus=machine + SPARE_CPUS, include_dashboard=False)
    return cpus_per_worker or max(1, machine // workers)


def run(source: str, target: str, *, embedder: dict[str, Any], id_column: str | None,
        file_format: str | None = None, workers: int = 1, cpus_per_worker: int | None = None,
        batch_size: int = 256, address: str | None = None,
        checkpoint: str | None = None) -> None:
    """Embed the texts of `source` (Parquet, JSON lines or CSV: a path, a directory, or what
    pyarrow's filesystems reach) into Parquet files under `target`, on Ray: a local cluster
    started for it, or the one at `address` (RAY_ADDRESS). With `id_column`, Ray Data's
    checkpoint keeps the ids written, so a rerun after a crash embeds only the rest."""
    import ray.data

    threads = _start_ray(address, workers, cpus_per_worker)
    context = ray.data.DataContext.get_current()
    if id_column is not None:
        from ray.data.checkpoint import CheckpointConfig

        # kept after success too: a rerun of a finished job then writes nothing twice
        context.checkpoint_config = CheckpointConfig(
            id_column=id_column, checkpoint_path=checkpoint or f"{target.rstrip('/')}.checkpoint",
            delete_checkpoint_on_success=False)
    # blocks of a few batches each (streamed, not shuffled): what a crash loses and a rerun
    # redoes is one block's rows
    dataset = getattr(ray.data, READERS[input_format(source, file_format)])(source).repartition(
        target_num_rows_per_block=batch_size * BATCHES_PER_BLOCK)
    columns = dataset.schema().names
    for role, column in (("--text-column", embedder.get("text_column", "text")),
                         ("--id-column", id_column)):
        if column is not None and column not in columns:
            raise SystemExit(f"bulk: {source} has no column {column!r} ({role}); its columns: "
                             f"{', '.join(columns)}")
    settings = {**embedder.pop("settings", {}), "cpu_threads": threads}
    embedded = dataset.map_batches(
        Embedder, fn_constructor_kwargs={**embedder, "settings": settings},
        batch_format="pyarrow", batch_size=batch_size, concurrency=workers, num_cpus=threads)
    embedded.write_parquet(target, min_rows_per_file=1,
                           max_rows_per_file=batch_size * BATCHES_PER_BLOCK)


def run_requests(source: str, target: str, *, settings: dict[str, Any], workers: int = 1,
                 cpus_per_worker: int | None = None, batch_size: int = 16,
                 address: str | None = None) -> int:
    """An OpenAI batch input file (JSON lines) answered into `target` (JSON lines of OpenAI's
    batch output), on Ray. Lines already answered in `target` (by `custom_id`) are skipped, so a
    killed run is resumed by running it again; a partial last line is dropped first. Returns
    the number of lines answered now."""
    if not Path(source).is_file():
        raise SystemExit(f"bulk: no file {source!r} (openai-batch reads a local JSON lines file)")
    done = _answered(target)
    pending = [line for line in Path(source).read_text().splitlines()
               if line.strip() and _custom_id(line) not in done]
    if not pending:
        return 0
    import ray.data

    threads = _start_ray(address, workers, cpus_per_worker)
    answers = ray.data.from_items([{"line": line} for line in pending]).map_batches(
        Requests, fn_constructor_kwargs={"settings": {**settings, "cpu_threads": threads}},
        batch_format="pyarrow", batch_size=batch_size, concurrency=workers, num_cpus=threads)
    written = 0
    with open(target, "a") as out:  # only the driver writes: a line is whole once flushed
        for batch in answers.iter_batches(batch_format="pyarrow"):
            for line in batch.column("line").to_pylist():
                out.write(line + "\n")
                written += 1
            out.flush()
    return written


def _custom_id(line: str) -> Any:
    try:
        return json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None


def _answered(target: str) -> set[Any]:
    """The custom_ids answered in `target`; a last line cut short by a kill is removed."""
    path = Path(target)
    if not path.is_file():
        return set()
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text)
    return {_custom_id(line) for line in text.splitlines()}
