"""Property-based tests (hypothesis) for the pure parts: request validators, output encoding,
the per-model settings lists and the image-input helpers. No server, no engine.

Each property is checked against an independent statement of the rule (what a body or a setting
must look like), so a change in behaviour fails here, not only in the example-based tests.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from embedding_worker.core import errors
from embedding_worker.config import (
    BUNDLED_MODEL_ID,
    DTYPE_ALIASES,
    ConfigError,
    ModelSpec,
    Settings,
    _describe,
    bundled_model_path,
)
from embedding_worker.core.encoding import encode_rows, jsonable, truncate
from embedding_worker.core.media import (
    MediaError,
    MediaPolicy,
    _b64decode,
    address_allowed,
    parse_data_uri,
)
from embedding_worker.core.pipeline import parse
from embedding_worker.core.schemas import (
    MEDIA,
    MODALITIES,
    Audio,
    Image,
    EmbeddingRequest,
    EmbedItem,
    RerankItem,
    RerankRequest,
    RunSyncRequest,
    RunSyncResponse,
)


def fast(n: int):
    # database=None: no .hypothesis/ directory in the work tree; deadline=None: numpy, pydantic
    # and first-call imports make single examples slow now and then.
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def json_type(value) -> str:
    """The type name the validators print for a JSON value."""
    return "null" if value is None else type(value).__name__


def one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
non_strings = json_values.filter(lambda v: not isinstance(v, str))
# a field's wrong value: null is no value at all (the field counts as absent)
wrong_values = non_strings.filter(lambda v: v is not None)

WHITESPACE = " \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000"
blank = st.text(alphabet=WHITESPACE, max_size=4)
nonblank = st.text(min_size=1, max_size=16).filter(lambda s: s.strip())
model_names = st.sampled_from([BUNDLED_MODEL_ID, "tiny-embed", "BAAI/bge-small-en-v1.5"]) | st.text(
    min_size=1, max_size=24
)
modalities = st.none() | st.sampled_from(MODALITIES).flatmap(
    lambda m: st.sampled_from([m, m.upper(), m.capitalize()])
)

EMBED_FIELDS = {"model", "input", "modality", "encoding_format", "dimensions", "user", "prompt_name",
                "input_type", "task", "output_dtype", "embedding_type", "truncate", "normalized",
                "normalize", "late_chunking", "return_sparse", "sparse_top_k", "sparse_tokens",
                "return_multivector", "return_dense"}
RERANK_FIELDS = {"model", "query", "documents", "docs", "top_n", "return_documents", "return_docs", "raw_scores"}
extras = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in EMBED_FIELDS | RERANK_FIELDS), json_values, max_size=3
)


@st.composite
def embedding_bodies(draw):
    body = draw(extras)
    body["model"] = draw(model_names)
    body["input"] = draw(nonblank | st.lists(nonblank, min_size=1, max_size=8))
    if draw(st.booleans()):
        body["encoding_format"] = draw(st.sampled_from(["float", "base64"]))
    if draw(st.booleans()):
        body["dimensions"] = draw(st.none() | st.integers(1, 2**63))
    if draw(st.booleans()):
        body["modality"] = draw(modalities)
    if draw(st.booleans()):
        body["user"] = draw(st.none() | st.text(max_size=10))
    if draw(st.booleans()):
        body[draw(st.sampled_from(["prompt_name", "input_type", "task"]))] = None
    if draw(st.booleans()):
        body["input_type"] = draw(st.sampled_from(["search_query", "search_document", "query"]))
    if draw(st.booleans()):
        body[draw(st.sampled_from(["output_dtype", "embedding_type"]))] = draw(
            st.sampled_from(["float", "int8", "uint8", "binary", "ubinary"]))
    if draw(st.booleans()):
        body["truncate"] = draw(st.sampled_from(["END", "start", "None", None]))
    return body


@st.composite
def rerank_bodies(draw):
    body = draw(extras)
    body["model"] = draw(model_names)
    body["query"] = draw(nonblank)
    body[draw(st.sampled_from(["documents", "docs"]))] = draw(st.lists(nonblank, min_size=1, max_size=8))
    if draw(st.booleans()):
        body["top_n"] = draw(st.none() | st.integers(1, 10**9))
    if draw(st.booleans()):
        body[draw(st.sampled_from(["return_documents", "return_docs"]))] = draw(st.booleans())
    if draw(st.booleans()):
        body["raw_scores"] = draw(st.booleans())
    return body


def token_like(first) -> bool:
    """A list whose first item is an int, or a non-empty list starting with an int: token ids."""
    return (isinstance(first, int) and not isinstance(first, bool)) or (
        isinstance(first, list) and bool(first) and isinstance(first[0], int)
    )


token_id_arrays = st.lists(st.integers(), min_size=1, max_size=6) | st.lists(
    st.lists(st.integers(), min_size=1, max_size=4), min_size=1, max_size=4
)
# JSON values pydantic's lax int/bool parsing refuses (strings are letters only: no "1", "yes")
not_ints = (
    st.text(alphabet=string.ascii_letters + " -", min_size=1, max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))
    | st.lists(json_scalars, max_size=2)
    | st.dictionaries(st.text(max_size=3), json_scalars, max_size=2)
)
not_bools = (
    st.sampled_from(["perhaps", "maybe", "2", "truthy", "nope", ""])
    | st.integers().filter(lambda i: i not in (0, 1))
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f not in (0.0, 1.0))
    | st.lists(json_scalars, max_size=2)
)


@st.composite
def text_list_fault(draw, field: str):
    """(value, expected message prefix) for one bad `input`/`documents` value."""
    kind = draw(st.sampled_from(["blank_item", "non_string_item", "empty_list", "token_ids", "wrong_type"]))
    if kind in ("blank_item", "non_string_item"):
        items = draw(st.lists(nonblank, max_size=6))
        i = draw(st.integers(0, len(items)))
        # objects are Jina's / Cohere's items, with their own messages (tests/test_dialects.py)
        bad = draw(blank) if kind == "blank_item" else draw(
            non_strings.filter(lambda v: not isinstance(v, dict)))
        items.insert(i, bad)
        if kind == "blank_item":
            return items, f"{field}[{i}]: empty string"
        if i == 0 and token_like(bad):
            return items, f"{field}: token-id arrays are not supported; send the text itself"
        return items, f"{field}[{i}]: expected a string, got {json_type(bad)}"
    if kind == "empty_list":
        return [], f"{field}: must not be empty"
    if kind == "token_ids":
        return draw(token_id_arrays), f"{field}: token-id arrays are not supported; send the text itself"
    bad = draw(wrong_values.filter(lambda v: not isinstance(v, list)))
    expected = "a list of strings" if field in ("documents", "docs") else "a string or a list of strings"
    return bad, f"{field}: expected {expected}, got {json_type(bad)}"


@st.composite
def invalid_embedding_bodies(draw):
    """A valid body with exactly one fault, the error message it must give and its `param`."""
    body = draw(embedding_bodies())
    kind = draw(st.sampled_from([
        "input", "blank_string", "missing_input", "missing_model", "empty_model", "model_type",
        "dimensions_range", "dimensions_type", "encoding_format", "modality", "user_type",
        "null_required", "output_dtype",
    ]))
    if kind == "output_dtype":  # under either name; the message names the one sent
        body.pop("output_dtype", None)
        body.pop("embedding_type", None)
        key = draw(st.sampled_from(["output_dtype", "embedding_type"]))
        body[key] = bad = draw(json_values.filter(
            lambda v: v is not None and v not in ("float", "int8", "uint8", "binary", "ubinary", "base64")))
        return body, f"{key}: {bad!r} is not supported; expected one of", key
    if kind == "input":
        body["input"], expected = draw(text_list_fault("input"))
        return body, expected, "input"
    if kind == "blank_string":
        body["input"] = draw(blank)
        return body, "input[0]: empty string", "input"
    if kind == "missing_input":
        del body["input"]
        return body, "input: field required", "input"
    if kind == "missing_model":
        del body["model"]
        return body, "model: field required", "model"
    if kind == "empty_model":
        body["model"] = ""
        return body, "model: String should have at least 1 character", "model"
    if kind == "model_type":
        body["model"] = draw(wrong_values)
        return body, "model: Input should be a valid string", "model"
    if kind == "null_required":
        field = draw(st.sampled_from(["model", "input"]))
        body[field] = None
        return body, f"{field}: field required", field
    if kind == "dimensions_range":
        body["dimensions"] = draw(st.integers(max_value=0))
        return body, "dimensions: Input should be greater than or equal to 1", "dimensions"
    if kind == "dimensions_type":
        body["dimensions"] = draw(not_ints)
        return body, "dimensions: Input should be a valid integer", "dimensions"
    if kind == "encoding_format":
        body["encoding_format"] = draw(json_values.filter(
            lambda v: v not in ("float", "base64", None)))
        return body, "encoding_format: Input should be 'float' or 'base64'", "encoding_format"
    if kind == "modality":
        bad = draw(json_values.filter(
            lambda v: v is not None and not (isinstance(v, str) and v.lower() in MODALITIES)
        ))
        body["modality"] = bad
        return body, f"modality: {bad!r} is not supported; expected one of text, image, audio", "modality"
    body["user"] = draw(wrong_values)
    return body, "user: Input should be a valid string", "user"


@st.composite
def invalid_rerank_bodies(draw):
    body = draw(rerank_bodies())
    docs_key = "docs" if "docs" in body else "documents"
    kind = draw(st.sampled_from([
        "documents", "single_string", "missing_documents", "blank_query", "empty_query",
        "query_type", "missing_query", "top_n_range", "top_n_type", "return_documents", "raw_scores",
    ]))
    if kind == "documents":
        body[docs_key], expected = draw(text_list_fault(docs_key))
        return body, expected, docs_key
    if kind == "single_string":
        body[docs_key] = draw(st.text(max_size=10))
        return body, f"{docs_key}: expected a list of strings, got a single string", docs_key
    if kind == "missing_documents":
        del body[docs_key]
        return body, "documents: field required", "documents"
    if kind == "blank_query":
        body["query"] = draw(blank.filter(bool))
        return body, "query: empty string", "query"
    if kind == "empty_query":
        body["query"] = ""
        return body, "query: String should have at least 1 character", "query"
    if kind == "query_type":
        body["query"] = draw(wrong_values)
        return body, "query: Input should be a valid string", "query"
    if kind == "missing_query":
        del body["query"]
        return body, "query: field required", "query"
    if kind == "top_n_range":
        body["top_n"] = draw(st.integers(max_value=0))
        return body, "top_n: Input should be greater than or equal to 1", "top_n"
    if kind == "top_n_type":
        body["top_n"] = draw(not_ints)
        return body, "top_n: Input should be a valid integer", "top_n"
    if kind == "return_documents":
        body.pop("return_documents", None)
        body.pop("return_docs", None)
        key = draw(st.sampled_from(["return_documents", "return_docs"]))
        body[key] = draw(not_bools)
        return body, f"{key}: Input should be a valid boolean", key
    body["raw_scores"] = draw(not_bools)
    return body, "raw_scores: Input should be a valid boolean", "raw_scores"


# --------------------------------------------------------------------------------------------
# schemas: valid bodies parse and round-trip
# --------------------------------------------------------------------------------------------


@fast(150)
@given(embedding_bodies())
def test_valid_embedding_bodies_parse_and_round_trip(body):
    request = parse(EmbeddingRequest, body)
    sent = body["input"]
    assert request.model == body["model"]
    sent = [sent] if isinstance(sent, str) else sent
    media = MEDIA.get((body.get("modality") or "text").lower())  # Image, Audio
    assert request.input == ([media(url) for url in sent] if media else sent)
    assert request.encoding_format == body.get("encoding_format", "float")
    assert request.dimensions == body.get("dimensions")
    assert request.modality == (body.get("modality") or "text").lower()
    assert request.user == body.get("user")
    assert request.input_type == body.get("input_type")
    assert request.output_dtype == body.get("output_dtype", body.get("embedding_type", "float"))
    truncate = body.get("truncate")
    assert request.truncate == (truncate.upper() if truncate else None)
    assert not set(request.model_dump()) - EMBED_FIELDS  # unknown fields are dropped
    assert EmbeddingRequest.model_validate(request.model_dump()) == request
    assert EmbeddingRequest.model_validate_json(request.model_dump_json()) == request


@fast(150)
@given(rerank_bodies())
def test_valid_rerank_bodies_parse_and_round_trip(body):
    request = parse(RerankRequest, body)
    assert request.model == body["model"]
    assert request.query == body["query"]
    assert request.documents == body.get("documents", body.get("docs"))
    assert request.top_n == body.get("top_n")
    assert request.return_documents == body.get("return_documents", body.get("return_docs", False))
    assert request.raw_scores == body.get("raw_scores", False)
    assert RerankRequest.model_validate(request.model_dump()) == request
    assert RerankRequest.model_validate_json(request.model_dump_json()) == request


# --------------------------------------------------------------------------------------------
# schemas: invalid bodies are refused with a message naming the offending item
# --------------------------------------------------------------------------------------------


def check_refused(model, body, expected: str, param: str) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    assert len(caught.value.errors()) == 1, caught.value.errors()  # exactly the one fault
    bad = errors.from_validation_error(caught.value)
    assert isinstance(bad, errors.BadRequest) and bad.status == 400
    assert bad.message.startswith(expected), (bad.message, expected)
    assert bad.param == param
    assert one_line(bad.message)
    index = re.match(r"^\w+\[(\d+)\]", expected)
    if index:  # the exact index, not just some index
        assert re.match(rf"^\w+\[{index[1]}\]: ", bad.message)
    # the transport-free entry point gives the same error, and only that type
    with pytest.raises(errors.BadRequest) as via_parse:
        parse(model, body)
    assert via_parse.value.message == bad.message and via_parse.value.param == param


@fast(150)
@given(invalid_embedding_bodies())
def test_invalid_embedding_bodies_name_the_item(case):
    body, expected, param = case
    check_refused(EmbeddingRequest, body, expected, param)


@fast(150)
@given(invalid_rerank_bodies())
def test_invalid_rerank_bodies_name_the_item(case):
    body, expected, param = case
    check_refused(RerankRequest, body, expected, param)


@fast(100)
@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_non_object_bodies_are_refused(body):
    for model in (EmbeddingRequest, RerankRequest, RunSyncRequest):
        with pytest.raises(errors.BadRequest) as caught:
            parse(model, body)
        assert caught.value.message == f"request body must be a JSON object, got {json_type(body)}"


# --------------------------------------------------------------------------------------------
# pipeline.parse on arbitrary JSON: a model or a BadRequest, nothing else
# --------------------------------------------------------------------------------------------

plausible_bodies = st.fixed_dictionaries(
    {}, optional={k: json_values | nonblank | st.lists(nonblank, max_size=3) for k in EMBED_FIELDS | RERANK_FIELDS}
)


@fast(150)
@given(json_values | plausible_bodies | embedding_bodies() | rerank_bodies())
def test_parse_returns_a_model_or_raises_bad_request(body):
    for model in (EmbeddingRequest, RerankRequest, RunSyncRequest):
        try:
            result = parse(model, body)
        except errors.BadRequest as exc:
            assert exc.status == 400 and exc.type == "invalid_request_error"
            assert exc.message and one_line(exc.message)
            if exc.param is not None:
                # the message starts with the field the client sent, under the name it sent
                assert exc.message.startswith(exc.param), exc.message
            continue
        assert isinstance(result, model)
        if model is EmbeddingRequest:
            assert result.input and all(
                (isinstance(t, str) and t.strip()) or (isinstance(t, (Image, Audio)) and t.url.strip())
                for t in result.input)
            assert result.dimensions is None or result.dimensions >= 1
            assert result.modality in MODALITIES
        elif model is RerankRequest:
            assert result.query.strip() and result.documents
            assert all(isinstance(t, str) and t.strip() for t in result.documents)
            assert result.top_n is None or result.top_n >= 1


@fast(100)
@given(st.dictionaries(st.sampled_from(["input", "id", "webhook"]), json_values, max_size=3))
def test_runsync_request_accepts_exactly_an_object_input(body):
    if isinstance(body.get("input"), dict):
        assert parse(RunSyncRequest, body).input == body["input"]
    else:
        with pytest.raises(errors.BadRequest) as caught:
            parse(RunSyncRequest, body)
        expected = "input: field required" if "input" not in body else "input: Input should be a valid dictionary"
        assert caught.value.message == expected and caught.value.param == "input"


@fast(100)
@given(st.text(max_size=12), json_values, st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3))
def test_runsync_response_status_is_completed_or_failed(status, error, output):
    body = {"id": "job-1", "status": status, "output": output}
    if status in ("COMPLETED", "FAILED"):
        assert RunSyncResponse.model_validate(body).status == status
    else:
        with pytest.raises(ValidationError):
            RunSyncResponse.model_validate(body)


@fast(100)
@given(json_values, json_values, json_values)
def test_batch_items_need_non_empty_strings(model, text, query):
    def ok(v):
        return isinstance(v, str) and len(v) >= 1

    for cls, body, valid in (
        (EmbedItem, {"model": model, "text": text}, ok(model) and ok(text)),
        (RerankItem, {"model": model, "query": query, "document": text}, ok(model) and ok(query) and ok(text)),
    ):
        if valid:
            cls.model_validate(body)
        else:
            with pytest.raises(ValidationError):
                cls.model_validate(body)


# --------------------------------------------------------------------------------------------
# encoding: base64 == float32 of the float rows; truncate re-normalises the prefix
# --------------------------------------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12)


def openai_decode(text: str) -> np.ndarray:
    """What the openai client does with a base64 embedding."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


