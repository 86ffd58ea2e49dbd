"""The LLM backend interface: requests in, raw answers out.

``stream(items)`` takes ``(key, ChatRequest)`` pairs and yields ``(key, ChatAnswer)`` pairs as
answers arrive (any order). An answer either holds the model's text or, when the backend gave up,
the last error. Judging the text is not a backend's business, and backends know nothing of the
run directory.

A backend is a :class:`ChatBackend` subclass with ``Options`` (its settings, a subclass of
:class:`LLMOptions`), ``from_spec(options)`` (build it from them; picklable, so worker processes
can build their own) and ``stream``; it is registered under its ``--backend`` name in
:mod:`icsd.llm.registry`.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import Field

from ..config import DEFAULT_LLM_MODEL
from ..errors import UserError
from ..options import BackendOptions

K = TypeVar("K")
Message = dict[str, str]
RESPONSE_FORMATS: tuple[str, ...] = ("json_schema", "json_object", "text")


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to make: the messages and, optionally, the JSON schema of the answer
    and a sampling seed (sent as the request's ``seed``, or the local engine's generator seed; a
    re-asked group gets a new one so that a deterministic server does not answer the same)."""

    messages: tuple[Message, ...]
    schema: dict[str, Any] | None = None
    seed: int | None = None


@dataclass
class ChatAnswer:
    text: str | None = None
    error: str | None = None
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    permanent: bool = False  # the error would come back on every retry (a rejected request)

    @property
    def ok(self) -> bool:
        return self.text is not None


@dataclass(frozen=True)
class GenerationParams:
    """``temperature=None`` sends no temperature: the server's or engine's own default sampling."""

    max_new_tokens: int = 500
    temperature: float | None = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature}


class LLMOptions(BackendOptions):
    """What every LLM backend is built from; a backend that takes more declares a subclass as its
    ``Options`` (its fields become ``summarize.<key>`` settings and ``icsd summarize`` options).
    The summarize stage validates it from its settings and hands it to ``from_spec`` unchanged."""

    backend: str = Field(default="transformers", description="The registered backend name.")
    model: str = Field(
        default=DEFAULT_LLM_MODEL,
        description="Model id, path or .gguf file; for a server the model name it serves (default: "
        "SmolLM2-135M-Instruct, packaged GGUF for the local backends).",
    )
    max_new_tokens: int = Field(default=500, ge=1, description="Longest answer in tokens.")
    temperature: float | None = Field(
        default=0.0,
        ge=0.0,
        description="Sampling temperature (0 = greedy; null = none sent: the server's or engine's default).",
    )
    seed: int = Field(default=0, description="Sampling seed.")

    @property
    def params(self) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature)

    def model_label(self) -> str:
        """How records name the model these options load."""
        from .registry import LLM_BACKENDS

        cls: type[ChatBackend] = LLM_BACKENDS.get(self.backend)
        return cls.label(self)


class LocalModelOptions(LLMOptions):
    """The options of a backend that loads the model itself (a GGUF file may sit in a folder or repo)."""

    gguf_file: str | None = Field(default=None, description="GGUF file name inside the model's folder or repo.")


BackendSpec = LLMOptions  # the name plugins were written against


class ChatBackend(ABC):
    name: str = ""
    Options: ClassVar[type[LLMOptions]] = LLMOptions
    # True for a client of a server: answers stream from one client in the stage's process, never
    # from worker processes (``summarize.executor`` does not apply).
    remote: ClassVar[bool] = False

    def __init__(self, model_id: str, params: GenerationParams) -> None:
        self.model_id = model_id
        self.params = params

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: BackendSpec) -> ChatBackend:
        """Build the backend that ``spec`` describes."""

    @classmethod
    def label(cls, spec: BackendSpec) -> str:
        """How records name the model of ``spec`` (without loading it)."""
        return spec.model

    @abstractmethod
    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        """Answer every request; yield each answer with its key as soon as it is known."""

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this backend."""
        return {"backend": self.name, "model": self.model_id, **self.params.as_dict()}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class FatalBackendError(UserError):
    """The server refuses every request (bad key, unknown model, nothing listening): stop instead of
    failing each group."""


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
