"""LLM backends behind a registry, and what the summarize stage needs around them.

- :mod:`~icsd.llm.base`: the backend interface (requests in, raw answers out) and :class:`LLMOptions`, what every backend's options hold;
- :mod:`~icsd.llm.registry`: ``LLM_BACKENDS``, the ``--backend`` names, and :func:`make_backend`;
- :mod:`~icsd.llm.openai`: any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, TGI, ...);
- :mod:`~icsd.llm.transformers_backend`, :mod:`~icsd.llm.vllm_backend`,
  :mod:`~icsd.llm.llamacpp_backend`: local engines;
- :mod:`~icsd.llm.prompts`, :mod:`~icsd.llm.answers`, :mod:`~icsd.llm.cache`: prompt templates and
  answer schema, strict answer parsing, the SQLite request cache.

Importing this package is light: no torch, vLLM, llama.cpp or HTTP client is loaded until a backend is built.
"""

from .base import (
    BackendSpec,
    ChatAnswer,
    ChatBackend,
    ChatRequest,
    FatalBackendError,
    GenerationParams,
    LLMOptions,
    LocalModelOptions,
)
from .registry import LLM_BACKENDS, llm_options, make_backend

__all__ = [
    "LLM_BACKENDS",
    "BackendSpec",
    "ChatAnswer",
    "ChatBackend",
    "ChatRequest",
    "FatalBackendError",
    "GenerationParams",
    "LLMOptions",
    "LocalModelOptions",
    "llm_options",
    "make_backend",
]