@st.composite
def matrices(draw, elements=finite32, dtype=np.float32):
    m = draw(hnp.arrays(dtype, shapes, elements=elements))
    zero = draw(st.lists(st.booleans(), min_size=m.shape[0], max_size=m.shape[0]))
    m[np.array(zero)] = 0  # some all-zero rows
    return m


@fast(200)
@given(matrices())
def test_base64_rows_decode_to_the_float32_values_of_the_float_rows(m):
    b64 = encode_rows(m, "base64")
    floats = jsonable({"data": encode_rows(m, "float")})["data"]  # as the client receives them
    assert len(b64) == len(floats) == m.shape[0]
    for i, (text, row) in enumerate(zip(b64, floats)):
        assert isinstance(text, str) and text.isascii()
        decoded = openai_decode(text)
        as_float32 = np.asarray(row, dtype=np.float32)
        assert decoded.shape == (m.shape[1],)
        # bit for bit (so -0.0, subnormals and the extremes count too)
        assert np.array_equal(decoded.view("<u4"), as_float32.astype("<f4").view("<u4"))
        assert np.array_equal(decoded.view("<u4"), m[i].astype("<f4").view("<u4"))


@fast(100)
@given(matrices(elements=st.floats(-3e38, 3e38), dtype=np.float64))
def test_base64_of_float64_rows_is_their_float32_rounding(m):
    floats = jsonable(encode_rows(m, "float"))
    for text, row in zip(encode_rows(m, "base64"), floats):
        assert np.array_equal(openai_decode(text), np.asarray(row, dtype=np.float64).astype(np.float32))


