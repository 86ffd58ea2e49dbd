"""``train.preset: sandbox``: a captioner that learns the sandbox world in minutes on two CPU cores.

One ``VisionEncoderDecoderModel``, shaped as the paper's (a pretrained image encoder, a BERT decoder
with cross-attention) at a size that trains in minutes: a small convolutional image encoder
(:mod:`.vision`: four conv stages to an 8x8 grid, one transformer layer) pretrained on the
renderer's pictures of random scenes and frozen (:mod:`.pretrain`, the world's stand-in for CLIP;
packaged, so nothing is downloaded), a 2-layer BERT decoder from random weights, and a WordPiece
vocabulary of the world's words only (about 200 tokens instead of 30,522), so each step is cheap.
No flips: captions say left and right.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..backends.captioners import (
    CaptionerSpec,
    CaptionModel,
    TinyCaptioner,
    clip_image_processor,
    dropout_overrides,
)
from ..errors import UserError
from .lexicon import (
    BACKGROUND_NOUNS,
    BACKGROUND_PHRASES,
    COLOURS,
    COUNT_WORDS,
    NOUNS,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SIZE_WORDS,
)

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# words of the caption patterns and the decoder prompt beyond the lexicon's tables
PATTERN_WORDS = (
    "a an the is are of and with picture photo image showing close up view scene colorful there "
    "lying resting sitting standing medium sized"
).split()
PUNCTUATION = (",", ".", ";", "-", "'")
VISION: dict[str, Any] = {
    "channels": [16, 32, 64, 96],
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
}
TEXT: dict[str, Any] = {
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    # BERT's 0.02 leaves the image's path through cross-attention so weak that, from random
    # weights, the decoder learns the language long before it looks at the image
    "initializer_range": 0.1,
}


def world_vocabulary() -> list[str]:
    """Every word the world writes, special tokens first, then sorted (the same list every time)."""
    words: set[str] = set(PATTERN_WORDS) | set(COLOURS) | set(COUNT_WORDS) | set("".join(PUNCTUATION))
    for table in (BACKGROUND_PHRASES, BACKGROUND_NOUNS, POSITION_PHRASES, RELATION_PHRASES, SIZE_WORDS):
        for phrases in table.values():
            for phrase in phrases:
                words.update(phrase.replace("-", " ").split())
    for forms in NOUNS.values():
        for singular, plural in forms:
            words.update(singular.split() + plural.split())
    words = {w for w in words if w.strip()}
    return [*SPECIAL, *sorted(words)]


class SandboxCaptioner(TinyCaptioner):
    """The pretrained, frozen convolutional encoder (:mod:`.vision`, :mod:`.pretrain`) + a 2-layer
    BERT decoder over the world's vocabulary, from random weights."""

    name = "sandbox"
    # vision_model: "world" = the packaged pretrained encoder (:mod:`.pretrain`), a folder written by
    # ``icsd sandbox encoder``, or "random" (trained from random weights with the decoder)
    defaults = {"vision_model": "world", "text_model": None, "image_size": 64, "dropout": 0.1}
    lr = 1e-3
    augment = False

    @classmethod
    def components(cls, spec: CaptionerSpec) -> list[tuple[str, str, str]]:
        """None to build: the encoder is the packaged one of the world (or a local folder)."""
        return []

    @classmethod
    def build(cls, spec: CaptionerSpec) -> CaptionModel:
        from transformers import BertConfig, BertLMHeadModel, BertTokenizer

        from .pretrain import load_encoder
        from .vision import SandboxVisionConfig, SandboxVisionModel

        size = int(spec.image_size or 64)
        if spec.vision_model in (None, "random"):
            config = SandboxVisionConfig(image_size=size, **VISION)
            if size % config.downsampling:
                raise UserError(
                    f"the sandbox captioner needs an image size that is a multiple of {config.downsampling}, not {size}"
                )
            vision = SandboxVisionModel(config)
        else:
            vision = load_encoder(spec.vision_model)
            if vision.config.image_size != size:
                raise UserError(
                    f"the sandbox encoder {spec.vision_model!r} takes {vision.config.image_size} px images, not {size}"
                )
        with tempfile.TemporaryDirectory() as tmp:
            vocab = Path(tmp) / "vocab.txt"
            vocab.write_text("\n".join(world_vocabulary()) + "\n", encoding="utf-8")
            tokenizer = BertTokenizer(vocab=str(vocab), model_max_length=TEXT["max_position_embeddings"])
        text_config = BertConfig(
            vocab_size=len(tokenizer),
            is_decoder=True,
            add_cross_attention=True,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT,
            **dropout_overrides(spec.dropout),
        )
        return cls.compose(vision, BertLMHeadModel(text_config), tokenizer, clip_image_processor(size), spec)

    @classmethod
    def model_class(cls) -> Any:
        from . import vision  # noqa: F401  (registers the encoder with AutoConfig/AutoModel)

        return super().model_class()
