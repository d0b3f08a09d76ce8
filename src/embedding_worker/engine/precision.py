"""bf16 only where it keeps the model's numbers.

Before a model is served in bf16, probe texts (a reranker: probe pairs) go through it in bf16 and
in ONNX Runtime's fp32; every embedding must agree to cosine >= MIN_COSINE, every reranker score
(the sigmoid the API returns) within MAX_SCORE_GAP, in the same order per query (for documents
more than MAX_SCORE_GAP apart). The verdict is kept beside the model's export (`VERDICT_FILE`,
keyed by the runtime's version), so the probe runs once per model and machine image, not on
every start; a model that fails is served in fp32, and the start-up line says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import is_fault

logger = logging.getLogger("embedding_worker")

MIN_COSINE = 0.9999
MAX_SCORE_GAP = 0.01
VERDICT_FILE = "bf16-verdict.json"

# Short and long, plain and punctuated, numbers, code, several scripts: what a model meets
PROBE_TEXTS = [
    "hello",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "Tides are driven mostly by the Moon's gravity, and a little by the Sun's; twice a day the "
    "sea rises and falls along most coasts, and the range depends on the shape of the basin.",
    "Q3 revenue rose 12.5% to $4.2bn (2023: $3.7bn); operating margin 18.1%.",
    "def add(a, b):\n    return a + b  # a function",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "¿Dónde está la biblioteca? Está cerca de la estación.",
    "ERROR 404: the page /api/v2/users?id=17 was not found",
    "a a a a a a a a a a a a a a a a a a a a a a a a",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing "
    "oxygen as a by-product; it takes place in the chloroplasts of plant cells. " * 3,
]
PROBE_QUERIES = ["Which product has warranty coverage?", "how do tides work"]


def probe_pairs() -> list[tuple[str, str]]:
    return [(q, d) for q in PROBE_QUERIES for d in PROBE_TEXTS]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str  # what was measured, for the log


def _float64(rows: Any) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


def judge(reference: Any, candidate: Any, cross_encoder: bool) -> Verdict:
    """bf16's rows (`candidate`) against fp32's (`reference`): embeddings by cosine, a cross-encoder's
    logits by their sigmoid scores and the order per query (`probe_pairs`' layout)."""
    if not cross_encoder:  # rows may differ in length (a ColBERT text's vectors, flattened)
        worst = min(float(r @ c / (np.linalg.norm(r) * np.linalg.norm(c))) for r, c in
                    zip(map(_float64, reference), map(_float64, candidate)))
        return Verdict(worst >= MIN_COSINE, f"min cosine {worst:.6f} vs fp32 (>= {MIN_COSINE})")
    reference, candidate = _float64(reference), _float64(candidate)
    ref, got = (1 / (1 + np.exp(-reference.ravel()))), (1 / (1 + np.exp(-candidate.ravel())))
    gap = float(np.abs(ref - got).max())
    per_query = len(PROBE_TEXTS)
    same_order = all(_same_order(ref[i:i + per_query], got[i:i + per_query])
                     for i in range(0, len(ref), per_query))
    return Verdict(gap <= MAX_SCORE_GAP and same_order,
                   f"max score gap {gap:.4f} vs fp32 (<= {MAX_SCORE_GAP}), "
                   f"order {'kept' if same_order else 'changed'}")


def kept_verdict(directory: Path, runtime_version: str) -> Verdict | None:
    """The verdict an earlier probe kept for this model and runtime version, if any."""
    try:
        kept = json.loads((directory / VERDICT_FILE).read_text())
        if kept.get("runtime_version") == runtime_version:
            return Verdict(bool(kept["ok"]), kept["detail"] + " (kept)")
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def probe(directory: Path, runtime_version: str, cross_encoder: bool,
          run_fp32: Callable[[list[Any]], Any], run_bf16: Callable[[list[Any]], Any]) -> Verdict:
    """The probe's verdict, kept where the export's directory can be written."""
    path = directory / VERDICT_FILE
    probes: list[Any] = probe_pairs() if cross_encoder else list(PROBE_TEXTS)
    reference, candidate = run_fp32(probes), run_bf16(probes)
    # probes the model itself fails on (a fault in either run) are left out of the comparison
    both = [i for i in range(len(probes))
            if not is_fault(reference[i]) and not is_fault(candidate[i])]
    if cross_encoder and len(both) < len(probes):
        verdict = Verdict(False, f"{len(probes) - len(both)} probe pairs failed")
    elif not both:
        verdict = Verdict(False, "every probe text failed")
    else:
        verdict = judge([reference[i] for i in both], [candidate[i] for i in both], cross_encoder)
    try:
        path.write_text(json.dumps({"runtime_version": runtime_version, "ok": verdict.ok,
                                    "detail": verdict.detail}))
    except OSError as exc:  # a model's own read-only directory: probed again next start
        logger.info("bf16 verdict not kept in %s: %s", directory, exc)
    return verdict


def _same_order(ref: np.ndarray, got: np.ndarray) -> bool:
    """Every two documents whose fp32 scores are more than MAX_SCORE_GAP apart keep their order
    (closer ones are ties at this tolerance: irrelevant documents all score near 0)."""
    apart = (ref[:, None] - ref[None, :]) > MAX_SCORE_GAP
    return bool(((got[:, None] - got[None, :]) > 0)[apart].all())