@st.composite
def matrix_and_cut(draw):
    m = draw(matrices())
    n = m.shape[1]
    d = draw(st.integers(1, max(1, n - 1)))
    return m, d


@fast(150)
@given(matrix_and_cut())
def test_truncate_gives_the_unit_direction_of_the_prefix(case):
    m, d = case
    before = m.copy()
    n = m.shape[1]
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow, no NaN
        out = truncate(m, d)
    assert np.array_equal(m, before)  # the input is not modified
    if d >= n:  # n == 1: nothing to cut, returned as is
        assert out is m
        return
    assert out.shape == (m.shape[0], d)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    for row, prefix in zip(out, m[:, :d].astype(np.float64)):
        norm = np.linalg.norm(prefix)
        if norm == 0:
            assert not row.any()  # zero stays zero, no NaN
            continue
        assert abs(np.linalg.norm(row.astype(np.float64)) - 1) < 1e-5
        np.testing.assert_allclose(row, prefix / norm, rtol=0, atol=1e-6)


@st.composite
def normalised_matrices(draw):
    m = draw(matrices()).astype(np.float64)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return (m / np.where(norms == 0, 1, norms)).astype(np.float32)


@fast(100)
@given(normalised_matrices(), st.integers(0, 5), st.booleans())
def test_truncate_to_all_dimensions_keeps_normalised_rows(m, extra, none):
    dimensions = None if none else m.shape[1] + extra
    out = truncate(m, dimensions)
    assert out.shape == m.shape
    np.testing.assert_allclose(out, m, rtol=0, atol=1e-6)


