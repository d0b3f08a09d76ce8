"""Bulk embedding of a corpus: `Embedder`, a stage for Ray Data's `map_batches`, and `run`, what
`embedding-worker bulk` runs (files in, Parquet out, on a local Ray cluster or an existing one).

The stage runs the service's own core and engine in its process, so a corpus is embedded with
the same prompts, truncation, dimensions, normalisation and output types as `/v1/embeddings`, and
the same bytes (floats are taken from the core's base64, as the server sends them). A row the API
would refuse (an empty text, a text over the window with truncate=NONE or over MAX_TEXT_CHARS)
gets its message in the `error` column (and zeros for a vector); the other rows of its batch are
embedded. Ray (the `bulk` extra) is imported by `run` only: the service never imports it, and
`Embedder` works without it. OpenAI batch files (`Requests`, `run_requests`) go through the route table.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import Settings
from ..core.core import Core
from ..core.encoding import dumps
from ..core.errors import APIError

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
    over the environment's. `progress`: called with each batch's row count once it is done."""

    def __init__(self, model: str | None = None, *, text_column: str = "text",
                 input_type: str | None = None, prompt_name: str | None = None,
                 dimensions: int | None = None, output_dtype: str = "float",
                 truncate: str | None = None, normalized: bool = True,
                 settings: dict[str, Any] | None = None,
                 progress: Callable[[int], None] | None = None):
        if output_dtype not in VALUE_TYPES:
            raise ValueError(f"output_dtype: {output_dtype!r}; expected one of "
                             f"{', '.join(VALUE_TYPES)}")
        super().__init__(settings)
        self.text_column, self.progress = text_column, progress
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
        """Each text's vector, or its error, in requests of at most MAX_INPUT_ITEMS texts (a
        batch may be bigger than a request may)."""
        most = self.core.settings.max_input_items
        vectors: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for at in range(0, len(texts), most):
            found, failed = self._embed(texts[at:at + most])
            vectors += found
            errors += failed
        return vectors, errors

    def _embed(self, texts: list[Any]) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Each text's vector, or its error: a row the API refuses by name (`input[i]: ...`) is
        set aside and the rest embedded again; an error of no row's that is the server's (5xx)
        fails the batch, for Ray to retry."""
        vectors: list[np.ndarray | None] = [None] * len(texts)
        errors: list[str | None] = [None] * len(texts)
        pending = list(range(len(texts)))
        while pending:
            try:
                found = self._vectors([texts[i] for i in pending])
            except APIError as exc:  # 400, and 413 for a text over MAX_TEXT_CHARS
                named = _ITEM.match(exc.message)
                if named is None:  # not one row's fault: every row gets a caller's mistake
                    if exc.status >= 500:
                        raise
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
        if self.progress is not None:
            self.progress(len(texts))
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


@dataclass(frozen=True)
class Placement:
    """How many model processes (Ray actors) a job runs, and what each holds: its CPUs (the
    engine's threads) and GPUs."""
    workers: int
    cpus: int
    gpus: float

    def __str__(self) -> str:
        each = f"{self.cpus} CPU{'s' * (self.cpus != 1)}"
        if self.gpus:
            each += f", {self.gpus:g} GPU{'s' * (self.gpus != 1)}"
        return f"{self.workers} worker{'s' * (self.workers != 1)} of {each}"


def placement(cluster: dict[str, float], workers: int | None = None, cpus: int | None = None,
              gpus: float | None = None) -> Placement:
    """Where a GPU is, one worker per GPU (the engine runs on it); else one worker of every CPU
    but the spare ones Ray Data's tasks take. What is given wins."""
    found = int(cluster.get("GPU", 0))
    if gpus is None:
        gpus = 1.0 if found else 0.0
    if workers is None:
        workers = max(1, int(found // gpus)) if gpus and found else 1
    if cpus is None:
        cpus = max(1, (int(cluster.get("CPU", 1)) - SPARE_CPUS) // workers)
    return Placement(workers, cpus, gpus)


def _start_ray(address: str | None, workers: int | None, cpus: int | None,
               gpus: float | None) -> Placement:
    """Ray started (a local cluster of this machine, or the one at `address`), and the job's
    placement on it, said on stderr."""
    import ray

    if ray.is_initialized():  # called from a program of the user's own on Ray: its cluster
        pass
    elif address:
        ray.init(address=address)
    else:  # this machine's CPUs, and the spare ones Ray Data's tasks take
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + SPARE_CPUS,
                 include_dashboard=False)
    cluster = ray.cluster_resources()
    where = placement(cluster, workers, cpus, gpus)
    if where.gpus and not cluster.get("GPU") and not address:
        raise SystemExit(f"bulk: {where.gpus:g} GPU per worker asked, and this machine has none")
    print(f"bulk: {where}", file=sys.stderr, flush=True)
    return where


def _actors(where: Placement) -> dict[str, Any]:
    """map_batches' options that put the stage on `where`'s workers."""
    import ray.data

    return {"compute": ray.data.ActorPoolStrategy(size=where.workers), "num_cpus": where.cpus,
            "num_gpus": where.gpus or None}


def _filesystem(uri: str) -> tuple[Any, str]:
    """The filesystem of a path or URI, and the path in it: pyarrow's (s3://, gs://, abfs://,
    hdfs://, file://), else fsspec's for its schemes (memory://, hf://, those of gcsfs, adlfs,
    ... where installed)."""
    import pyarrow as pa
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), _absolute(uri)
    try:
        return fs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:
        import fsspec

        try:
            filesystem, path = fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as exc:
            raise SystemExit(f"bulk: cannot reach {uri!r}: {exc}") from exc
        return fs.PyFileSystem(fs.FSSpecHandler(filesystem)), path


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def row_count(source: str, file_format: str) -> int | None:
    """The rows to embed, where they can be known cheaply: Parquet from its footers (local or
    remote), local JSON lines by their lines; else None (the progress shows no end)."""
    import pyarrow.dataset as ds

    if file_format == "parquet":
        filesystem, path = _filesystem(source)
        return ds.dataset(path, format="parquet", filesystem=filesystem).count_rows()
    if file_format != "jsonl" or "://" in source:
        return None
    # a directory: the files Ray Data's JSON reader takes by default (uncompressed ones)
    files = [source] if os.path.isfile(source) else sorted(
        str(f) for f in Path(source).rglob("*") if f.is_file() and f.suffix in (".json", ".jsonl"))
    rows = 0
    for name in files:
        with open(name, "rb") as stream:
            rows += sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 24), b""))
    return rows


