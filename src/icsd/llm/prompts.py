"""Prompt templates of the summarize stage and the requests they make.

A template is a Jinja2 text (rendered in a sandbox, undefined names are errors) that turns one
candidate set into the user message. It sees ``candidates`` (the caption texts, in order, numbered
from 1 by the template), ``k`` (how many), ``min_select``, ``max_select``, ``max_words`` and ``n``.
The bundled templates live in ``icsd/prompts/``; ``--prompt FILE`` replaces them.

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

Mode = Literal["select", "first-n"]
BUNDLED = {"select": "select.txt", "first-n": "first_n.txt"}


@dataclass(frozen=True)
class PromptSettings:
    """Everything besides the captions that shapes a prompt and how its answer is judged."""

    mode: Mode = "select"
    n: int = 5
    min_select: int = 5
    max_select: int = 10
    max_words: int = 50

    def bounds(self, k: int) -> tuple[int, int]:
        """How many indices a valid answer holds for a set of ``k`` captions."""
        return min(self.min_select, k), min(self.max_select, k)


@dataclass(frozen=True)
class PromptTemplate:
    text: str
    source: str
    settings: PromptSettings
    compiled: jinja2.Template

    @functools.cached_property
    def hash(self) -> str:
        return prompt_hash(self.text, self.settings)

    def render(self, candidates: list[str]) -> str:
        k = len(candidates)
        lo, hi = self.settings.bounds(k)
        try:
            return self.compiled.render(
                candidates=candidates,
                k=k,
                min_select=lo,
                max_select=hi,
                max_words=self.settings.max_words,
                n=self.settings.n,
            ).strip()
        except jinja2.TemplateError as exc:
            raise UserError(f"prompt template {self.source} failed to render: {exc}") from None


def prompt_hash(text: str, settings: PromptSettings) -> str:
    payload = json.dumps(
        {"template": text, "settings": settings.__dict__}, sort_keys=True, separators=(",", ":")
    )
    return hash_text(payload)


def bundled_template_text(mode: Mode) -> str:
    return resources.files("icsd").joinpath("prompts", BUNDLED[mode]).read_text(encoding="utf-8")


def load_template(settings: PromptSettings, path: str | Path | None = None) -> PromptTemplate:
    """The bundled template for ``settings.mode``, or the user's file at ``path``."""
    if path is None:
        text, source = bundled_template_text(settings.mode), f"icsd/prompts/{BUNDLED[settings.mode]}"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"prompt file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"prompt file is not UTF-8 text: {p}") from None
        source = str(p)
    return compile_template(text, source, settings)


def compile_template(text: str, source: str, settings: PromptSettings) -> PromptTemplate:
    """A template from its text (``source`` names it in errors)."""
    if "candidates" not in text:
        raise UserError(f"prompt template {source} never uses {{{{ candidates }}}}: the captions would be missing")
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        compiled = env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"prompt template {source} line {exc.lineno}: {exc.message}") from None
    return PromptTemplate(text=text, source=source, settings=settings, compiled=compiled)


def answer_schema(settings: PromptSettings, k: int) -> dict[str, Any]:
    """The JSON schema a valid answer follows (used for structured decoding where offered)."""
    if settings.mode == "first-n":
        return {
            "type": "object",
            "properties": {"summary": {"type": "string"}},
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
            "summary": {"type": "string"},
        },
        "required": ["index", "summary"],
        "additionalProperties": False,
    }


def shown_candidates(settings: PromptSettings, member_ids: list[str]) -> list[str]:
    """The member ids put in front of the model: all of them, or the first ``n`` in first-n mode."""
    return member_ids[: settings.n] if settings.mode == "first-n" else list(member_ids)
