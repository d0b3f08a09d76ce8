"""Deterministic, realistic request bodies: short queries and ~100-300 token passages."""

from __future__ import annotations

import random
import re
from functools import lru_cache


@lru_cache(maxsize=1)
def _words(vocab_file: str) -> list[str]:
    words = [w.strip() for w in open(vocab_file, encoding="utf-8")]
    return [w for w in words if re.fullmatch(r"[a-z]{3,12}", w)]


def texts(vocab_file: str, n: int, seed: int = 0) -> list[str]:
    """Half short queries (4-12 words), half passages (80-220 words, ~100-300 tokens)."""
    rng = random.Random(seed)
    words = _words(vocab_file)
    out = []
    for i in range(n):
        length = rng.randint(4, 12) if i % 2 == 0 else rng.randint(80, 220)
        sentence = " ".join(rng.choice(words) for _ in range(length))
        out.append(sentence.capitalize() + ("?" if length < 13 else "."))
    return out


def fixed_tokens(vocab_file: str, n: int, tokens: int, seed: int = 0) -> list[str]:
    """Texts of `tokens` tokens each for a BERT tokenizer with this vocabulary, [CLS] and [SEP]
    included: every word is a whole entry of the vocabulary, so one token."""
    rng = random.Random(seed)
    words = _words(vocab_file)
    return [" ".join(rng.choice(words) for _ in range(tokens - 2)) for _ in range(n)]