@fast(100)
@given(normalised_matrices())
def test_truncate_of_normalised_rows_is_a_renormalised_slice(m):
    n = m.shape[1]
    for d in range(1, n + 1):
        out = truncate(m, d)
        prefix = m[:, :d].astype(np.float64)
        norms = np.linalg.norm(prefix, axis=1, keepdims=True)
        np.testing.assert_allclose(out, prefix / np.where(norms == 0, 1, norms), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# config: the per-model lists
# --------------------------------------------------------------------------------------------


def split(value: str) -> list[str]:
    """The list format: ';'-separated, entries stripped, blank string = unset."""
    return [p.strip() for p in value.split(";")] if value.strip() else []


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("model-dirs")
    dirs = [root / "alpha", root / "beta"]
    for d in dirs:
        d.mkdir()
    return [str(d) for d in dirs]


hub_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,8}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,8})?", fullmatch=True)
MISSING = ["/nonexistent/model-x", "./no-such-model-dir", "../no-such-model-dir", "~/no-such-model-dir-x"]
source_entries = st.one_of(
    st.tuples(st.just("hub"), hub_ids),
    st.tuples(st.just("dir"), st.integers(0, 1).map(str)),
    st.tuples(st.just("missing"), st.sampled_from(MISSING)),
    st.tuples(st.just("empty"), blank.filter(lambda s: ";" not in s)),
)
pad = st.sampled_from(["", " ", "  ", "\t"])
batch_entries = st.one_of(
    st.integers(1, 4096).map(str),
    st.text(alphabet="0123456789", min_size=1, max_size=4),
    st.sampled_from(["0", "-1", "abc", "", "1.5", "+4", "1e3", "32 x"]),
)
dtype_entries = st.one_of(
    st.sampled_from(sorted(DTYPE_ALIASES)).flatmap(lambda d: st.sampled_from([d, d.upper(), d.title()])),
    st.sampled_from(["fp64", "float8", "", "int4", "bf 16"]),
)
served_entries = st.text(alphabet=st.characters(blacklist_characters=";", blacklist_categories=("Cs",)), max_size=8)


