"""Prompt templates of the summarize stage and the requests they make.

A template is a Jinja2 text (rendered in a sandbox, undefined names are errors) that turns one
candidate set into the user message. It sees ``candidates`` (the caption texts, in order, numbered
from 1 by the template), ``k`` (how many), ``min_select``, ``max_select``, ``max_words`` and ``n``.
The bundled templates live in ``icsd/prompts/`` and are named: ``icsd`` (select.txt, the default
of select mode), ``first-n`` (first_n.txt, the default of first-n mode) and ``official`` (the
official code's ``task_prompt`` verbatim, with the captions appended exactly as its loop builds
them). ``--prompt NAME`` picks one; ``--prompt FILE`` replaces them.

The prompt hash covers the template text and every setting rendered into it, so a record says
exactly which instructions produced it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from ..errors import UserError
from ..store import hash_text

Mode = Literal["select", "first-n", "remap"]
AnswerMode = Literal["strict", "official"]
# --prompt NAME: bundled templates by name (a file path is used when the value names none of them).
PROMPT_FILES = {"icsd": "select.txt", "first-n": "first_n.txt"}
DEFAULT_PROMPT: dict[str, str] = {"select": "icsd", "first-n": "first-n", "remap": "icsd"}

# The official code's prompt, byte for byte (FeipengMa6/ICSD, generation/sele_and_sum.py:61,
# ``task_prompt``), including its grammar and the trailing space.
OFFICIAL_TASK_PROMPT = (
    "Select and summary sentences in the given sentences set. You should find 5 to 10 sentences that form "
    "a description from the same or different views of the same image. The meanings of the selected "
    "sentences in a group should not conflict with each other. Summarize the sentences as one not exceed "
    "50 words to describe the scene in objective style. The summary sentence must be objective and concise, "
    "without ambiguity and uncertainty. Return the selected index and the summary sentence in json format "
    "like {'index': list,'summary': str}. Return directly the json format results without explanation. "
    "The given sentences set are: "
)
# Its caption list (sele_and_sum.py:74-79 and 99-104): a period appended unless the caption ends
# with one, then "<i> caption. " for each, numbered from 1; nothing stripped.
OFFICIAL_CAPTIONS = (
    "{% for c in candidates %}<{{ loop.index }}> {{ c }}{% if not c.endswith('.') %}.{% endif %} {% endfor %}"
)
OFFICIAL_TEMPLATE = "{% raw %}" + OFFICIAL_TASK_PROMPT + "{% endraw %}" + OFFICIAL_CAPTIONS
PROMPT_NAMES: tuple[str, ...] = ("official", *PROMPT_FILES)


@dataclass(frozen=True)
class PromptSettings:
    """Everything besides the captions that shapes a prompt and how its answer is judged."""

    mode: Mode = "select"
    n: int = 5
    min_select: int = 5
    max_select: int = 10
    max_words: int = 50
    answers: AnswerMode = "strict"

    def bounds(self, k: int) -> tuple[int, int]:
        """How many indices a valid answer holds for a set of ``k`` captions."""
        return min(self.min_select, k), min(self.max_select, k)


@dataclass(frozen=True)
class PromptTemplate:
    text: str
    source: str
    settings: PromptSettings
    compiled: jinja2.Template
    verbatim: bool = False  # rendered as is (the official prompt); else stripped

    @functools.cached_property
    def hash(self) -> str:
        return prompt_hash(self.text, self.settings)

    def render(self, candidates: list[str]) -> str:
        k = len(candidates)
        lo, hi = self.settings.bounds(k)
        try:
            text = self.compiled.render(
                candidates=candidates,
                k=k,
                min_select=lo,
                max_select=hi,
                max_words=self.settings.max_words,
                n=self.settings.n,
            )
            return text if self.verbatim else text.strip()
        except jinja2.TemplateError as exc:
            raise UserError(f"prompt template {self.source} failed to render: {exc}") from None


def prompt_hash(text: str, settings: PromptSettings) -> str:
    shown = dict(settings.__dict__)
    if shown["answers"] == "strict":  # the default leaves the hashes of earlier runs as they were
        del shown["answers"]
    payload = json.dumps({"template": text, "settings": shown}, sort_keys=True, separators=(",", ":"))
    return hash_text(payload)


def named_template(name: str, settings: PromptSettings) -> PromptTemplate:
    """A bundled template by its name (``official``, ``icsd``, ``first-n``)."""
    if name == "official":
        return compile_template(OFFICIAL_TEMPLATE, "official", settings, verbatim=True)
    text = resources.files("icsd").joinpath("prompts", PROMPT_FILES[name]).read_text(encoding="utf-8")
    return compile_template(text, f"icsd/prompts/{PROMPT_FILES[name]}", settings)


def load_template(settings: PromptSettings, path: str | Path | None = None) -> PromptTemplate:
    """The template ``path`` names: a bundled name (``official``, ``icsd``, ``first-n``), a file,
    or None for the default of ``settings.mode``."""
    if path is None:
        return named_template(DEFAULT_PROMPT[settings.mode], settings)
    if str(path) in PROMPT_NAMES:
        return named_template(str(path), settings)
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file is not UTF-8 text: {p}") from None
    source = str(p)
    return compile_template(text, source, settings)


def compile_template(text: str, source: str, settings: PromptSettings, verbatim: bool = False) -> PromptTemplate:
    """A template from its text (``source`` names it in errors)."""
    if "candidates" not in text:
        raise UserError(f"prompt template {source} never uses {{{{ candidates }}}}: the captions would be missing")
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        compiled = env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"prompt template {source} line {exc.lineno}: {exc.message}") from None
    return PromptTemplate(text=text, source=source, settings=settings, compiled=compiled, verbatim=verbatim)


def summary_schema(settings: PromptSettings) -> dict[str, Any]:
    """The summary string: non-empty and, under strict answers, at most 8 characters per allowed word
    (a grammar then has to close the string, instead of a small model running on until its token
    limit cuts the JSON off; the word count itself is checked when the answer is parsed)."""
    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if settings.answers == "strict":
        schema["maxLength"] = 8 * settings.max_words
    return schema


def answer_schema(settings: PromptSettings, k: int) -> dict[str, Any]:
    """The JSON schema a valid answer follows (used for structured decoding where offered)."""
    if settings.mode == "first-n":
        return {
            "type": "object",
            "properties": {"summary": summary_schema(settings)},
            "required": ["summary"],
            "additionalProperties": False,
        }
    lo, hi = settings.bounds(k)
    return {
        "type": "object",
        "properties": {
            "index": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": k},
                "minItems": lo,
                "maxItems": hi,
            },
            "summary": summary_schema(settings),
        },
        "required": ["index", "summary"],
        "additionalProperties": False,
    }


def shown_candidates(settings: PromptSettings, member_ids: list[str]) -> list[str]:
    """The member ids put in front of the model: all of them, or the first ``n`` in first-n mode
    (and remap mode, which pairs them without a model)."""
    return member_ids[: settings.n] if settings.mode in ("first-n", "remap") else list(member_ids)
