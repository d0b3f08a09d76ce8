"""Output encoding: `dimensions` truncation, float/base64 embeddings, JSON bytes."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def as_matrix(embeddings: list[Any]) -> np.ndarray:
    """Infinity returns one 1-D array per item; stack them as float32 rows."""
    return np.asarray(np.stack(embeddings), dtype=np.float32)


def truncate(matrix: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and re-normalise each row to unit length.

    Infinity slices without re-normalising; a truncated Matryoshka vector must be re-normalised to
    keep cosine = dot product for the caller.
    """
    if dimensions is None or dimensions >= matrix.shape[1]:
        return matrix
    cut = matrix[:, :dimensions]
    # The norm in float64: float32 squares overflow above ~1.8e19 (the row became all zeros) and
    # underflow below ~1e-19 (the row stayed un-normalised).
    norms = np.linalg.norm(cut.astype(np.float64), axis=1, keepdims=True)
    return (cut / np.where(norms == 0, 1, norms)).astype(cut.dtype, copy=False)


def encode_rows(matrix: np.ndarray, encoding_format: str) -> list[Any]:
    """One entry per row: the float32 array itself, or base64 of its little-endian bytes.

    Rows stay numpy arrays; `dumps` writes them straight to JSON without a Python float per value.
    """
    if encoding_format == "base64":
        little = matrix.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    return list(matrix)


def dumps(payload: Any) -> bytes:
    return orjson.dumps(payload, option=_DUMPS_OPTIONS)


def jsonable(payload: Any) -> Any:
    """Plain Python (dict/list/float/str) equivalent of a payload, for `json.dumps` callers."""
    return orjson.loads(dumps(payload))
