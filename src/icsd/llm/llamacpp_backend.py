"""A GGUF model run in process by llama.cpp (``llama-cpp-python``), with its JSON-schema constrained
decoding: the answer's schema becomes a grammar, so the model can only write JSON of that shape.

The packaged SmolLM2-135M-Instruct GGUF is the default model; any ``.gguf`` path (``--model``, or a
folder as ``--model`` with ``--gguf-file``) works. The GGUF's own chat template builds the prompt
from the same messages the other backends get. llama.cpp keeps the KV cache of the previous prompt
and reuses its longest common prefix, so the shared instruction at the head of every prompt is
computed once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import ChatAnswer, ChatBackend, ChatRequest, GenerationParams, K, LocalModelOptions
from .local import local_model_label, resolve_local_model

INSTALL_HINT = 'the llama-cpp backend needs llama-cpp-python: pip install -e ".[llamacpp]"'


def default_threads() -> int:
    """Every CPU this process may use (llama.cpp's own default is half of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def gguf_path(model: str, gguf_file: str | None) -> str:
    """The GGUF file to load for ``model`` (the packaged one for the default model id)."""
    source, gguf = resolve_local_model(model, gguf_file)
    if gguf is None:
        raise UserError(
            f"the llama-cpp backend loads a GGUF file; {model!r} is not one "
            "(give --model path/to/model.gguf, or a folder with --gguf-file)"
        )
    path = Path(source) / gguf
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    return str(path)


class LlamaCppBackend(ChatBackend):
    """One ``llama_cpp.Llama`` in this process; requests are answered one after the other."""

    name = "llama-cpp"
    Options = LocalModelOptions

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        params: GenerationParams = GenerationParams(),
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int = 0,
        engine: Any = None,
    ) -> None:
        super().__init__(local_model_label(model, gguf_file), params)
        self.path = gguf_path(model, gguf_file)
        self.n_ctx = n_ctx
        if engine is None:
            engine = self._load_engine(self.path, n_ctx, n_threads or default_threads(), seed)
        self.engine = engine

    @classmethod
    def from_spec(cls, spec: LocalModelOptions) -> LlamaCppBackend:  # type: ignore[override]
        return cls(spec.model, gguf_file=spec.gguf_file, params=spec.params, seed=spec.seed)

    @classmethod
    def label(cls, spec: LocalModelOptions) -> str:  # type: ignore[override]
        return local_model_label(spec.model, spec.gguf_file)

    @staticmethod
    def _load_engine(path: str, n_ctx: int, n_threads: int, seed: int) -> Any:
        try:
            import llama_cpp
        except ImportError:
            raise UserError(INSTALL_HINT) from None
        try:
            return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, verbose=False, seed=seed)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"llama.cpp cannot load {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None

    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        for key, request in items:
            yield key, self.generate(request)

    def generate(self, request: ChatRequest) -> ChatAnswer:
        kwargs: dict[str, Any] = {"max_tokens": self.params.max_new_tokens}
        if self.params.temperature is not None:  # None: llama-cpp-python's defaults (temperature 0.2, top-p 0.95, top-k 40, min-p 0.05)
            kwargs["temperature"] = self.params.temperature
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": request.schema}
        try:
            out = self.engine.create_chat_completion(messages=list(request.messages), **kwargs)
        except ValueError as exc:  # the prompt does not fit the context window, and the like
            return ChatAnswer(error=f"llama.cpp: {exc}", permanent=True)
        choices = out.get("choices") or []
        if not choices:
            return ChatAnswer(error="llama.cpp returned no completion")
        text = (choices[0].get("message") or {}).get("content")
        usage = out.get("usage") or {}
        return ChatAnswer(
            text=text if text is not None else "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_ctx": self.n_ctx}

    def close(self) -> None:
        engine, self.engine = self.engine, None
        closer = getattr(engine, "close", None)
        if callable(closer):
            closer()
