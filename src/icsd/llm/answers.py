"""Reading an LLM's answer to a selection prompt, and checking that it makes sense.

No ``eval``. Two answer modes (``PromptSettings.answers``):

- ``strict``: the first JSON object in the text (code fences and prose around it are tolerated),
  validated with pydantic against the rules of the prompt (5-10 distinct indices in range, at most
  ``max_words`` words);
- ``official``: what the official parser (``generation/postprocess.py``, which ``eval()``-ed the
  answer) kept: a JSON object or a Python-literal dict (single quotes), read with :mod:`json` or
  :func:`ast.literal_eval` only; any number of indices in range, any summary length. Where that
  parser had a plain bug it is not copied: an index 0 (which wrapped to the last caption) or out
  of range, or a non-integer, makes the answer invalid; a repeated index counts once.

Then, in every mode, :func:`judge_answer` checks the answer for sense: a summary that is empty,
copies the prompt's own words (its placeholder or example answer, e.g. "the merged sentence" or
"str"), or shares no content word with the captions it selected is ``invalid``.

The outcome is one of ``ok``, ``parse_error`` (no object in the text) or ``invalid`` (an object
that breaks a rule, named in ``error``: the reason first, details after a colon).
"""

from __future__ import annotations

import ast
import json
import re
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
    """Read one answer to a prompt that showed ``k`` candidates, by the rules of ``settings.answers``
    (no sense check: see :func:`judge_answer`)."""
    if settings.answers == "official":
        return parse_official(text, settings, k)
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


# ----------------------------------------------------------------------------- official answers


def _matching_brace(text: str, start: int) -> int:
    """The index of the ``}`` closing the ``{`` at ``start`` (quotes respected), or -1."""
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def first_literal_object(text: str) -> dict[Any, Any] | None:
    """The first ``{...}`` in ``text`` that reads as a JSON object or a Python-literal dict
    (:func:`ast.literal_eval`: literals only, no names, calls or operators), or None."""
    obj = first_json_object(text)
    if obj is not None:
        return obj
    start = text.find("{")
    while start != -1:
        end = _matching_brace(text, start)
        if end != -1:
            try:
                value = ast.literal_eval(text[start : end + 1])
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                value = None
            if isinstance(value, dict):
                return value
        start = text.find("{", start + 1)
    return None


def _official_fields(obj: dict[Any, Any]) -> tuple[Any, Any] | None:
    """(index, summary) as postprocess.py finds them: by name, else the two keys in order."""
    if "index" in obj or "summary" in obj:
        return obj.get("index"), obj.get("summary")
    if len(obj) == 2:  # postprocess.py:36 `index_k, summary_k = list(index_summary.keys())`
        first, second = obj.values()
        return first, second
    return None


def _as_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def parse_official(text: str, settings: PromptSettings, k: int) -> ParsedAnswer:
    """Read an answer the way the official parser kept it, without its bugs (see the module doc)."""
    obj = first_literal_object(text)
    if obj is None:
        return ParsedAnswer(status="parse_error", error="no JSON object or Python dict in the answer")
    fields = _official_fields(obj)
    if fields is None:
        return ParsedAnswer(status="invalid", error="index and summary not found: keys " + ", ".join(map(repr, obj))[:200])
    index, summary = fields
    if not isinstance(summary, str):
        return ParsedAnswer(status="invalid", error=f"summary is not a string: {type(summary).__name__}")
    if not normalise_summary(summary):
        return ParsedAnswer(status="invalid", error="summary is empty")
    if settings.mode == "first-n":
        return ParsedAnswer(status="ok", indices=list(range(1, k + 1)), summary=normalise_summary(summary))
    if not isinstance(index, list | tuple):
        return ParsedAnswer(status="invalid", error=f"index is not a list: {type(index).__name__}")
    numbers = [_as_index(v) for v in index]
    if None in numbers:
        bad = [v for v, n in zip(index, numbers, strict=True) if n is None]
        return ParsedAnswer(status="invalid", error=f"index not an integer: {bad!r}"[:200])
    ints = [n for n in numbers if n is not None]
    outside = [i for i in ints if not 1 <= i <= k]
    if outside:
        return ParsedAnswer(status="invalid", error=f"index outside 1..{k}: {outside}")
    chosen = list(dict.fromkeys(ints))  # a repeated index pairs its caption once
    if not chosen:
        return ParsedAnswer(status="invalid", error="no caption selected")
    return ParsedAnswer(status="ok", indices=chosen, summary=normalise_summary(summary))


