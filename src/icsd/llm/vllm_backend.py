"""Offline vLLM (``vllm.LLM``) with JSON-schema structured decoding and prefix caching."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from ..errors import UserError
from .base import ChatAnswer, ChatBackend, ChatRequest, GenerationParams, K, LocalModelOptions, batches
from .local import local_model_label, resolve_local_model


def vllm_sampling_params(schema: dict[str, Any] | None, params: GenerationParams, seed: int | None = None) -> Any:
    """vLLM ``SamplingParams`` with JSON-schema structured decoding (new and older vLLM APIs).
    ``params.temperature=None`` keeps vLLM's default sampling (temperature 1.0)."""
    import vllm

    kwargs: dict[str, Any] = {"max_tokens": params.max_new_tokens}
    if params.temperature is not None:
        kwargs["temperature"] = params.temperature
    if seed is not None:
        kwargs["seed"] = seed
    if schema is not None:
        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:  # vLLM < 0.11
            from vllm.sampling_params import GuidedDecodingParams

            kwargs["guided_decoding"] = GuidedDecodingParams(json=schema)
        else:
            kwargs["structured_outputs"] = StructuredOutputsParams(json=schema)
    return vllm.SamplingParams(**kwargs)


class VLLMOptions(LocalModelOptions):
    """``--backend vllm``: the vLLM engine in this process."""

    part_size: int = Field(default=1000, ge=1, description="Prompts per engine call (one output part).")


class VLLMBackend(ChatBackend):
    """Offline vLLM: the whole chunk goes to ``LLM.chat`` and vLLM schedules it; the shared
    instruction at the head of every prompt is computed once thanks to prefix caching."""

    name = "vllm"
    Options = VLLMOptions

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        params: GenerationParams = GenerationParams(),
        chunk_size: int = 1024,
        seed: int = 0,
        engine: Any = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(local_model_label(model, gguf_file), params)
        self.chunk_size = chunk_size
        if engine is None:
            engine = self._load_engine(model, gguf_file, seed, engine_kwargs or {})
        self.engine = engine

    @classmethod
    def from_spec(cls, spec: VLLMOptions) -> VLLMBackend:  # type: ignore[override]
        return cls(spec.model, gguf_file=spec.gguf_file, params=spec.params, chunk_size=spec.part_size, seed=spec.seed)

    @classmethod
    def label(cls, spec: VLLMOptions) -> str:  # type: ignore[override]
        return local_model_label(spec.model, spec.gguf_file)

    @staticmethod
    def _load_engine(model: str, gguf_file: str | None, seed: int, extra: dict[str, Any]) -> Any:
        try:
            import vllm
        except ImportError:
            raise UserError("the vllm backend needs vLLM: pip install 'icsd[vllm]' (GPU machines only)") from None

        source, gguf = resolve_local_model(model, gguf_file)
        path = str(Path(source) / gguf) if gguf else source
        return vllm.LLM(model=path, enable_prefix_caching=True, seed=seed, **extra)

    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        for batch in batches(items, self.chunk_size):
            answers = self.generate([req for _, req in batch])
            yield from zip((key for key, _ in batch), answers, strict=True)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
        conversations = [list(r.messages) for r in requests]
        sampling = [vllm_sampling_params(r.schema, self.params, r.seed) for r in requests]
        outputs = self.engine.chat(conversations, sampling_params=sampling, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        return [self._to_answer(o) for o in outputs]

    @staticmethod
    def _to_answer(output: Any) -> ChatAnswer:
        completions = getattr(output, "outputs", None) or []
        if not completions:
            return ChatAnswer(error="vLLM returned no completion")
        first = completions[0]
        return ChatAnswer(
            text=first.text,
            prompt_tokens=len(getattr(output, "prompt_token_ids", None) or []),
            completion_tokens=len(getattr(first, "token_ids", None) or []),
        )
