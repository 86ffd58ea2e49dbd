"""The ``--backend`` names of the summarize stage.

Entries are registered lazily as ``"module:attribute"``: listing the names or validating a config
imports neither torch nor vLLM nor llama.cpp nor the openai client. A new backend is a :class:`~icsd.llm.base.ChatBackend`
subclass in its own module, one line here (or an entry point of group ``icsd.llm_backends`` in
another package: docs/plugins.md), and a test class that subclasses
``tests/llm_backend_contract.py:LLMBackendContract``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    from .base import ChatBackend, LLMOptions

LLM_BACKENDS: Registry[Any] = Registry("LLM backend", "icsd.llm_backends")
LLM_BACKENDS.register("openai", "icsd.llm.openai:OpenAIBackend")
LLM_BACKENDS.register("transformers", "icsd.llm.transformers_backend:TransformersBackend")
LLM_BACKENDS.register("vllm", "icsd.llm.vllm_backend:VLLMBackend")
LLM_BACKENDS.register("llama-cpp", "icsd.llm.llamacpp_backend:LlamaCppBackend")
LLM_BACKENDS.register("sandbox", "icsd.sandbox.selector:SandboxSelector")


def make_backend(spec: LLMOptions) -> ChatBackend:
    """The backend registered under ``spec.backend``, built from ``spec`` (its validated options)."""
    backend: ChatBackend = LLM_BACKENDS.get(spec.backend).from_spec(spec)
    return backend


def llm_options(backend: str, **settings: Any) -> LLMOptions:
    """The options of ``backend`` (its ``Options`` model) from ``settings``, validated."""
    options: LLMOptions = LLM_BACKENDS.get(backend).Options(backend=backend, **settings)
    return options