# ----------------------------------------------------------------------------- sense checks

_WORD = re.compile(r"[a-z0-9]+")
# Words that carry no content of a scene (articles, prepositions, auxiliaries, counting words).
STOPWORDS = frozenset(
    """a an the and or but of in on at to for from with by as is are was were be been being it its
    this that these those there here some any each other another one two three four five several many
    few very while near next into onto over under above below up down out off about around through
    his her their they them he she we you i my our your has have having do does did not no yes
    who whom which what where when how all both than then so too also can could may might just
    photo picture image scene view shown showing sentence sentences summary caption captions""".split()
)
# Type names and stock placeholders an answer template may show in place of the summary.
PLACEHOLDERS = frozenset(
    {"str", "string", "list", "text", "summary", "sentence", "the summary", "summary sentence",
     "your summary", "your summary here", "the merged sentence", "merged sentence", "placeholder"}
)  # fmt: skip


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _stem(word: str) -> str:
    for suffix in ("ing", "es", "s", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: -len(suffix)]
            return stem[:-1] if len(stem) > 3 and stem[-1] == stem[-2] else stem  # running -> run
    return word


def content_words(text: str) -> set[str]:
    """The stems of the words of ``text`` that name something (stopwords dropped)."""
    return {_stem(w) for w in words(text) if w not in STOPWORDS and not w.isdigit()}


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def copied_from_prompt(summary: str, instructions: str) -> bool:
    """Whether the summary is a placeholder: a stock one, or a run of the prompt's own words
    (its instructions or example answer, the captions left out)."""
    said = words(summary)
    bare = said[1:] if said[:1] in (["the"], ["a"], ["an"], ["your"]) else said
    if " ".join(said) in PLACEHOLDERS or " ".join(bare) in PLACEHOLDERS:
        return True
    return bool(said) and _contains(words(instructions), said)


def sense_error(summary: str, selected: list[str], instructions: str) -> str | None:
    """Why a summary of the ``selected`` captions makes no sense, or None.

    ``instructions``: the prompt's text without the captions (what a copied placeholder comes from).
    """
    if not words(summary):
        return "summary is empty"
    if copied_from_prompt(summary, instructions):
        return f"summary copies the prompt's placeholder: {summary[:80]!r}"
    if selected and not content_words(summary) & set().union(*(content_words(t) for t in selected)):
        return f"summary shares no content word with the selected captions: {summary[:80]!r}"
    return None


def prompt_instructions(prompt: str, candidates: list[str]) -> str:
    """``prompt`` with every candidate caption taken out."""
    for text in sorted(candidates, key=len, reverse=True):
        if text.strip():
            prompt = prompt.replace(text.strip(), " | ")
    return prompt


def judge_answer(text: str, settings: PromptSettings, candidates: list[str], prompt: str) -> ParsedAnswer:
    """Read one answer to ``prompt`` (which showed ``candidates``) and check it for sense."""
    parsed = parse_answer(text, settings, len(candidates))
    if parsed.status != "ok" or parsed.summary is None:
        return parsed
    selected = [candidates[i - 1] for i in parsed.indices]
    why = sense_error(parsed.summary, selected, prompt_instructions(prompt, candidates))
    if why is not None:
        return ParsedAnswer(status="invalid", error=why)
    return parsed


def error_reason(error: str | None) -> str:
    """The rule an error names, without its details (what the report counts per reason)."""
    if not error:
        return ""
    head = error.split(":")[0]
    head = re.sub(r"\[[^\]]*\]", "[...]", head)
    return re.sub(r"\d+", "#", head)[:80].strip()
