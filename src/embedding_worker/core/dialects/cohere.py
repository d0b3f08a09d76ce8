"""Cohere's embed API: `POST /v2/embed` and `/v1/embed`, as its SDK (`ClientV2.embed`,
`Client.embed`) sends and parses them. Rerank is the shared family's (`/v1|v2/rerank`).

The body becomes an `EmbedJob`; the vectors come back once and are encoded per requested type.
"""

from __future__ import annotations

import builtins
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from ..embed import Embedded, EmbedJob, Embeddings
from ..encoding import encode_rows, quantize
from ..errors import BadRequest
from ..models import Models
from ..options import INPUT_TYPES
from ..pipeline import parse
from ..schemas import (
    TEXTS_SCHEMA,
    BilledUnits,
    Image,
    RequestBody,
    ResponseBody,
    check_texts,
    invalid,
    type_name,
)

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
# Cohere's input types; "image" asks for no prompt
COHERE_INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")


class CohereEmbedRequest(RequestBody):
    model: str | None = Field(None, min_length=1, description=(
        "required in v2; in v1 the first served model that embeds"))
    texts: Annotated[list[str] | None, WithJsonSchema(TEXTS_SCHEMA)] = None
    images: Annotated[list[str] | None, WithJsonSchema(TEXTS_SCHEMA)] = Field(
        None, description="data URIs (or URLs) of images")
    inputs: list[dict[str, Any]] | None = Field(None, description=(
        'each {"content": [{"type": "text", "text"} | {"type": "image_url", "image_url": '
        '{"url"}}]}: one part per input (no model here fuses text and image)'))
    input_type: Annotated[str | None, WithJsonSchema(
        {"type": "string", "enum": list(COHERE_INPUT_TYPES)})] = None
    embedding_types: Annotated[list[str] | None, WithJsonSchema(
        {"type": "array", "items": {"type": "string", "enum": list(EMBEDDING_TYPES)},
         "minItems": 1})] = None
    truncate: Literal["NONE", "START", "END"] = "END"
    output_dimension: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="tokens per input, special included")
    priority: int | None = None  # accepted; every request is served alike
    late_chunking: bool = Field(False, description=(
        "not Cohere's: the texts are one document's consecutive chunks, each embedded in the "
        "context of the whole document (as Jina's late_chunking)"))

    @field_validator("texts", "images", mode="before")
    @classmethod
    def _texts(cls, value: Any, info: Any) -> list[str] | None:
        if isinstance(value, str) or not isinstance(value, list):
            raise invalid(f"{info.field_name}: expected a list of strings, got "
                           f"{type_name(value)}")
        return check_texts(value, info.field_name)

    @field_validator("input_type", mode="before")
    @classmethod
    def _input_type(cls, value: Any) -> Any:
        if value is not None and value not in COHERE_INPUT_TYPES:
            raise invalid(f"input_type: {value!r} is not supported; expected one of "
                           f"{', '.join(COHERE_INPUT_TYPES)}")
        return value

    @field_validator("embedding_types", mode="before")
    @classmethod
    def _types(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise invalid("embedding_types: expected a non-empty list")
        for i, kind in enumerate(value):
            if kind not in EMBEDDING_TYPES:
                raise invalid(f"embedding_types[{i}]: {kind!r} is not supported; expected one "
                               f"of {', '.join(EMBEDDING_TYPES)}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _one_source(self) -> CohereEmbedRequest:
        given = [f for f in ("texts", "images", "inputs") if getattr(self, f) is not None]
        if len(given) != 1:
            raise invalid("give exactly one of texts, images, inputs" if given else
                           "texts, images or inputs: one of them is required")
        return self


def _content(inputs: list[dict[str, Any]]) -> list[str | Image]:
    """One text or image per input, from its content parts."""
    if not inputs:
        raise BadRequest("inputs: must not be empty", param="inputs")
    out: list[str | Image] = []
    for i, item in enumerate(inputs):
        parts = item.get("content") if isinstance(item, dict) else None
        if not isinstance(parts, list) or not parts:
            raise BadRequest(f'inputs[{i}]: expected {{"content": [...]}} with at least one part',
                             param="inputs")
        kinds = {part.get("type") if isinstance(part, dict) else None for part in parts}
        if len(parts) > 1:
            what = "text and image" if kinds == {"text", "image_url"} else f"{len(parts)} parts"
            raise BadRequest(
                f"inputs[{i}]: mixes {what} into one vector, which no model served here can fuse; "
                f"send each part as its own input", param="inputs", code="fusion_not_supported")
        part = parts[0] if isinstance(parts[0], dict) else {}
        if part.get("type") == "text" and isinstance(part.get("text"), str) \
                and part["text"].strip():
            out.append(part["text"])
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.strip():
                raise BadRequest(f"inputs[{i}].content[0].image_url: expected {{\"url\": ...}}",
                                 param="inputs")
            out.append(Image(url))
        elif "audio" in str(part.get("type")):
            raise BadRequest(f"inputs[{i}].content[0]: Cohere's embed API has no content type for "
                             f"audio (only text and image_url); send audio to /v1/embeddings with "
                             f'"modality": "audio", or as Jina\'s {{"audio": ...}} items there',
                             param="inputs", code="modality_not_supported")
        else:
            raise BadRequest(f'inputs[{i}].content[0]: expected {{"type": "text", "text": ...}} '
                             f'or {{"type": "image_url", "image_url": {{"url": ...}}}}',
                             param="inputs")
    return out


# --- responses ---


class EmbeddingsByType(ResponseBody):
    float: list[list[builtins.float]] | None = None  # Cohere's key shadows the type here
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereMeta(ResponseBody):
    api_version: dict[str, str]
    billed_units: BilledUnits
    warnings: list[str] | None = None  # e.g. an input_type the model has no prompt for


class CohereEmbedByTypeResponse(ResponseBody):
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
    id: str
    embeddings: EmbeddingsByType
    texts: list[str]
    meta: CohereMeta


class CohereEmbedFloatsResponse(ResponseBody):
    """v1 without `embedding_types`."""

    response_type: Literal["embeddings_floats"] = "embeddings_floats"
    id: str
    embeddings: list[list[float]]
    texts: list[str]
    meta: CohereMeta


class CohereEmbed:
    def __init__(self, embeddings: Embeddings, models: Models):
        self.embeddings = embeddings
        self.models = models

    async def v2(self, body: Any) -> dict[str, Any]:
        request = parse(CohereEmbedRequest, body)
        if request.model is None:
            raise BadRequest("model: field required", param="model")
        return await self._embed(request, "2", by_type=True)

    async def v1(self, body: Any) -> dict[str, Any]:
        request = parse(CohereEmbedRequest, body)
        return await self._embed(request, "1", by_type=request.embedding_types is not None)

    async def _embed(self, request: CohereEmbedRequest, version: str,
                     by_type: bool) -> dict[str, Any]:
        if request.texts is not None:
            inputs: list[str | Image] = list(request.texts)
            field = "texts"
        elif request.images is not None:
            inputs, field = [Image(url) for url in request.images], "images"
        else:
            inputs, field = _content(request.inputs or []), "inputs"
        model = request.model or self.models.default("embed")
        types = request.embedding_types or ["float"]
        kind = request.input_type if request.input_type in INPUT_TYPES else None
        done = await self.embeddings.compute(EmbedJob(
            model=model, inputs=inputs, field=field, input_type=kind,
            truncate=request.truncate, max_tokens=request.max_tokens,
            dimensions=request.output_dimension,
            output_dtypes=[t for t in types if t != "base64"], late_chunking=request.late_chunking))
        texts = [item for item in inputs if isinstance(item, str)]
        body: dict[str, Any] = {"id": str(uuid.uuid4()), "texts": texts, "meta": _meta(done, version)}
        if by_type:
            body["response_type"] = "embeddings_by_type"
            body["embeddings"] = {kind: _encoded(done, kind) for kind in types}
        else:
            body["response_type"] = "embeddings_floats"
            body["embeddings"] = _encoded(done, "float")
        return body


def _encoded(done: Embedded, kind: str) -> list[Any]:
    if kind == "base64":  # little-endian float32 bytes, as Cohere's
        return encode_rows(done.matrix, "base64")
    return encode_rows(quantize(done.matrix, kind), "float")


def _meta(done: Embedded, version: str) -> dict[str, Any]:
    billed: dict[str, int] = {"input_tokens": done.tokens}
    if done.images:
        billed["images"] = done.images
    meta: dict[str, Any] = {"api_version": {"version": version}, "billed_units": billed}
    if done.prompt.note is not None:
        meta["warnings"] = [done.prompt.note]
    return meta
