"""Outputs beyond one dense vector per text, for models that have them: sparse vectors (SPLADE;
BGE-M3's lexical weights) and multi-vectors (BGE-M3's ColBERT vectors; a ColBERT model's, its
query texts marked `Query` for the engine to encode as queries), asked for on `/v1/embeddings`
(`return_sparse`; Jina's `return_multivector`, with `return_dense`), TEI's `/embed_sparse` and
RunPod jobs.

Every output a request asks for comes from one engine call per text: the engine's row of a
model of several outputs (`MultiRow`) holds them all, computed in one forward pass, and the
texts share the model's batches with its dense requests (the same batcher). `check_output`, what
a request may ask of a model's dense vectors, is here for both families.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine.base import ModelBackend, MultiRow, Query, SparseRow
from . import schemas
from .encoding import as_matrix, encode_rows, quantize, vectors
from .errors import BadRequest, too_many
from .options import Prompt, choose_prompt
from .schemas import EmbeddingRequest

if TYPE_CHECKING:
    from .embed import EmbedJob, Embeddings

# what a request can ask for -> the capability a model needs for it
CAPABILITY = {"dense": "embed", "sparse": "sparse_embed", "multi": "multi_embed"}


@dataclass
class Parts:
    rows: list[Any]  # the engine's rows, one per input
    tokens: int
    prompt: Prompt


def dense_of(row: Any) -> Any:
    return row.dense if isinstance(row, MultiRow) else row


def sparse_of(row: Any) -> SparseRow:
    return row.sparse if isinstance(row, MultiRow) else row


def several_outputs(model: ModelBackend) -> bool:
    """Its rows are not one dense vector each (the embedding cache keeps only those)."""
    return not model.info.capabilities.isdisjoint({"sparse_embed", "multi_embed"})


class Outputs:
    def __init__(self, embeddings: Embeddings):
        self.embeddings = embeddings

    async def parts(self, job: EmbedJob, wanted: set[str]) -> Parts:
        """The engine's rows for `job`'s texts, from a model that has every output `wanted`."""
        if any(not isinstance(item, str) for item in job.inputs):
            raise BadRequest(f"{job.field}: sparse and multi-vectors are of texts; images and "
                             f"audio have none", param=job.field)
        pipeline = self.embeddings.pipeline

        async def run(model: ModelBackend, texts: list[str], served: Any) -> list[Any]:
            submit = self.embeddings.batcher(model).submit
            call = pipeline.batched(model, submit(texts), texts)
            found, served.tokens = await pipeline.compute(model, call, served)
            pipeline.raise_faults(model, job.field, found)
            return found

        return await self._texts(job, [CAPABILITY[part] for part in sorted(wanted)], run)

    async def token_states(self, job: EmbedJob) -> Parts:
        """Each text's token states (TEI's `/embed_all`): the encoder's last hidden states, a
        row per token, special tokens included."""
        pipeline = self.embeddings.pipeline

        async def run(model: ModelBackend, texts: list[str], served: Any) -> list[Any]:
            found = await pipeline.compute(model, model.token_states(texts), served)
            served.tokens = sum(map(len, found)) - model.info.special_tokens * len(found)
            return found

        return await self._texts(job, ["token_embed"], run)

    async def _texts(self, job: EmbedJob, capabilities: list[str],
                     run: Callable[[ModelBackend, list[str], Any], Awaitable[list[Any]]]) -> Parts:
        """`run` on `job`'s texts as the model gets them (prompt and truncation as for dense
        vectors), admitted and timed like any embedding request."""
        embeddings = self.embeddings
        pipeline, field = embeddings.pipeline, job.field
        if len(job.inputs) > pipeline.settings.max_input_items:
            raise too_many(field, len(job.inputs), pipeline.settings.max_input_items,
                           "MAX_INPUT_ITEMS")
        model = embeddings.models.get(job.model)
        for capability in capabilities:
            embeddings.models.require(job.model, capability)
        prompt = choose_prompt(model, job.prompt_name, job.input_type, job.task)
        texts = [str(item) for item in job.inputs]
        positions = list(range(len(texts)))
        pipeline.check_sizes(field, texts, positions)
        async with pipeline.admit("embed", model, len(texts)) as served:
            texts = await embeddings.fit(model, texts, prompt, job, positions)
            if prompt.name is not None and prompt.name == model.info.query_prompt:
                texts = [Query(text) for text in texts]  # ColBERT: encoded as queries
            found = await run(model, texts, served)
        return Parts(found, served.tokens, prompt)

    async def create(self, request: EmbeddingRequest, job: EmbedJob) -> dict[str, Any]:
        """`/v1/embeddings` with `return_sparse` or `return_multivector`: each item's
        `sparse_embedding`, its multi-vector in `embedding` (Jina's shape: a list of vectors),
        and its dense vector in `embedding`, or in `dense_embedding` beside a multi-vector."""
        if request.late_chunking:
            raise BadRequest("late_chunking gives dense vectors only; ask for sparse or "
                             "multi-vectors without it", param="late_chunking")
        model = self.embeddings.models.get(request.model)
        multi, sparse = request.return_multivector, request.return_sparse
        dense = request.return_dense if request.return_dense is not None else (
            not multi and "embed" in model.info.capabilities)
        wanted = {part for part, on in (("dense", dense), ("sparse", sparse), ("multi", multi)) if on}
        if multi and request.output_dtype != "float":
            raise BadRequest("output_dtype: multi-vectors are float vectors", param="output_dtype")
        if dense or multi:
            check_output(model, request.dimensions, (request.output_dtype,), request.normalized)
        elif request.dimensions is not None or request.output_dtype != "float":
            field = "dimensions" if request.dimensions is not None else "output_dtype"
            raise BadRequest(f"{field}: applies to dense vectors and multi-vectors; a sparse "
                             f"vector's entries are the model's vocabulary", param=field)
        found = await self.parts(job, wanted)
        items: list[dict[str, Any]] = [{"object": "embedding", "index": i}
                                       for i in range(len(found.rows))]
        if dense:
            matrix = vectors(as_matrix([dense_of(row) for row in found.rows]), request.dimensions,
                             request.normalized, model.info.unit_vectors)
            rows = encode_rows(quantize(matrix, request.output_dtype), request.encoding_format)
            for item, row in zip(items, rows):
                item["dense_embedding" if multi else "embedding"] = row
        if multi:
            for item, row in zip(items, found.rows):
                matrix = vectors(row.multi, request.dimensions, request.normalized, True)
                if request.encoding_format == "base64":
                    item["embedding"] = encode_rows(matrix.reshape(1, -1), "base64")[0]
                    item["shape"] = list(matrix.shape)  # row-major float32: tokens x dimensions
                else:
                    item["embedding"] = matrix
        if sparse:
            for item, row in zip(items, found.rows):
                item["sparse_embedding"] = sparse_entries(model, sparse_of(row),
                                                          request.sparse_top_k,
                                                          request.sparse_tokens)
        return schemas.outputs_response(request.model, items, found.tokens, found.prompt.name,
                                        found.prompt.note)


def sparse_entries(model: ModelBackend, row: SparseRow, top_k: int | None = None,
                   tokens: bool = False) -> dict[str, Any]:
    """A sparse vector as `{"indices", "values"}` (ascending indices), cut to its `top_k` largest
    values, with each index's token string if asked."""
    indices, values = row.indices, row.values
    if top_k is not None and top_k < len(values):
        keep = np.sort(np.argpartition(-values, top_k - 1)[:top_k])
        indices, values = indices[keep], values[keep]
    entries: dict[str, Any] = {"indices": indices.tolist(), "values": values.tolist()}
    if tokens:
        entries["tokens"] = model.decode([[int(i)] for i in indices], skip_special_tokens=False)
    return entries


def check_output(model: ModelBackend, dimensions: int | None, output_dtypes: Sequence[str],
                 normalize: bool = True) -> None:
    """`dimensions` within the model's size, a multiple of 8 for a binary output; raw vectors
    only from an engine that has them, and not as int8 (its scale is for unit vectors)."""
    full = model.info.dimensions
    if dimensions is not None and full is not None and dimensions > full:
        raise BadRequest(
            f"dimensions: {dimensions} is out of range; model {model.info.name!r} produces {full} "
            f"dimensions, so use 1..{full}",
            param="dimensions",
        )
    size = dimensions or full
    for output_dtype in output_dtypes:
        if output_dtype in ("binary", "ubinary") and size is not None and size % 8:
            raise BadRequest(
                f"output_dtype: {output_dtype} packs 8 dimensions per byte, and {size} is not a "
                f"multiple of 8; ask for dimensions that are", param="output_dtype",
            )
        if not normalize and output_dtype in ("int8", "uint8"):
            raise BadRequest(f"output_dtype: {output_dtype} is scaled for unit vectors; ask for "
                             f"normalized vectors or float/binary", param="output_dtype")
    if not normalize and not model.info.raw_vectors:
        raise BadRequest(f"normalized: model {model.info.name!r} gives unit vectors only (its "
                         f"engine normalises them)", param="normalized")
