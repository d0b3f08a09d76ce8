"""Request and response models, declared once for every transport.

Requests are validated here (shape, types, per-item checks with the item's index in the message).
Checks that need the running models (model exists, has the capability, `dimensions` fits) live in
the endpoint families.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..engine.base import ModelInfo, QueueStats
from .encoding import OUTPUT_DTYPES
from .options import INPUT_TYPES, TASKS, TRUNCATIONS

MODALITIES = ("text", "image", "audio")

TOKEN_IDS_REFUSED = (
    "token-id arrays are not supported; send the text itself "
    "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))"
)


def invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_input", message)


def _is_token_ids(value: Any) -> bool:
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    return (isinstance(first, int) and not isinstance(first, bool)) or (
        isinstance(first, list) and bool(first) and isinstance(first[0], int)
    )


def check_texts(value: Any, field: str) -> list[str]:
    """A string or a non-empty list of non-empty strings, as a list; errors name the item."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise invalid(f"{field}: expected a string or a list of strings, got {type_name(value)}")
    if not value:
        raise invalid(f"{field}: must not be empty")
    if _is_token_ids(value):
        raise invalid(f"{field}: {TOKEN_IDS_REFUSED}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise invalid(f"{field}[{i}]: expected a string, got {type_name(item)}")
        if not item.strip():
            raise invalid(f"{field}[{i}]: empty string")
    return value


def unwrap_texts(value: list[Any], field: str) -> list[Any]:
    """Cohere's and Jina's `{"text": ...}` documents as their strings."""
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            if "text" not in item:
                raise invalid(f'{field}[{i}]: expected a string or {{"text": ...}}')
            item = item["text"]
        out.append(item)
    return out


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True, slots=True)
class Image:
    """An image input: an http(s) URL, a data URI or bare base64 (texts stay plain strings)."""

    url: str


@dataclass(frozen=True, slots=True)
class Audio:
    """An audio input (a clip): an http(s) URL, a data URI or bare base64."""

    url: str


MEDIA = {"image": Image, "audio": Audio}  # Jina's item keys (and modalities) beside "text"
Item = str | Image | Audio


def check_inputs(value: Any, field: str, modality: str = "text") -> list[Item]:
    """Texts, or (modality image or audio) their URLs, or Jina's items: `{"text": ...}`,
    `{"image": ...}` and `{"audio": ...}` objects, which may be mixed with plain strings (texts,
    or items of the modality). Errors name the item."""
    plain = MEDIA.get(modality)
    if not isinstance(value, list) or not any(isinstance(item, dict) for item in value):
        texts = check_texts(value, field)
        return [plain(url) for url in texts] if plain else texts  # type: ignore[return-value]
    out: list[Item] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            kind, text = modality, item
        elif isinstance(item, dict) and len(item) == 1 and next(iter(item)) in ("text", *MEDIA):
            kind, text = next(iter(item.items()))
            if not isinstance(text, str):
                raise invalid(f"{field}[{i}].{kind}: expected a string, got {type_name(text)}")
        elif isinstance(item, dict):
            raise invalid(f'{field}[{i}]: expected {{"text": ...}}, {{"image": ...}} or '
                          f'{{"audio": ...}}, got the keys '
                          f"{', '.join(sorted(map(str, item))) or 'none'}")
        else:
            raise invalid(f"{field}[{i}]: expected a string or an object, got {type_name(item)}")
        if not text.strip():
            raise invalid(f"{field}[{i}]: empty string")
        out.append(MEDIA[kind](text) if kind in MEDIA else text)
    return out


def without_nulls(body: Any) -> Any:
    """A JSON object without its null members: in every dialect a field sent as `null` means the
    field left out (LiteLLM sends `"encoding_format": null`, langchain-cohere `"truncate": null`).
    An optional field then takes its default; a required one is missing, and named so."""
    if isinstance(body, dict) and any(value is None for value in body.values()):
        return {key: value for key, value in body.items() if value is not None}
    return body