@st.composite
def per_model_lists(draw):
    sources = draw(st.lists(st.tuples(source_entries, pad, pad), min_size=1, max_size=4))
    n = len(sources)

    def sized(entries):
        size = draw(st.sampled_from([0, 1, n, n + 1, max(2, n - 1)]))
        return draw(st.lists(entries, min_size=size, max_size=size))

    separator = draw(st.sampled_from([";", " ; ", ";  "]))
    return sources, sized(served_entries), sized(batch_entries), sized(dtype_entries), separator


def expected_outcome(names: str, served_raw: str, batches_raw: str, dtypes_raw: str):
    """(specs, set()) when the lists are consistent, else (None, {variables that are wrong})."""
    sources = split(names)
    bundled = not sources
    if bundled:
        sources = [bundled_model_path()]
    if any(not s for s in sources) or any(
        s.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(s)) for s in sources
    ):
        return None, {"MODEL_NAMES"}  # checked first: the other lists are counted against it
    n = len(sources)
    wrong = set()
    served = split(served_raw)
    if served and (len(served) != n or any(not s for s in served) or len(set(served)) != n):
        wrong.add("SERVED_MODEL_NAMES")
    if not served:
        served = [BUNDLED_MODEL_ID] if bundled else sources
        if len(set(served)) != n:  # the same source twice: reported as SERVED_MODEL_NAMES
            wrong |= {"MODEL_NAMES", "SERVED_MODEL_NAMES"}

    def per_model(var, raw, default, valid):
        values = split(raw) or [default]
        if len(values) not in (1, n) or not all(valid(v) for v in values):
            wrong.add(var)
            return None
        return values * n if len(values) == 1 else values

    batches = per_model("BATCH_SIZES", batches_raw, "32", lambda v: re.fullmatch(r"[0-9]+", v) and int(v) >= 1)
    dtypes = per_model("DTYPES", dtypes_raw, "auto", lambda v: v.lower() in DTYPE_ALIASES)
    if wrong:
        return None, wrong
    return tuple(
        ModelSpec(source=s, served_name=name, batch_size=int(b), dtype=DTYPE_ALIASES[d.lower()], bundled=bundled)
        for s, name, b, d in zip(sources, served, batches, dtypes)
    ), set()


