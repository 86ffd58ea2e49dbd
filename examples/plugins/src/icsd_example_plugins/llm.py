"""``--backend overlap``: picks the candidates that share most words with the head caption.

It reads the numbered candidates out of the prompt (``1. text`` lines, or the official prompt's
``<1> text.``), keeps as many as the answer schema allows (the head first, then by word overlap
with it) and answers the head caption as the summary, as JSON, like an LLM following the prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from icsd.llm import ChatAnswer, ChatBackend, ChatRequest, LLMOptions

_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+(.*\S)\s*$")
_ANGLED = re.compile(r"<(\d+)>\s*(.*?)(?=\s*<\d+>|\s*$)", re.S)


def candidates(prompt: str) -> list[str]:
    angled = _ANGLED.findall(prompt)
    if angled and angled[0][0] == "1":
        return [text.strip().rstrip(".") for _, text in angled]
    found: list[str] = []
    for line in prompt.splitlines():
        m = _NUMBERED.match(line)
        if m:
            found = [] if m.group(1) == "1" else found
            found.append(m.group(2))
    return found


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def answer(prompt: str, schema: dict[str, Any] | None) -> str:
    texts = candidates(prompt)
    index = (schema or {}).get("properties", {}).get("index")
    summary = texts[0] if texts else "a scene"
    if index is None:  # first-n mode: only a summary is asked for
        return json.dumps({"summary": summary})
    head = words(summary)
    ranked = sorted(range(1, len(texts)), key=lambda i: (-len(head & words(texts[i])), i))
    keep = [0, *ranked][: int(index.get("maxItems", 10))]
    return json.dumps({"index": [i + 1 for i in keep], "summary": summary})


class OverlapBackend(ChatBackend):
    name = "overlap"

    @classmethod
    def from_spec(cls, spec: LLMOptions) -> OverlapBackend:
        return cls(cls.label(spec), spec.params)

    @classmethod
    def label(cls, spec: LLMOptions) -> str:
        return "word-overlap"

    def stream(self, items: Iterable[tuple[Any, ChatRequest]]) -> Iterator[tuple[Any, ChatAnswer]]:
        for key, request in items:
            prompt = "\n".join(m["content"] for m in request.messages if m.get("role") == "user")
            text = answer(prompt, request.schema)
            yield key, ChatAnswer(text=text, prompt_tokens=len(prompt.split()), completion_tokens=len(text.split()))
