"""Any transformers causal LM (GGUF included) with its chat template: batched generation with left
padding, the answer prefilled with the opening of the JSON object. Temperature 0 decodes greedily,
a positive one samples, None keeps the checkpoint's ``generation_config`` (greedy when it sets
nothing, as for the packaged GGUF); a request's seed seeds torch's generator."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pydantic import Field

from ..errors import UserError
from ..executor import resolve_device
from .base import ChatAnswer, ChatBackend, ChatRequest, GenerationParams, K, LocalModelOptions, batches
from .local import json_answer_prefix, local_model_label, plain_prompt, resolve_local_model


class TransformersOptions(LocalModelOptions):
    """``--backend transformers``: a causal LM loaded with transformers in this process."""

    device: str = Field(default="auto", description="auto|cpu|cuda|cuda:N.")
    batch_size: int = Field(default=8, ge=1, description="Prompts per generate() call.")


class TransformersBackend(ChatBackend):
    """Greedy batched generation with a transformers causal LM (left padding, chat template)."""

    name = "transformers"
    Options = TransformersOptions

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        params: GenerationParams = GenerationParams(),
        device: str = "cpu",
        batch_size: int = 8,
        dtype: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(local_model_label(model, gguf_file), params)
        source, gguf = resolve_local_model(model, gguf_file)
        self.device = device
        self.batch_size = batch_size
        kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            torch_dtype = _torch_dtype(dtype, device)
            lm: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        except OSError as exc:
            raise UserError(f"cannot load causal LM {model!r}: {str(exc).splitlines()[0]}") from None
        self.model = lm.to(device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._torch = torch

    @classmethod
    def from_spec(cls, spec: TransformersOptions) -> TransformersBackend:  # type: ignore[override]
        device = resolve_device(spec.device)
        return cls(spec.model, gguf_file=spec.gguf_file, params=spec.params, device=device, batch_size=spec.batch_size)

    @classmethod
    def label(cls, spec: TransformersOptions) -> str:  # type: ignore[override]
        return local_model_label(spec.model, spec.gguf_file)

    def prompt_text(self, request: ChatRequest) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                list(request.messages), tokenize=False, add_generation_prompt=True
            )
            return str(text) + json_answer_prefix(request.schema)
        return plain_prompt(request.messages) + json_answer_prefix(request.schema)

    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        for batch in batches(items, self.batch_size):
            answers = self.generate([req for _, req in batch])
            yield from zip((key for key, _ in batch), answers, strict=True)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
        """Greedy answers for one batch; on CUDA out-of-memory the batch is split in halves."""
        torch = self._torch
        try:
            return self._generate(requests)
        except torch.cuda.OutOfMemoryError:
            if len(requests) == 1:
                return [ChatAnswer(error="CUDA out of memory for a single request")]
            torch.cuda.empty_cache()
            half = len(requests) // 2
            return self.generate(requests[:half]) + self.generate(requests[half:])

    def _generate(self, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
        torch = self._torch
        texts = [self.prompt_text(r) for r in requests]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling: dict[str, Any] = {}
        temperature = self.params.temperature
        if temperature is not None:
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        seed = next((r.seed for r in requests if r.seed is not None), None)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.params.max_new_tokens,
                num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        pad = self.tokenizer.pad_token_id
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        return [
            ChatAnswer(
                text=(json_answer_prefix(req.schema) + text).strip(),
                prompt_tokens=int(p),
                completion_tokens=int((row != pad).sum().item()),
            )
            for req, text, row, p in zip(requests, decoded, new, prompt_lens, strict=True)
        ]


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
