"""Retrieval options of an embedding request, applied once for every route and transport:
the prompt (`prompt_name`, `input_type`, `task`, or the model's default) and truncation
(`truncate`: END, START, NONE). Output types are in `encoding`.

The names a client may use for a kind of input map to the prompt names a model may have, tried in
order; docs/retrieval.md has the table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from ..engine.base import ModelBackend, Tokens
from .errors import BadRequest

# a kind of input -> the prompt names that serve it, in the order they are looked for
PROMPTS_FOR_KIND = {
    "query": ("query", "search_query", "retrieval.query", "retrieval_query", "queries", "q"),
    "document": ("document", "passage", "corpus", "search_document", "retrieval.passage",
                 "retrieval_passage", "documents", "passages", "doc"),
    "classification": ("classification", "classify"),
    "clustering": ("clustering", "cluster", "separation"),
    "text-matching": ("text-matching", "text_matching", "sts", "similarity"),
}
# what a request may say -> the kind: Cohere's and Voyage's input_type, Jina's task
INPUT_TYPES = {"search_query": "query", "search_document": "document", "query": "query",
               "document": "document", "classification": "classification",
               "clustering": "clustering"}
TASKS = {"retrieval.query": "query", "retrieval.passage": "document",
         "text-matching": "text-matching", "classification": "classification",
         "separation": "clustering"}
TRUNCATIONS = ("END", "START", "NONE")


@dataclass(frozen=True)
class Prompt:
    name: str | None = None  # the model's prompt applied, if any
    text: str = ""
    note: str | None = None  # why none applied although one was asked for


def choose_prompt(model: ModelBackend, prompt_name: str | None, input_type: str | None,
                  task: str | None) -> Prompt:
    """The prompt a request asks for; with none asked, the model's default (as
    sentence-transformers does). An unknown `prompt_name` is a 400 listing the model's prompts;
    an `input_type` or `task` the model has no prompt for applies none, with a note."""
    prompts: Mapping[str, str] = dict(model.info.prompts)
    given = {field: value for field, value in
             (("prompt_name", prompt_name), ("input_type", input_type), ("task", task))
             if value is not None}
    if len(given) > 1:
        raise BadRequest(f"{' and '.join(given)}: give one of them, not several",
                         param=next(iter(given)))
    if prompt_name is not None:
        if prompt_name not in prompts:
            names = ", ".join(repr(n) for n in prompts) or "none"
            raise BadRequest(f"prompt_name: {prompt_name!r} is not a prompt of model "
                             f"{model.info.name!r}; its prompts: {names}", param="prompt_name")
        return Prompt(prompt_name, prompts[prompt_name])
    if given:
        field, value = next(iter(given.items()))
        kind = (INPUT_TYPES if field == "input_type" else TASKS)[value]
        for name in PROMPTS_FOR_KIND[kind]:
            if name in prompts:
                return Prompt(name, prompts[name])
        return Prompt(note=f"{field} {value!r}: model {model.info.name!r} has no prompt for it; "
                           f"none applied")
    default = model.info.default_prompt_name
    return Prompt(default, prompts[default]) if default else Prompt()


async def cut_to(model: ModelBackend, texts: list[str], prompt: str, limit: int,
                 keep: str) -> list[str]:
    """Each text cut so that, with the prompt and the special tokens, it fits `limit` tokens:
    keep="end" drops its start (truncate=START), keep="start" its end (truncate=END under a
    token limit below the model's window, e.g. Cohere's max_tokens; at the window the engine
    truncates). The cut falls at a word's boundary (a word's pieces would be tokenised
    differently alone), so a text may keep a few tokens less than fit."""
    tokens = await asyncio.to_thread(model.tokenize, [prompt, *texts] if prompt else texts)
    if tokens is None:
        raise BadRequest(f"truncate: cutting a text to a token limit needs a fast tokenizer, "
                         f"which model {model.info.name!r} lacks; use END or NONE",
                         param="truncate")
    budget = max(limit - model.info.special_tokens - (len(tokens[0].ids) if prompt else 0), 1)
    if prompt:
        tokens = tokens[1:]
    return [text if len(toks.ids) <= budget else
            _keep_end(text, toks, budget) if keep == "end" else _keep_start(text, toks, budget)
            for text, toks in zip(texts, tokens)]


def _same_word(toks: Tokens, i: int) -> bool:
    """Token `i` continues the word of token `i - 1`."""
    return toks.words[i] is not None and toks.words[i] == toks.words[i - 1]


def _keep_end(text: str, toks: Tokens, budget: int) -> str:
    cut = first = len(toks.ids) - budget
    while cut < len(toks.ids) and _same_word(toks, cut):
        cut += 1  # inside a word: start at the next one
    if cut == len(toks.ids):  # one word longer than the budget: cut inside it
        cut = first
    return text[toks.offsets[cut][0]:]


def _keep_start(text: str, toks: Tokens, budget: int) -> str:
    cut = budget  # tokens kept
    while cut > 0 and _same_word(toks, cut):
        cut -= 1  # the next token continues a kept word: drop that word
    if cut == 0:  # one word longer than the budget: cut inside it
        cut = budget
    return text[:toks.offsets[cut - 1][1]]
