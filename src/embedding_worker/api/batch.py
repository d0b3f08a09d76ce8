"""BentoML's batchable methods (`/batch/embed`, `/batch/rerank`, for Bento-to-Bento callers):
the per-item check BentoML runs before an item joins a batch."""

from __future__ import annotations

from typing import Any

from pydantic import AfterValidator

from ..core.core import Core
from ..core.errors import APIError
from ..core.options import choose_prompt


def served_with(core: Core, capability: str) -> AfterValidator:
    """Check a batch item's model against `core` before batching: one caller's bad model must
    not fail the other callers' items batched with it (BentoML fails a batch whole)."""

    def check(item: Any) -> Any:
        try:
            model = core.models.require(item.model, capability)
            if getattr(item, "prompt_name", None) is not None:
                choose_prompt(model, item.prompt_name, None, None)
        except APIError as exc:
            raise ValueError(exc.message) from None
        return item

    return AfterValidator(check)