def _checkpointed(path: str) -> int:
    """Rows Ray Data's checkpoint says are written (a rerun skips them)."""
    import pyarrow.dataset as ds

    filesystem, inner = _filesystem(path)
    try:
        return ds.dataset(inner, format="parquet", filesystem=filesystem).count_rows()
    except (FileNotFoundError, OSError, ValueError):
        return 0


def run(source: str, target: str, *, embedder: dict[str, Any], id_column: str | None,
        file_format: str | None = None, workers: int | None = None, cpus_per_worker: int | None = None,
        gpus_per_worker: float | None = None, batch_size: int = 256, address: str | None = None,
        checkpoint: str | None = None, progress_every: float = 10.0) -> None:
    """Embed the texts of `source` (Parquet, JSON lines or CSV: a path, a directory, or what
    pyarrow's filesystems reach) into Parquet files under `target`, on Ray: a local cluster
    started for it, or the one at `address` (RAY_ADDRESS). With `id_column`, Ray Data's
    checkpoint keeps the ids written, so a rerun after a crash embeds only the rest. Progress
    (rows, rows/s, time left) goes to stderr every `progress_every` seconds."""
    import ray
    import ray.data

    from .bulk_progress import Counter, Reporter, Tally

    file_format = input_format(source, file_format)
    # Ray Data's checkpoint takes only absolute paths; the workers' directory is not ours
    source, target = _absolute(source), _absolute(target)
    where = _start_ray(address, workers, cpus_per_worker, gpus_per_worker)
    context = ray.data.DataContext.get_current()
    total = row_count(source, file_format)
    if id_column is not None:
        from ray.data.checkpoint import CheckpointConfig

        checkpoint = _absolute(checkpoint or f"{target.rstrip('/')}.checkpoint")
        # kept after success too: a rerun of a finished job then writes nothing twice
        context.checkpoint_config = CheckpointConfig(
            id_column=id_column, checkpoint_path=checkpoint, delete_checkpoint_on_success=False)
        if total is not None:
            total = max(0, total - _checkpointed(checkpoint))
    # blocks of a few batches each (streamed, not shuffled): what a crash loses and a rerun
    # redoes is one block's rows
    dataset = getattr(ray.data, READERS[file_format])(source).repartition(
        target_num_rows_per_block=batch_size * BATCHES_PER_BLOCK)
    columns = dataset.schema().names
    for role, column in (("--text-column", embedder.get("text_column", "text")),
                         ("--id-column", id_column)):
        if column is not None and column not in columns:
            raise SystemExit(f"bulk: {source} has no column {column!r} ({role}); its columns: "
                             f"{', '.join(columns)}")
    counter = ray.remote(Counter).options(num_cpus=0).remote()
    embedder = dict(embedder)  # the caller's stays as it was
    settings = {**embedder.pop("settings", {}), "cpu_threads": where.cpus}
    embedded = dataset.map_batches(
        Embedder, fn_constructor_kwargs={**embedder, "settings": settings,
                                         "progress": Tally(counter)},
        batch_format="pyarrow", batch_size=batch_size, **_actors(where))
    with Reporter(counter, total, every=progress_every):
        embedded.write_parquet(target, min_rows_per_file=1,
                               max_rows_per_file=batch_size * BATCHES_PER_BLOCK)


