"""Strict reading of an LLM's answer to a selection prompt.

No ``eval``: the first JSON object found in the text is decoded with :mod:`json` (code fences and
prose around it are tolerated), then validated with pydantic against the rules of the prompt.
The outcome is one of ``ok``, ``parse_error`` (no JSON object in the text) or ``invalid`` (a JSON
object that breaks a rule, named in ``error``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from .prompts import PromptSettings

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedAnswer:
    status: str
    indices: list[int] = field(default_factory=list)
    summary: str | None = None
    error: str | None = None


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first ``{...}`` in ``text`` that decodes as a JSON object, or None."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def normalise_summary(text: str) -> str:
    return " ".join(text.split())


class _Summary(BaseModel):
    model_config = ConfigDict(extra="ignore")

    summary: StrictStr

    @model_validator(mode="after")
    def _summary_rules(self, info: ValidationInfo) -> _Summary:
        max_words = (info.context or {}).get("max_words", 50)
        words = normalise_summary(self.summary).split()
        if not words:
            raise ValueError("summary is empty")
        if len(words) > max_words:
            raise ValueError(f"summary has {len(words)} words, at most {max_words} allowed")
        return self


class _Selection(_Summary):
    index: list[StrictInt]

    @model_validator(mode="after")
    def _index_rules(self, info: ValidationInfo) -> _Selection:
        ctx = info.context or {}
        k, lo, hi = ctx["k"], ctx["lo"], ctx["hi"]
        outside = [i for i in self.index if not 1 <= i <= k]
        if outside:
            raise ValueError(f"index {outside} outside 1..{k}")
        dupes = sorted({i for i in self.index if self.index.count(i) > 1})
        if dupes:
            raise ValueError(f"index {dupes} chosen more than once")
        if not lo <= len(self.index) <= hi:
            raise ValueError(f"{len(self.index)} captions chosen, {lo}..{hi} required")
        return self


def describe_validation_error(exc: ValidationError) -> str:
    """The first broken rule in one line, e.g. ``index: Field required``."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def parse_answer(text: str, settings: PromptSettings, k: int) -> ParsedAnswer:
    """Judge one answer to a prompt that showed ``k`` candidates."""
    obj = first_json_object(text)
    if obj is None:
        return ParsedAnswer(status="parse_error", error="no JSON object in the answer")
    lo, hi = settings.bounds(k)
    context = {"k": k, "lo": lo, "hi": hi, "max_words": settings.max_words}
    try:
        if settings.mode == "first-n":
            summary_only = _Summary.model_validate(obj, context=context)
            return ParsedAnswer(status="ok", indices=list(range(1, k + 1)), summary=normalise_summary(summary_only.summary))
        chosen = _Selection.model_validate(obj, context=context)
    except ValidationError as exc:
        return ParsedAnswer(status="invalid", error=describe_validation_error(exc))
    return ParsedAnswer(status="ok", indices=list(chosen.index), summary=normalise_summary(chosen.summary))
