"""The LLM backend interface: requests in, raw answers out.

``stream(items)`` takes ``(key, ChatRequest)`` pairs and yields ``(key, ChatAnswer)`` pairs as
answers arrive (any order). An answer either holds the model's text or, when the backend gave up,
the last error. Judging the text is not a backend's business, and backends know nothing of the
run directory.

A backend is a :class:`ChatBackend` subclass with ``from_spec(spec)`` (build it from a picklable
:class:`BackendSpec`) and ``stream``; it is registered under its ``--backend`` name in
:mod:`icsd.llm.registry`.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import UserError

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


@dataclass
class BackendSpec:
    """Everything needed to build a backend (picklable, so worker processes can build their own)."""

    backend: str
    model: str
    gguf_file: str | None = None
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    params: GenerationParams = GenerationParams()
    concurrency: int = 64
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0
    client: str = "openai"
    response_format: str = "auto"
    device: str = "cpu"
    batch_size: int = 8
    chunk_size: int = 1024
    seed: int = 0

    def model_label(self) -> str:
        """How records name the model this spec loads."""
        from .registry import LLM_BACKENDS

        cls: type[ChatBackend] = LLM_BACKENDS.get(self.backend)
        return cls.label(self)


class ChatBackend(ABC):
    name: str = ""

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