def run_requests(source: str, target: str, *, settings: dict[str, Any],
                 workers: int | None = None, cpus_per_worker: int | None = None,
                 gpus_per_worker: float | None = None, batch_size: int = 16,
                 address: str | None = None) -> int:
    """An OpenAI batch input file (JSON lines; a path or a URI pyarrow's filesystems reach)
    answered into `target` (JSON lines of OpenAI's batch output, local or remote), on Ray.
    Lines already answered in `target` (by `custom_id`) are skipped, so a killed run is resumed
    by running it again. A local target is appended to line by line (a partial last line is
    dropped first); a remote one (an object store cannot append) is written anew with the lines
    it had and the new ones, and appears whole when the run ends. Returns the number of lines
    answered now."""
    source_fs, source_path = _filesystem(source)
    from pyarrow import fs

    if source_fs.get_file_info(source_path).type != fs.FileType.File:
        raise SystemExit(f"bulk: no file {source!r} (openai-batch reads one JSON lines file)")
    target_fs, target_path = _filesystem(target)
    kept = _answered(target_fs, target_path)
    done = {_custom_id(line) for line in kept}
    with source_fs.open_input_stream(source_path) as stream:
        lines = stream.read().decode().splitlines()
    pending = [line for line in lines if line.strip() and _custom_id(line) not in done]
    if not pending:
        return 0
    import ray.data

    where = _start_ray(address, workers, cpus_per_worker, gpus_per_worker)
    answers = ray.data.from_items([{"line": line} for line in pending]).map_batches(
        Requests, fn_constructor_kwargs={"settings": {**settings, "cpu_threads": where.cpus}},
        batch_format="pyarrow", batch_size=batch_size, **_actors(where))
    local = isinstance(target_fs, fs.LocalFileSystem)
    written = 0
    # only the driver writes: locally a line is whole once flushed
    with (open(target_path, "a") if local else
          target_fs.open_output_stream(target_path)) as out:
        if not local:
            out.write("".join(line + "\n" for line in kept).encode())
        for batch in answers.iter_batches(batch_format="pyarrow"):
            text = "".join(line + "\n" for line in batch.column("line").to_pylist())
            out.write(text if local else text.encode())
            written += batch.num_rows
            out.flush()
    return written


def _custom_id(line: str) -> Any:
    try:
        return json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None


def _answered(filesystem: Any, path: str) -> list[str]:
    """The lines answered in `path` already; a last line cut short by a kill is dropped (and,
    on a local file, removed from it)."""
    from pyarrow import fs

    if filesystem.get_file_info(path).type != fs.FileType.File:
        return []
    with filesystem.open_input_stream(path) as stream:
        text = stream.read().decode()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        if isinstance(filesystem, fs.LocalFileSystem):
            Path(path).write_text(text)
    return text.splitlines()
