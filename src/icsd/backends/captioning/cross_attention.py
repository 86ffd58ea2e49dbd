"""Image-grouped steps: a BERT decoder's cross-attention computing keys and values once per image."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def cross_attention_modules(decoder: Any) -> list[nn.Module]:
    """The cross-attention cores (query/key/value projections) of a BERT decoder's layers."""
    return [
        m
        for name, m in decoder.named_modules()
        if name.endswith("crossattention.self") and all(hasattr(m, a) for a in ("query", "key", "value"))
    ]


def _grouped_cross_attention(
    module: Any, image_index: torch.Tensor
) -> Any:
    """A forward for one cross-attention core that projects keys and values of the per-image
    encoder states once per image and indexes them out to one row per caption."""

    def forward(
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        assert encoder_hidden_states is not None and cache is None
        heads, size = module.num_attention_heads, module.attention_head_size
        b, t = hidden_states.shape[:2]
        n, s = encoder_hidden_states.shape[:2]
        query = module.query(hidden_states).view(b, t, heads, size).transpose(1, 2)
        key = module.key(encoder_hidden_states).view(n, s, heads, size).transpose(1, 2).index_select(0, image_index)
        value = module.value(encoder_hidden_states).view(n, s, heads, size).transpose(1, 2).index_select(0, image_index)
        if attention_mask is not None and attention_mask.shape[0] == n != b:
            attention_mask = attention_mask.index_select(0, image_index)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=module.dropout.p if module.training else 0.0,
            scale=getattr(module, "scaling", size**-0.5),
        )
        return out.transpose(1, 2).reshape(b, t, heads * size), None

    return forward


@contextlib.contextmanager
def kv_per_image(modules: Sequence[nn.Module], image_index: torch.Tensor) -> Iterator[None]:
    """While active, the decoder's cross-attention takes per-image encoder states: keys and values
    are computed once per image and shared by that image's captions (``image_index``)."""
    for m in modules:
        m.forward = _grouped_cross_attention(m, image_index)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in modules:
            del m.forward