@fast(150)
@given(per_model_lists())
def test_per_model_lists_resolve_or_name_the_variable(model_dirs, lists):
    sources, served, batches, dtypes, sep = lists
    texts = []
    for (kind, value), left, right in sources:
        text = model_dirs[int(value)] if kind == "dir" else value
        texts.append(left + text + right)
    raw = {
        "MODEL_NAMES": sep.join(texts),
        "SERVED_MODEL_NAMES": sep.join(served),
        "BATCH_SIZES": sep.join(batches),
        "DTYPES": sep.join(dtypes),
    }
    specs, wrong = expected_outcome(*raw.values())
    settings_ = Settings(
        model_names=raw["MODEL_NAMES"],
        served_model_names=raw["SERVED_MODEL_NAMES"],
        batch_sizes=raw["BATCH_SIZES"],
        dtypes=raw["DTYPES"],
    )
    try:
        resolved = settings_.models
    except ConfigError as exc:  # anything else escapes and fails the test
        message = str(exc)
        assert one_line(message)
        var = message.split("=", 1)[0]
        assert var in wrong, (message, wrong)
        assert message.startswith(f"{var}={raw[var]!r}: "), message
        return
    assert not wrong, f"accepted, but {wrong} should have been refused: {raw}"
    assert resolved == specs


@fast(100)
@given(st.lists(st.tuples(st.text(
    alphabet=st.characters(blacklist_characters=";,", blacklist_categories=("Cs",)), min_size=1, max_size=12
).filter(str.strip), st.sampled_from([";", ",", " ; ", ", ", ",\t"])), max_size=5))
def test_api_keys_split_on_semicolons_and_commas(parts):
    raw = "".join(key + sep for key, sep in parts[:-1]) + (parts[-1][0] if parts else "")
    assert Settings(api_key=raw).api_keys == tuple(key.strip() for key, _ in parts)


@pytest.mark.parametrize("raw", ["key1;", ";key1", "key1,,key2", ";", " , "])
def test_api_keys_never_contain_an_empty_key(raw):
    assert "" not in Settings(api_key=raw).api_keys


@pytest.mark.parametrize("raw", ["²", "16;³", "¹"])
def test_batch_sizes_with_unicode_digits_are_a_config_error(raw):
    with pytest.raises(ConfigError, match=r"^BATCH_SIZES="):
        Settings(model_names="org/a;org/b", batch_sizes=raw).models


v4_networks = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: ipaddress.IPv4Network(t, strict=False)
)
v6_networks = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
    lambda t: ipaddress.IPv6Network(t, strict=False)
)


