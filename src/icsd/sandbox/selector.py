"""The sandbox world's LLM: the paper's selection rule, executed symbolically.

It reads the numbered candidates out of the prompt, as an LLM would. In selection mode (the answer
schema asks for ``index``) it follows the official prompt's words: "find 5 to 10 sentences that
form a description ... of the same image" and "the meanings of the selected sentences ... should
not conflict". Sentences about one image are about the same thing, so it first finds what the list
is mostly about: the object kind the most candidates name (the earliest named on a tie), its
*topic*. It then keeps, in the order given, the candidates that name the topic and contradict none
kept already (the same object kind with another colour, size, count or position, or another
background), up to the schema's maximum; it merges the kept captions into one sentence of at most
``max_words`` words. It reads only the prompt: which scene a caption was written about stays hidden. With fewer than the minimum it answers with what it
found, which the stage judges ``invalid``, as it would an LLM's short list. In first-n mode (no
``index`` in the schema) it merges all captions shown, contradictions included (first said wins).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from ..llm.base import BackendSpec, ChatAnswer, ChatBackend, ChatRequest, GenerationParams, K
from .lexicon import Description, conflicts, describe, merge, parse

MODEL_NAME = "sandbox-selector"
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+(.*\S)\s*$")
_WORDS = re.compile(r"at most (\d+) words")
_ANGLED = re.compile(r"<(\d+)>\s*(.*?)(?=\s*<\d+>|\s*$)", re.S)


def candidates_in(prompt: str) -> list[str]:
    """The prompt's last numbered list, in order: lines ``1. text``, or the official prompt's
    ``<1> text. <2> text.``."""
    angled = _ANGLED.findall(prompt)
    if angled and angled[0][0] == "1":
        return [text.strip().removesuffix(".").strip() for _, text in angled]
    found: list[str] = []
    for line in prompt.splitlines():
        m = _NUMBERED.match(line)
        if not m:
            continue
        if int(m.group(1)) == 1:
            found = []
        found.append(m.group(2))
    return found


def topic(descriptions: list[Description]) -> str | None:
    """The object kind the most descriptions name (the earliest named wins a tie)."""
    counts: dict[str, int] = {}
    for d in descriptions:
        for kind in d.objects:
            counts[kind] = counts.get(kind, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None  # dicts keep first-named order


def select(descriptions: list[Description], max_select: int) -> list[int]:
    """0-based indices kept: greedily, in order, those naming the list's topic and contradicting
    no earlier kept one."""
    subject = topic(descriptions)
    kept: list[int] = []
    for i, d in enumerate(descriptions):
        if subject not in d.objects:
            continue
        if all(not conflicts(descriptions[j], d) for j in kept):
            kept.append(i)
        if len(kept) == max_select:
            break
    return kept


def answer(prompt: str, schema: dict[str, Any] | None, max_words: int = 50) -> str:
    """The JSON answer to one prompt."""
    texts = candidates_in(prompt)
    words = _WORDS.search(prompt)
    limit = int(words.group(1)) if words else max_words
    descriptions = [parse(t) for t in texts]
    index_schema = (schema or {}).get("properties", {}).get("index")
    selecting = index_schema is not None or (
        schema is None and any(w in prompt.lower() for w in ("choose", "select"))
    )
    if not selecting:
        merged = merge(descriptions)
        return json.dumps(
            {"summary": describe(merged, limit) if merged.objects else " ".join(texts[:1]) or "a scene"}
        )
    hi = int((index_schema or {}).get("maxItems", 10))
    kept = select(descriptions, hi)
    merged = merge([descriptions[i] for i in kept])
    summary = describe(merged, limit) if merged.objects else "a scene"
    return json.dumps({"index": [i + 1 for i in kept], "summary": summary})


class SandboxSelector(ChatBackend):
    """``--summarize.backend sandbox``: answers every request at once, deterministically."""

    name = "sandbox"

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> SandboxSelector:
        return cls(cls.label(spec), spec.params)

    @classmethod
    def label(cls, spec: BackendSpec) -> str:
        return MODEL_NAME

    def __init__(self, model_id: str = MODEL_NAME, params: GenerationParams = GenerationParams()) -> None:
        super().__init__(model_id, params)

    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        for key, request in items:
            prompt = "\n".join(m.get("content", "") for m in request.messages if m.get("role") == "user")
            text = answer(prompt, request.schema)
            yield (
                key,
                ChatAnswer(text=text, prompt_tokens=len(prompt.split()), completion_tokens=len(text.split())),
            )
