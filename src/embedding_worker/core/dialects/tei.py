"""Hugging Face text-embeddings-inference's API: `/embed`, `/rerank` (TEI's body), `/predict`,
`/tokenize`, `/decode`, `/info`, and `POST /`, which TEI routes by the model's kind (it is what
`huggingface_hub.InferenceClient` posts to).

TEI serves one model and its bodies name none. Here each operation takes the model the route
names (`/tei/<served name>/...`: a base URL per model), or else the first served model that can
do it (MODEL_NAMES order); a body may also name it (`model`, not TEI's). `huggingface_hub` nests its options in `parameters`; they are read
as if they stood at the top level.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from typing import Annotated, Any, Literal

from pydantic import BaseModel

from pydantic import Field, WithJsonSchema, field_validator

from ..classify import Classify
from ..embed import EmbedJob, Embeddings
from ..errors import BadRequest
from ..models import Models
from ..outputs import sparse_of
from ..pipeline import parse
from ..rerank import Rerank
from ..schemas import (
    TEXT_SCHEMA,
    TEXTS_SCHEMA,
    Body,
    RequestBody,
    ResponseBody,
    check_texts,
    invalid,
    type_name,
    unwrap_texts,
    without_nulls,
)
from ..tokenize import Tokenize

INPUTS = {"anyOf": [TEXT_SCHEMA, TEXTS_SCHEMA]}


class TeiRequest(RequestBody):
    # not TEI's: another way than the /tei/<name> path to pick a served model
    model: str | None = Field(None, min_length=1, description=(
        "a served model (not in TEI's API); default: the one the path names, else the first "
        "served model that can do it"))

    @classmethod
    def from_body(cls, body: Any) -> Any:
        """`huggingface_hub` sends `{"inputs", "parameters": {...}}`: the parameters count as
        top-level fields (a top-level one wins)."""
        body = without_nulls(body)
        if isinstance(body, dict) and isinstance(body.get("parameters"), dict):
            body = {**without_nulls(body["parameters"]),
                    **{k: v for k, v in body.items() if k != "parameters"}}
        return parse(cls, body)


class _Truncated(TeiRequest):
    truncate: bool | None = Field(None, description="default: TRUNCATE_INPUTS")
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"

    def truncation(self) -> str | None:
        """As the embed family's `truncate` (Left keeps a text's end)."""
        if self.truncate is None:
            return None
        if not self.truncate:
            return "NONE"
        return "START" if self.truncation_direction.lower() == "left" else "END"


class _Inputs(_Truncated):
    inputs: Annotated[str | list[str], WithJsonSchema(INPUTS)]

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[str]:
        return check_texts(value, "inputs")


class TeiEmbedRequest(_Inputs):
    normalize: bool = True
    prompt_name: str | None = Field(None, min_length=1)
    dimensions: int | None = Field(None, ge=1)
    late_chunking: bool = Field(False, description=(
        "not TEI's: the inputs are one document's consecutive chunks, each embedded in the "
        "context of the whole document (as Jina's late_chunking)"))


class TeiTextsRequest(_Inputs):
    """Texts, their truncation and a prompt: `/embed_sparse` and `/embed_all`."""

    prompt_name: str | None = Field(None, min_length=1)


class TeiSparseValue(ResponseBody):
    index: int
    value: float


class SimilarityInputs(Body):
    source_sentence: Annotated[str, WithJsonSchema(TEXT_SCHEMA)]
    sentences: Annotated[list[str], WithJsonSchema(TEXTS_SCHEMA)]

    @field_validator("source_sentence", mode="before")
    @classmethod
    def _source(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise invalid(f"inputs.source_sentence: expected a string, got {type_name(value)}")
        return check_texts(value, "inputs.source_sentence")[0]

    @field_validator("sentences", mode="before")
    @classmethod
    def _sentences(cls, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise invalid(f"inputs.sentences: expected a list of strings, got {type_name(value)}")
        return check_texts(value, "inputs.sentences")


class TeiSimilarityRequest(_Truncated):
    """The Hugging Face sentence-similarity task (TEI's `/similarity`, and `POST /` with it)."""

    inputs: SimilarityInputs
    prompt_name: str | None = Field(None, min_length=1)

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise invalid('inputs: expected {"source_sentence": ..., "sentences": [...]}, got '
                           f"{type_name(value)}")
        return value


class TeiRerankRequest(TeiRequest):
    query: Annotated[str, WithJsonSchema(TEXT_SCHEMA)]
    texts: Annotated[list[str], WithJsonSchema(TEXTS_SCHEMA)]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = Field(None, description="default: TRUNCATE_INPUTS")
    truncation_direction: Literal["Right", "right"] = "Right"

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any) -> str:
        return check_texts(value if isinstance(value, str) else [value], "query")[0]

    @field_validator("texts", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise invalid("texts: expected a list of strings")
        return check_texts(unwrap_texts(value, "texts"), "texts")


class TeiPredictRequest(_Inputs):
    raw_scores: bool = False
    # huggingface_hub's text_classification parameters
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None
    top_k: int | None = Field(None, ge=1)

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[str]:
        if isinstance(value, list) and value and isinstance(value[0], list):
            raise invalid("inputs: text pairs are not supported; classify single texts")
        return check_texts(value, "inputs")


class TeiTokenizeRequest(TeiRequest):
    inputs: Annotated[str | list[str], WithJsonSchema(INPUTS)]
    add_special_tokens: bool = True
    prompt_name: str | None = Field(None, min_length=1)

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[str]:
        return check_texts(value, "inputs")


TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class TeiDecodeRequest(TeiRequest):
    ids: list[TokenId] | list[list[TokenId]]
    skip_special_tokens: bool = True

    @field_validator("ids", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise invalid("ids: expected a non-empty list of token ids (or of lists of them)")
        return value


class Tei:
    def __init__(self, models: Models, embeddings: Embeddings, rerank: Rerank,
                 classify: Classify, tokenize: Tokenize):
        self.models = models
        self.embeddings = embeddings
        self.rerank_family = rerank
        self.classify = classify
        self.tokenize_family = tokenize

    def _model(self, model: str | None, capability: str) -> str:
        """The model the route names (which must have `capability`), or the default for it."""
        if model is None:
            return self.models.default(capability)
        self.models.require(model, capability)
        return model

    async def embed(self, body: Any, model: str | None = None) -> list[Any]:
        request = TeiEmbedRequest.from_body(body)
        name = self._model(model or request.model, "embed")
        done = await self.embeddings.compute(EmbedJob(
            model=name, inputs=request.inputs, field="inputs", prompt_name=request.prompt_name,
            truncate=request.truncation(), dimensions=request.dimensions,
            normalize=request.normalize, late_chunking=request.late_chunking))
        return list(done.matrix)

    async def embed_all(self, body: Any, model: str | None = None) -> list[Any]:
        """TEI's token embeddings: each input's last hidden states, a vector per token."""
        request = TeiTextsRequest.from_body(body)
        name = self._model(model or request.model, "token_embed")
        done = await self.embeddings.outputs.token_states(EmbedJob(
            model=name, inputs=request.inputs, field="inputs", prompt_name=request.prompt_name,
            truncate=request.truncation()))
        return done.rows

    async def embed_sparse(self, body: Any, model: str | None = None) -> list[list[dict[str, Any]]]:
        """TEI's sparse vectors: each input's non-zero entries as `{"index", "value"}`."""
        request = TeiTextsRequest.from_body(body)
        name = self._model(model or request.model, "sparse_embed")
        done = await self.embeddings.outputs.parts(EmbedJob(
            model=name, inputs=request.inputs, field="inputs", prompt_name=request.prompt_name,
            truncate=request.truncation()), {"sparse"})
        sparse = [sparse_of(row) for row in done.rows]
        return [[{"index": int(i), "value": float(v)} for i, v in zip(row.indices, row.values)]
                for row in sparse]

    async def similarity(self, body: Any, model: str | None = None) -> list[float]:
        """Each sentence's cosine similarity to the source sentence, in order."""
        request = TeiSimilarityRequest.from_body(body)
        name = self._model(model or request.model, "embed")

        def job(texts: list[str], field: str) -> Any:
            return self.embeddings.compute(EmbedJob(
                model=name, inputs=texts, field=field, prompt_name=request.prompt_name,
                truncate=request.truncation(), normalize=True))

        # two jobs, so that an error names its field; they share the model's batches
        source, sentences = await asyncio.gather(
            job([request.inputs.source_sentence], "inputs.source_sentence"),
            job(request.inputs.sentences, "inputs.sentences"))
        return (sentences.matrix @ source.matrix[0]).astype(float).tolist()

    async def rerank(self, body: Any, model: str | None = None) -> list[dict[str, Any]]:
        request = TeiRerankRequest.from_body(body)
        name = self._model(model or request.model, "rerank")
        done = await self.rerank_family.scores(name, request.query, request.texts,
                                               raw_scores=request.raw_scores,
                                               truncate=request.truncate)
        out = []
        for i in done.ranked:
            item: dict[str, Any] = {"index": i, "score": done.scores[i]}
            if request.return_text:
                item["text"] = request.texts[i]
            out.append(item)
        return out

    async def predict(self, body: Any, model: str | None = None, nested: bool = False) -> list[Any]:
        """One input string: its labels; a list: labels per input (`nested`: always per input,
        as huggingface_hub's text_classification reads `POST /`)."""
        request = TeiPredictRequest.from_body(body)
        name = self._model(model or request.model, "classify")
        raw = request.raw_scores or request.function_to_apply == "none"
        if request.function_to_apply in ("softmax", "sigmoid"):
            expected = self.models.get(name).info.label_activation
            if request.function_to_apply != expected:
                raise BadRequest(f"function_to_apply: model {name!r} scores by {expected}",
                                 param="function_to_apply")
        done = await self.classify.labels(name, request.inputs, field="inputs", raw_scores=raw,
                                          top_k=request.top_k, truncate=request.truncate)
        rows = [[{"score": score, "label": label} for label, score in row] for row in done.rows]
        single = isinstance(body, dict) and isinstance(body.get("inputs"), str)
        return rows[0] if single and not nested else rows

    async def tokenize(self, body: Any, model: str | None = None) -> list[list[dict[str, Any]]]:
        request = TeiTokenizeRequest.from_body(body)
        name = model or request.model or self.models.names[0]
        done = await self.tokenize_family.tokens(name, request.inputs, request.add_special_tokens,
                                                 request.prompt_name, field="inputs")
        out = []
        for text, toks in zip(request.inputs, done.tokens):
            full = done.prompt.text + text
            out.append([{"id": i, "text": s if special else full[a:b], "special": special,
                         "start": None if special else a, "stop": None if special else b}
                        for i, s, (a, b), special in zip(toks.ids, toks.strings, toks.offsets,
                                                         toks.special)])
        return out

    async def decode(self, body: Any, model: str | None = None) -> list[str]:
        request = TeiDecodeRequest.from_body(body)
        ids = request.ids if isinstance(request.ids[0], list) else [request.ids]
        return await self.tokenize_family.decode(model or request.model or self.models.names[0],
                                                 ids, request.skip_special_tokens)  # type: ignore[arg-type]

    async def root(self, body: Any, model: str | None = None) -> list[Any]:
        """`POST /`: TEI's route by the model's kind. A body with `query` and `texts` reranks,
        one whose `inputs` is `{"source_sentence", "sentences"}` scores sentence similarity;
        otherwise the model (named, else the first that embeds or classifies) decides."""
        if isinstance(body, dict) and "query" in body and "texts" in body:
            return await self.rerank(body, model)
        if isinstance(body, dict) and isinstance(body.get("inputs"), dict):
            return await self.similarity(body, model)
        named = body.get("model") if isinstance(body, dict) else None
        name = model or (named if isinstance(named, str) and named else None) \
            or self.models.default("embed", "classify")
        if "embed" in self.models.get(name).info.capabilities:
            return await self.embed(body, name)
        if "classify" in self.models.get(name).info.capabilities:
            return await self.predict(body, name, nested=True)
        raise BadRequest(f"model {name!r} reranks: send {{\"query\", \"texts\"}}", param="model")

    async def info(self, _body: Any = None, model: str | None = None) -> dict[str, Any]:
        name = model or self.models.names[0]
        info = self.models.get(name).info
        if "classify" in info.capabilities:
            labels = dict(enumerate(info.labels))
            kind: dict[str, Any] = {"classifier": {
                "id2label": {str(i): l for i, l in labels.items()},
                "label2id": {l: i for i, l in labels.items()}}}
        elif "rerank" in info.capabilities:
            kind = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
        else:
            kind = {"embedding": {"pooling": info.pooling or "mean"}}
        settings = self.models.settings
        return {
            "model_id": name, "model_sha": None, "model_dtype": info.dtype, "model_type": kind,
            "prompts": dict(info.prompts) or None, "default_prompt": info.default_prompt_name,
            "max_concurrent_requests": settings.max_concurrent_requests,
            "max_input_length": info.window, "max_batch_tokens": None,
            "max_batch_requests": info.batch_size, "max_client_batch_size": settings.max_input_items,
            "auto_truncate": settings.truncate_inputs, "tokenization_workers": None,
            "version": version("infinity-embedding-worker"), "sha": None, "docker_label": None,
        }


# --- responses (TEI's shapes) ---


class TeiRank(ResponseBody):
    index: int
    score: float
    text: str | None = None


class TeiLabel(ResponseBody):
    score: float
    label: str


class TeiToken(ResponseBody):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TeiError(ResponseBody):
    """TEI's error body (huggingface_hub shows `error`)."""

    error: str
    error_type: str


class TeiInfo(BaseModel):  # open: TEI adds fields between versions
    model_id: str
    model_dtype: str
    model_type: dict[str, Any]
    max_input_length: int | None
    version: str