class Body(BaseModel):
    """A request body or batch item: `null` members count as absent (`without_nulls`)."""

    model_config = ConfigDict(protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, value: Any) -> Any:
        return without_nulls(value)


class RequestBody(Body):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send `user`, extras).
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), populate_by_name=True)

    model: str = Field(min_length=1)


# What the validators accept, stated in the OpenAPI document (client generators and fuzzers read it)
TEXT_SCHEMA = {"type": "string", "minLength": 1, "pattern": r"\S"}
TEXTS_SCHEMA = {"type": "array", "items": TEXT_SCHEMA, "minItems": 1}


_ITEM = {"anyOf": [TEXT_SCHEMA, {"type": "object", "properties": {"text": TEXT_SCHEMA}, "required": ["text"],
                           "additionalProperties": False},
                   {"type": "object", "properties": {"image": TEXT_SCHEMA}, "required": ["image"],
                    "additionalProperties": False},
                   {"type": "object", "properties": {"audio": TEXT_SCHEMA}, "required": ["audio"],
                    "additionalProperties": False}]}


class EmbeddingRequest(RequestBody):
    # before `input`, whose validator reads it: it says what plain strings are
    modality: Annotated[str, WithJsonSchema({"type": "string", "enum": list(MODALITIES),
                                             "default": "text"})] = "text"
    # a list of texts, `Image`s and `Audio`s after validation; the union documents what is accepted
    input: Annotated[Any, WithJsonSchema(
        {"anyOf": [TEXT_SCHEMA, {"type": "array", "items": _ITEM, "minItems": 1}]})]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # retrieval options (core/options.py): at most one of prompt_name, input_type, task
    prompt_name: str | None = Field(None, min_length=1, description=(
        "a prompt of the model (see /v1/models) put before each text"))
    input_type: Annotated[str | None, WithJsonSchema(
        {"type": "string", "enum": list(INPUT_TYPES)})] = Field(None, description=(
            "Cohere's and Voyage's input type: picks the model's prompt for it, if it has one"))
    task: Annotated[str | None, WithJsonSchema({"type": "string", "enum": list(TASKS)})] = Field(
        None, description="Jina's task: picks the model's prompt for it, if it has one")
    output_dtype: Annotated[str, WithJsonSchema(
        {"type": "string", "enum": list(OUTPUT_DTYPES), "default": "float"})] = Field(
        "float", validation_alias=AliasChoices("output_dtype", "embedding_type"), description=(
            "float, or int8/uint8/binary/ubinary vectors (alias embedding_type)"))
    truncate: Annotated[str | None, WithJsonSchema({"type": "string", "enum": list(TRUNCATIONS)})] = Field(
        None, description=("END keeps the start of a text that is too long, START its end; "
                           "NONE refuses it (400). Default: TRUNCATE_INPUTS"))

    normalized: bool = Field(True, validation_alias=AliasChoices("normalized", "normalize"),
                             description="false: the model's own vectors (Jina's field)")
    late_chunking: bool = Field(False, description=(
        "Jina's: the inputs are one document's consecutive chunks; each chunk's vector is read "
        "in the context of the whole document (mean-pooled text embedders)"))
    return_sparse: bool = Field(False, description=(
        "sparse vectors (a SPLADE model): each item's `sparse_embedding` is {indices, values}"))
    sparse_top_k: int | None = Field(None, ge=1, description=(
        "with return_sparse: keep each vector's top_k largest entries"))
    sparse_tokens: bool = Field(False, description=(
        "with return_sparse: each index's token string, in `sparse_embedding.tokens`"))
    return_multivector: bool = Field(False, description=(
        "Jina's: each item's `embedding` is a list of vectors, one per token (a model with "
        "multi-vectors: BGE-M3, ColBERT; a ColBERT model reads the inputs as documents unless "
        "input_type, task or prompt_name says query)"))
    return_dense: bool | None = Field(None, description=(
        "with return_multivector or return_sparse: the dense vector too (in `dense_embedding` "
        "beside a multi-vector); default: beside sparse vectors, where the model has one"))

    @field_validator("input_type", "task", "output_dtype", "truncate", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: Any) -> Any:
        field = info.field_name
        accepted = {"input_type": INPUT_TYPES, "task": TASKS, "truncate": TRUNCATIONS,
                    "output_dtype": (*OUTPUT_DTYPES, "base64")}[field]
        key = value.upper() if field == "truncate" and isinstance(value, str) else value
        if not isinstance(key, str) or key not in accepted:
            raise invalid(f"{field}: {value!r} is not supported; expected one of {', '.join(accepted)}")
        return key

    @model_validator(mode="after")
    def _jina(self) -> EmbeddingRequest:
        if self.output_dtype == "base64":  # Jina's embedding_type: float vectors as base64
            self.output_dtype, self.encoding_format = "float", "base64"
        return self

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any, info: Any) -> list[Item]:
        return check_inputs(value, "input", info.data.get("modality", "text"))

    @field_serializer("input")
    def _dump_input(self, value: list[Item]) -> list[Any]:
        """Images and clips as Jina's `{"image": ...}`, `{"audio": ...}`, so that a dumped
        request parses back the same."""
        return [item if isinstance(item, str) else
                {"image" if isinstance(item, Image) else "audio": item.url} for item in value]

    @field_validator("modality", mode="before")
    @classmethod
    def _modality(cls, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in MODALITIES:
            raise invalid(f"modality: {value!r} is not supported; expected one of {', '.join(MODALITIES)}")
        return value.lower()


class RerankRequest(RequestBody):
    query: Annotated[str, WithJsonSchema(TEXT_SCHEMA)] = Field(min_length=1)
    documents: Annotated[list[str], WithJsonSchema(TEXTS_SCHEMA)] = Field(
        validation_alias=AliasChoices("documents", "docs"))
    top_n: int | None = Field(None, ge=1, le=2**31 - 1)
    return_documents: bool = Field(
        False, validation_alias=AliasChoices("return_documents", "return_docs")
    )
    raw_scores: bool = False

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        if not value.strip():
            raise invalid("query: empty string")
        return value

    @field_validator("documents", mode="before")
    @classmethod
    def _documents(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            raise invalid("documents: expected a list of strings, got a single string")
        if not isinstance(value, list):  # check_texts would say "a string or a list of strings"
            raise invalid(f"documents: expected a list of strings, got {type_name(value)}")
        return check_texts(unwrap_texts(value, "documents"), "documents")


class ClassifyRequest(RequestBody):
    input: Annotated[str | list[str], WithJsonSchema({"anyOf": [TEXT_SCHEMA, TEXTS_SCHEMA]})]
    raw_scores: bool = Field(False, description="the model's logits, not probabilities")
    top_k: int | None = Field(None, ge=1, description="the k best labels per input; default all")

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> list[str]:
        return check_texts(value, "input")


class TokenizeRequest(RequestBody):
    input: Annotated[str | list[str], WithJsonSchema({"anyOf": [TEXT_SCHEMA, TEXTS_SCHEMA]})]
    add_special_tokens: bool = True
    prompt_name: str | None = Field(None, min_length=1, description=(
        "a prompt of the model put before each text, as embeddings would (default: the "
        "model's default prompt)"))

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> list[str]:
        return check_texts(value, "input")


# --- items for the BentoML batchable methods (Bento-to-Bento callers) ---


class EmbedItem(Body):
    model: str = Field(min_length=1)
    text: str = Field(min_length=1)
    prompt_name: str | None = Field(None, min_length=1)  # else the model's default prompt


class RerankItem(Body):
    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    document: str = Field(min_length=1)


# --- responses: each shape declared once, as a model (the OpenAPI document) and its builder ---
# The builders make plain dicts (embeddings stay numpy rows for `encoding.dumps`, which pydantic
# would turn into Python floats at several times the cost); tests hold the bytes sent to these
# models, which forbid any key they do not declare.


class ResponseBody(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Usage(ResponseBody):
    prompt_tokens: int
    total_tokens: int
    audio_seconds: float | None = Field(None, description=(
        "with audio inputs: their length in seconds (text tokens are counted apart)"))


def usage(tokens: int, seconds: float | None = None) -> dict[str, Any]:
    """Text tokens; with audio inputs, their length in seconds beside (`audio_seconds`)."""
    counted: dict[str, Any] = {"prompt_tokens": int(tokens), "total_tokens": int(tokens)}
    if seconds is not None:
        counted["audio_seconds"] = round(seconds, 3)
    return counted


class EmbeddingData(ResponseBody):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | list[int] | str  # ints for int8/uint8/binary/ubinary
    index: int


class SparseVector(ResponseBody):
    indices: list[int]
    values: list[float]
    tokens: list[str] | None = None


class EmbeddingOutputsData(ResponseBody):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | list[list[float]] | str | None = Field(None, description=(
        "the dense vector, or with return_multivector the multi-vector (a list of vectors; "
        "base64: its float32 bytes, row-major, in `shape`)"))
    shape: list[int] | None = Field(None, description="a base64 multi-vector's [tokens, dimensions]")
    dense_embedding: list[float] | list[int] | str | None = None
    sparse_embedding: SparseVector | None = None


class EmbeddingOutputsResponse(ResponseBody):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingOutputsData]
    usage: Usage
    prompt_name: str | None = None
    warnings: list[str] | None = None


def outputs_response(model: str, items: list[dict[str, Any]], tokens: int,
                     prompt_name: str | None = None, note: str | None = None) -> dict[str, Any]:
    body = embedding_response(model, [], tokens, prompt_name, note)
    body["data"] = items
    return body


class EmbeddingResponse(ResponseBody):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: Usage
    prompt_name: str | None = Field(None, description="the model's prompt applied, when one was")
    warnings: list[str] | None = Field(None, description="e.g. an input_type with no prompt")


def embedding_response(model: str, rows: list[Any], tokens: int, prompt_name: str | None = None,
                       note: str | None = None, seconds: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "embedding": row, "index": i} for i, row in enumerate(rows)],
        "usage": usage(tokens, seconds),
    }
    if prompt_name is not None:
        body["prompt_name"] = prompt_name
    if note is not None:
        body["warnings"] = [note]
    return body


