"""The tokenize family: `POST /v1/tokenize` (and TEI's `/tokenize`, `/decode`), so that a client
can budget its texts against the model's window before it sends them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..engine.base import ModelBackend, Tokens
from . import schemas
from .errors import BadRequest, too_many
from .models import Models
from .options import Prompt, choose_prompt
from .pipeline import Pipeline, parse
from .schemas import TokenizeRequest


@dataclass
class Tokenized:
    model: ModelBackend
    prompt: Prompt
    tokens: list[Tokens]  # of prompt + text
    starts: list[int]  # where each input text starts in what was tokenised (the prompt's length)


class Tokenize:
    def __init__(self, pipeline: Pipeline, models: Models):
        self.pipeline = pipeline
        self.models = models

    async def create(self, body: Any) -> dict[str, Any]:
        request = parse(TokenizeRequest, body)
        done = await self.tokens(request.model, request.input, request.add_special_tokens,
                                 request.prompt_name)
        items = []
        for i, (toks, start) in enumerate(zip(done.tokens, done.starts)):
            offsets = [None if special or a < start else [a - start, b - start]
                       for (a, b), special in zip(toks.offsets, toks.special)]
            items.append({"object": "tokens", "index": i, "count": len(toks.ids),
                          "ids": toks.ids, "tokens": toks.strings, "offsets": offsets})
        return schemas.tokenize_response(request.model, done.model.info.window,
                                         done.prompt.name, items)

    async def tokens(self, name: str, texts: list[str], add_special_tokens: bool = True,
                     prompt_name: str | None = None, field: str = "input") -> Tokenized:
        """Each text's tokens as the model sees them: its prompt (`prompt_name`, else the
        model's default prompt for an embedder) before it."""
        settings = self.pipeline.settings
        if len(texts) > settings.max_input_items:
            raise too_many(field, len(texts), settings.max_input_items, "MAX_INPUT_ITEMS")
        self.pipeline.check_sizes(field, texts)
        model = self.models.get(name)
        prompt = choose_prompt(model, prompt_name, None, None) \
            if "embed" in model.info.capabilities or prompt_name else Prompt()
        async with self.pipeline.admit("tokenize", model, len(texts)):
            tokens = await asyncio.to_thread(model.tokenize, [prompt.text + t for t in texts],
                                             add_special_tokens)
        if tokens is None:
            raise BadRequest(f"model {name!r} has no fast tokenizer to tokenize with",
                             param="model")
        return Tokenized(model, prompt, tokens, [len(prompt.text)] * len(texts))

    async def decode(self, name: str, ids: list[list[int]], skip_special_tokens: bool = True
                     ) -> list[str]:
        model = self.models.get(name)
        texts = await asyncio.to_thread(model.decode, ids, skip_special_tokens)
        if texts is None:
            raise BadRequest(f"model {name!r} has no text tokenizer to decode with",
                             param="model")
        return texts
