"""Output encoding: `dimensions` truncation, output types (float, int8, uint8, binary, ubinary),
float/base64 embeddings, JSON bytes."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def as_matrix(embeddings: list[Any]) -> np.ndarray:
    """Infinity returns one 1-D array per item; stack them as float32 rows."""
    return np.asarray(np.stack(embeddings), dtype=np.float32)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero)."""
    # The norm in float64: float32 squares overflow above ~1.8e19 (the row became all zeros) and
    # underflow below ~1e-19 (the row stayed un-normalised).
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1, norms)).astype(matrix.dtype, copy=False)


def truncate(matrix: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and re-normalise each row to unit length.

    Infinity slices without re-normalising; a truncated Matryoshka vector must be re-normalised to
    keep cosine = dot product for the caller.
    """
    if dimensions is None or dimensions >= matrix.shape[1]:
        return matrix
    return unit_rows(matrix[:, :dimensions])


def vectors(matrix: np.ndarray, dimensions: int | None, normalize: bool, unit: bool) -> np.ndarray:
    """What a request gets of the engine's rows: cut to `dimensions`, and of unit length unless
    it asked for the model's own vectors (`unit`: the engine's rows are of unit length already)."""
    if dimensions is not None and dimensions < matrix.shape[1]:
        matrix = matrix[:, :dimensions]
        return unit_rows(matrix) if normalize else matrix
    return unit_rows(matrix) if normalize and not unit else matrix


OUTPUT_DTYPES = ("float", "int8", "uint8", "binary", "ubinary")
# int8: a fixed scale for unit vectors, so that a text's bytes depend on nothing but the text
# and the model (not on the batch, as per-batch ranges would). A unit vector's components have a
# standard deviation near 1/sqrt(d); +-127 spans INT8_SIGMAS of them, and the rare component
# beyond is clipped. Chosen with bench/quantization.py (docs/performance.md).
INT8_SIGMAS = 4.0


def quantize(matrix: np.ndarray, output_dtype: str) -> np.ndarray:
    """Unit-length float32 rows in the requested output type (rows re-normalised first by
    `truncate` when `dimensions` cut them).

    - int8: round(x * 127 * sqrt(d) / INT8_SIGMAS), clipped to -128..127; uint8: the same + 128.
    - binary / ubinary: one bit per dimension (positive -> 1), packed 8 per byte, most significant
      bit first; ubinary as unsigned bytes, binary as signed (byte - 128): the definitions of
      sentence-transformers' `quantize_embeddings` and of Cohere. d must be a multiple of 8.
    """
    if output_dtype == "float":
        return matrix
    if output_dtype in ("binary", "ubinary"):
        packed = np.packbits(matrix > 0, axis=1)
        return packed if output_dtype == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    scale = 127 * np.sqrt(matrix.shape[1]) / INT8_SIGMAS
    signed = np.clip(np.rint(matrix * scale), -128, 127)
    if output_dtype == "int8":
        return signed.astype(np.int8)
    return (signed + 128).astype(np.uint8)


def encode_rows(matrix: np.ndarray, encoding_format: str) -> list[Any]:
    """One entry per row: the array itself (float32, or the integer type of a compact output),
    or base64 of its bytes (little-endian float32, or the bytes as they are).

    Rows stay numpy arrays; `dumps` writes them straight to JSON without a Python number per value.
    """
    if encoding_format == "base64":
        if np.issubdtype(matrix.dtype, np.floating):
            matrix = matrix.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in matrix]
    return list(matrix)


def dumps(payload: Any) -> bytes:
    return orjson.dumps(payload, option=_DUMPS_OPTIONS)


def jsonable(payload: Any) -> Any:
    """Plain Python (dict/list/float/str) equivalent of a payload, for `json.dumps` callers."""
    return orjson.loads(dumps(payload))
