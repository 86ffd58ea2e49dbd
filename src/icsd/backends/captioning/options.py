"""A captioner family's settings (its ``Options``): what to build and how it decodes.

Light on purpose (pydantic only): the training config's section is built from these fields
(:mod:`icsd.options`) without importing torch. ``train.<field>`` and ``icsd train --<field>`` are
these fields; the train stage hands the validated options (:meth:`TrainConfig.options`) to the
family unchanged. A family with more settings declares a subclass as its ``Options`` and registers
it beside the family (``CAPTIONERS.register(name, "module:Family", options="module:Options")``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...options import BackendOptions

DEFAULT_PROMPT = "a picture of "


class CaptionerOptions(BackendOptions):
    """What to build (a preset and the components it starts from) and how it decodes."""

    preset: str = Field(default="icsd", description="Captioner family (a registered name).")
    # None = the preset's default (icsd: CLIP ViT-B/32 at 384 + bert-base-uncased, lr 1e-5;
    # prefix: CLIP ViT-B/32 at 224 + gpt2, lr 2e-5; tiny: random shapes at 64 px, lr 1e-3)
    vision_model: str | None = Field(default=None, description="CLIP id or path (default per preset).")
    text_model: str | None = Field(
        default=None, description="BERT (icsd) or causal LM (prefix) id or path (default per preset)."
    )
    image_size: int | None = Field(
        default=None,
        ge=8,
        description="Input size (default per preset; icsd: 384, position embeddings interpolated).",
    )
    prompt: str = Field(default=DEFAULT_PROMPT, description="Text the decoder starts from.")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="Decoder dropout (default per preset).")
    beams: int = Field(default=3, ge=1, description="Beam width of validation decoding.")
    min_new_tokens: int = Field(default=5, ge=0, description="Shortest validation caption in tokens.")
    max_new_tokens: int = Field(default=30, ge=1, description="Longest validation caption in tokens.")
    caption_style: Literal["plain", "official"] = Field(
        default="plain",
        description="Training caption text: plain (whitespace collapsed) | official (lower-cased, "
        '.!"()*#:;~ replaced by spaces, at most caption_max_words words).',
    )
    caption_max_words: int | None = Field(
        default=None, ge=1, description="With caption_style official: words kept per caption (official: 30)."
    )
    test_resize: Literal["crop", "squash"] = Field(
        default="crop",
        description="Test-time image: crop (shortest side to image_size, centre crop) | squash "
        "(resized to image_size x image_size, bicubic, as the official code). Saved in the checkpoint.",
    )
    decoder_style: Literal["blip", "bert"] | None = Field(
        default=None,
        description="blip: the official decoder ([DEC] start token, LM-head transform freshly initialised) | "
        "bert: the text model's own MLM head from [CLS] (default per preset; icsd: blip, others: bert).",
    )
    length_norm: Literal["new", "total"] | None = Field(
        default=None,
        description="Beam scores divided by the new tokens, or (total) by the whole sequence with the prompt, "
        "as transformers 4.15 in the official code (default per preset; icsd: total, others: new). Saved in "
        "the checkpoint.",
    )
    decode_dtype: Literal["fp32", "bf16"] | None = Field(
        default=None,
        description="Decoding precision on GPU: fp32 (the official) | bf16 autocast (default per preset; "
        "icsd: fp32, others: bf16). Saved in the checkpoint.",
    )

    @property
    def family(self) -> Any:
        """The registered family of ``preset`` (a one-line error listing the known ones if none)."""
        from ..registry import CAPTIONERS

        return CAPTIONERS.get(self.preset)

    def resolved(self) -> Any:
        """These options with the family's defaults filled in."""
        return self.family.resolve(self)


class PrefixOptions(CaptionerOptions):
    """The prefix family's options: those of every family, and the vision layer it reads."""

    vision_feature_layer: int = Field(
        default=-2, description="Hidden layer of the vision tower whose patch features prefix the text (-2: the penultimate)."
    )