class RerankDocument(ResponseBody):
    text: str


class RerankResult(ResponseBody):
    index: int
    relevance_score: float
    document: RerankDocument | None = None  # absent unless return_documents


class BilledUnits(ResponseBody):
    input_tokens: int | None = None
    images: int | None = None
    search_units: int | None = None


class Meta(ResponseBody):
    """Cohere's `meta`: what its SDK reads as the request's bill."""

    billed_units: BilledUnits


class RerankResponse(ResponseBody):
    object: Literal["rerank"] = "rerank"
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage
    meta: Meta = Field(description="Cohere's: one search unit per query and 100 documents")


def rerank_response(model: str, scores: Sequence[float], ranked: list[int],
                    documents: list[str] | None, tokens: int) -> dict[str, Any]:
    """`ranked`: the indices to return, best first; `documents`: when they are to be returned."""
    results = []
    for i in ranked:
        result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if documents is not None:
            result["document"] = {"text": documents[i]}
        results.append(result)
    return {"object": "rerank", "id": f"rerank-{uuid.uuid4().hex}", "model": model,
            "results": results, "usage": usage(tokens),
            "meta": {"billed_units": {"search_units": -(-len(scores) // 100)}}}


class ClassifyLabel(ResponseBody):
    label: str
    score: float


class ClassifyResponse(ResponseBody):
    object: Literal["classify"] = "classify"
    id: str
    created: int
    model: str
    data: list[list[ClassifyLabel]] = Field(description="per input, its labels best first")
    usage: Usage


def labels_json(rows: Sequence[Sequence[tuple[str, float]]]) -> list[list[dict[str, Any]]]:
    return [[{"label": label, "score": float(score)} for label, score in row] for row in rows]


def classify_response(model: str, rows: Sequence[Sequence[tuple[str, float]]],
                      tokens: int) -> dict[str, Any]:
    return {"object": "classify", "id": f"classify-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model, "data": labels_json(rows), "usage": usage(tokens)}


class TokenizedText(ResponseBody):
    object: Literal["tokens"] = "tokens"
    index: int
    count: int = Field(description="tokens the model sees, prompt and special tokens included")
    ids: list[int]
    tokens: list[str]
    offsets: list[list[int] | None] = Field(description=(
        "each token's [start, end) in the input text; null for special and prompt tokens"))


class TokenizeResponse(ResponseBody):
    object: Literal["list"] = "list"
    model: str
    window: int | None = Field(description="tokens per input the model takes, special included")
    prompt_name: str | None = None
    data: list[TokenizedText]


def tokenize_response(model: str, window: int | None, prompt_name: str | None,
                      items: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "model": model, "window": window, "data": items}
    if prompt_name is not None:
        body["prompt_name"] = prompt_name
    return body


class ModelStats(ResponseBody):
    queue_fraction: float
    queue_absolute: int
    results_pending: int


class ModelCard(ResponseBody):
    id: str
    object: Literal["model"] = "model"
    owned_by: str
    created: int
    capabilities: list[str]
    backend: str
    dtype: str
    runtime: str | None = Field(description="the CPU engine's: onnxruntime or openvino")
    device: str
    batch_size: int
    window: int | None = Field(description="tokens per input, special tokens included")
    dimensions: int | None
    prompts: dict[str, str]
    default_prompt_name: str | None
    sampling_rate: int | None = Field(None, description=(
        "an audio model's: clips are resampled to it (present on audio models only)"))
    stats: ModelStats


def model_card(info: ModelInfo, queue: QueueStats, created: int) -> dict[str, Any]:
    card = {
        "id": info.name,
        "object": "model",
        "owned_by": "infinity-embedding-worker",
        "created": created,
        "capabilities": sorted(info.capabilities),
        "backend": info.backend,
        "dtype": info.dtype,
        "runtime": info.runtime,
        "device": info.device,
        "batch_size": info.batch_size,
        "window": info.window,
        "dimensions": info.dimensions,
        "prompts": dict(info.prompts),
        "default_prompt_name": info.default_prompt_name,
        "stats": {"queue_fraction": queue.queue_fraction, "queue_absolute": queue.queue_absolute,
                  "results_pending": queue.results_pending},
    }
    if info.sampling_rate is not None:
        card["sampling_rate"] = info.sampling_rate
    return card


class ModelList(ResponseBody):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}


class ErrorBody(ResponseBody):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseBody):
    error: ErrorBody


class RunSyncRequest(BaseModel):
    """RunPod Standard flavour: `input` is `{"route", "body"}` (any route), an embedding body,
    a rerank body, or `{"openai_route", "openai_input"}`."""

    input: dict[str, Any]


class RunSyncResponse(ResponseBody):
    id: str
    status: Literal["COMPLETED", "FAILED"]
    output: dict[str, Any] | list[Any] | None = None
    error: str | None = None


def runsync_response(job_id: str, output: Any, error: str | None) -> dict[str, Any]:
    if error is not None:
        return {"id": job_id, "status": "FAILED", "error": error}
    return {"id": job_id, "status": "COMPLETED", "output": output}