@st.composite
def network_texts(draw):
    """A CIDR as an operator may write it: host bits set, or a bare address."""
    net = draw(v4_networks | v6_networks)
    host = net.network_address + draw(st.integers(0, net.num_addresses - 1))
    text = draw(st.sampled_from([str(net), f"{host}/{net.prefixlen}", str(host)]))
    return draw(pad) + text + draw(pad)


@fast(100)
@given(st.lists(st.tuples(network_texts(), st.sampled_from([";", ",", " , ", "; "])), max_size=4))
def test_allowed_networks_parse_every_entry(parts):
    raw = "".join(text + sep for text, sep in parts[:-1]) + (parts[-1][0] if parts else "")
    expected = tuple(ipaddress.ip_network(text.strip(), strict=False) for text, _ in parts)
    assert Settings(image_fetch_allowed_networks=raw).allowed_networks == expected


@fast(60)
@given(
    st.lists(network_texts(), max_size=3),
    st.sampled_from(["10.0.0.0/33", "not-a-net", "10.0.0/8", "::1/129", "1.2.3.4/-1", "", "example.com"]),
    st.data(),
)
def test_a_bad_allowed_network_is_named(good, bad, data):
    parts = list(good) or ["10.0.0.0/8"]  # a blank value alone is "no networks", not an error
    parts.insert(data.draw(st.integers(0, len(parts))), bad)
    raw = ";".join(parts)
    with pytest.raises(ValidationError) as caught:
        Settings(image_fetch_allowed_networks=raw)
    message = _describe(caught.value)  # what load_settings turns into a ConfigError
    assert message.startswith(f"IMAGE_FETCH_ALLOWED_NETWORKS={raw!r}: ")
    assert f"{bad!r} is not an IP network" in message
    assert one_line(message)


# --------------------------------------------------------------------------------------------
# inputs: data URIs, base64, the address policy
# --------------------------------------------------------------------------------------------


def wrap(text: str, width: int | None, newline: str) -> str:
    if not width:
        return text
    return newline.join(text[i : i + width] for i in range(0, len(text), width))


@fast(200)
@given(
    st.binary(max_size=300),
    st.sampled_from(["image/png", "image/jpeg", "IMAGE/WebP", "image/svg+xml", " image/gif ", ""]),
    st.sampled_from(["base64", "BASE64", " base64 "]),
    st.lists(st.sampled_from(["charset=utf-8", "name=a.png", "foo"]), max_size=2),
    st.integers(0, 2),
    st.sampled_from([None, 76, 64, 5]),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
    st.integers(0, 64),
)
def test_data_uris_decode_to_their_bytes(data, mime, b64, others, at, width, newline, unpadded, slack):
    params = list(others)
    params.insert(min(at, len(params)), b64)
    encoded = base64.b64encode(data).decode()
    if unpadded:
        encoded = encoded.rstrip("=")
    uri = f"data:{mime}" + "".join(";" + p for p in params) + "," + wrap(encoded, width, newline)
    max_bytes = len(data) + slack
    assert parse_data_uri(uri, max_bytes) == data
    assert _b64decode(wrap(encoded, width, newline), max_bytes, "base64 image") == data


@fast(150)
@given(st.binary(min_size=1, max_size=300), st.data())
def test_data_uris_over_the_limit_are_refused(data, draw):
    limit = draw.draw(st.integers(0, len(data) - 1))
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    with pytest.raises(MediaError, match=r"IMAGE_MAX_BYTES"):
        parse_data_uri(uri, limit)


@fast(150)
@given(st.binary(max_size=60), st.sampled_from(["text/plain", "application/octet-stream", "audio/wav", "imagex/png"]))
def test_data_uris_with_a_non_image_type_are_refused(data, mime):
    with pytest.raises(MediaError, match=re.escape(f"media type {mime!r}")):
        parse_data_uri(f"data:{mime};base64," + base64.b64encode(data).decode(), 10_000)


@fast(100)
@given(st.binary(max_size=60), st.sampled_from(["", ";charset=utf-8", ";base65"]))
def test_data_uris_without_base64_are_refused(data, params):
    with pytest.raises(MediaError, match="only base64 data URIs"):
        parse_data_uri(f"data:image/png{params}," + base64.b64encode(data).decode(), 10_000)


@fast(150)
@given(st.binary(max_size=60), st.sampled_from([" ", "*", "é", "-", "_", "!", "\t"]), st.data())
def test_data_uris_with_foreign_characters_are_refused(data, junk, draw):
    encoded = base64.b64encode(data).decode()
    at = draw.draw(st.integers(0, len(encoded)))
    with pytest.raises(MediaError, match="not valid base64"):
        parse_data_uri("data:image/png;base64," + encoded[:at] + junk + encoded[at:], 10_000)


@fast(200)
@given(
    st.one_of(
        st.text(max_size=40),
        st.text(max_size=40).map(lambda s: "data:" + s),
        st.text(alphabet=string.ascii_letters + string.digits + "+/=;,:\r\n", max_size=40).map(lambda s: "data:" + s),
    ),
    st.integers(0, 64),
)
def test_parse_data_uri_returns_bytes_or_raises_image_error(text, max_bytes):
    try:
        out = parse_data_uri(text, max_bytes)
    except MediaError as exc:
        assert str(exc)
        return
    assert isinstance(out, bytes) and len(out) <= max_bytes


@pytest.mark.parametrize("size", [1, 2, 1000])
def test_a_padded_payload_of_exactly_the_limit_is_accepted(size):
    data = b"x" * size
    assert parse_data_uri("data:image/png;base64," + base64.b64encode(data).decode(), size) == data


DEFAULT_POLICY = MediaPolicy(
    max_bytes=1, max_pixels=1, max_images=1, max_redirects=0, timeout=1.0, allow_private=False, allowed_networks=()
)
INTERNAL_V4 = [ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4",
)]
INTERNAL_V6 = [ipaddress.IPv6Network(n) for n in (
    "::1/128", "::/128", "fc00::/7", "fe80::/10", "ff00::/8", "2001:db8::/32", "100::/64",
)]


def addresses_in(networks):
    return st.sampled_from(networks).flatmap(
        lambda n: st.integers(int(n.network_address), int(n.broadcast_address)).map(ipaddress.ip_address)
    )


internal_v4 = addresses_in(INTERNAL_V4)
any_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@st.composite
def embeddings_of(draw, v4: ipaddress.IPv4Address):
    """Every IPv6 form that carries `v4`, with random bits where the form has free bits."""
    i = int(v4)
    six_to_four = ipaddress.IPv6Address((0x2002 << 112) | (i << 80) | draw(st.integers(0, 2**80 - 1)))
    teredo = ipaddress.IPv6Address(
        (0x20010000 << 96) | (draw(st.integers(0, 2**32 - 1)) << 64)
        | (draw(st.integers(0, 2**32 - 1)) << 32) | (~i & 0xFFFFFFFF)
    )
    forms = {
        "mapped": ipaddress.IPv6Address((0xFFFF << 32) | i),
        "6to4": six_to_four,
        "nat64": ipaddress.IPv6Address((0x64FF9B << 96) | i),
        "teredo": teredo,
        "compat": ipaddress.IPv6Address(i),
    }
    # the forms really carry v4 (so the property below tests the policy, not the generator)
    assert forms["mapped"].ipv4_mapped == v4
    assert six_to_four.sixtofour == v4
    assert teredo.teredo[1] == v4
    return forms


@fast(200)
@given(internal_v4 | any_v4, st.data())
def test_embedded_ipv4_is_refused_when_the_plain_ipv4_is(v4, data):
    forms = data.draw(embeddings_of(v4))
    if not address_allowed(v4, DEFAULT_POLICY):
        refused = {name for name, ip in forms.items() if not address_allowed(ip, DEFAULT_POLICY)}
        assert refused == set(forms), f"{v4} refused, but allowed as {set(forms) - refused}"


@fast(200)
@given(internal_v4 | addresses_in(INTERNAL_V6))
def test_internal_addresses_are_refused_by_default(ip):
    assert not address_allowed(ip, DEFAULT_POLICY)


@fast(200)
@given(internal_v4 | any_v4 | st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))
def test_allow_private_allows_everything(ip):
    policy = MediaPolicy(**{**DEFAULT_POLICY.__dict__, "allow_private": True})
    assert address_allowed(ip, policy)


@fast(200)
@given(st.sampled_from(INTERNAL_V4 + INTERNAL_V6).flatmap(
    lambda n: st.integers(n.prefixlen, n.max_prefixlen).flatmap(
        lambda p: st.integers(0, n.num_addresses - 1).map(
            lambda k: ipaddress.ip_network(f"{n.network_address + k}/{p}", strict=False))
    )), st.data())
def test_allow_listed_networks_are_allowed_and_nothing_more(net, data):
    policy = MediaPolicy(**{**DEFAULT_POLICY.__dict__, "allowed_networks": (net,)})
    inside = net.network_address + data.draw(st.integers(0, net.num_addresses - 1))
    assert address_allowed(inside, policy)
    other = data.draw(internal_v4 | addresses_in(INTERNAL_V6))
    if other not in net:
        assert not address_allowed(other, policy)
