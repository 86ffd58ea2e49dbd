"""Image captioners built from standard transformers components: the public API of the captioner
families, re-exported from :mod:`icsd.backends.captioning` (one module per family).

Families (registered in :mod:`icsd.backends.registry`; the name is ``train.preset``):

- ``icsd`` (:class:`IcsdCaptioner`, :mod:`.captioning.icsd`): the paper's captioner, a CLIP vision
  encoder feeding a BERT decoder with cross-attention as one
  :class:`~transformers.VisionEncoderDecoderModel`;
- ``prefix`` (:class:`PrefixCaptioner`, :mod:`.captioning.prefix`): a light ClipCap-style model as a
  :class:`~transformers.LlavaForConditionalGeneration`;
- ``tiny`` (:class:`TinyCaptioner`, :mod:`.captioning.tiny`): random tiny shapes of ``icsd`` for
  tests and the offline quickstart.

Shared parts: :mod:`.captioning.base` (spec, family contract, built model, loss),
:mod:`.captioning.text` (caption text and token batches), :mod:`.captioning.vision` (CLIP vision
tower and image processors), :mod:`.captioning.cross_attention` (image-grouped steps),
:mod:`.captioning.inference` (captioning with a checkpoint).
"""

from __future__ import annotations

from .captioning.base import (
    CAPTIONER_FILE,
    CaptionerFamily,
    CaptionerSpec,
    CaptionLoss,
    CaptionModel,
    build_caption_model,
    dropout_overrides,
)
from .captioning.cross_attention import cross_attention_modules, kv_per_image
from .captioning.hf import check_all_weights_loaded, quiet_transformers
from .captioning.icsd import IcsdCaptioner, compose_encoder_decoder
from .captioning.inference import (
    Captioner,
    check_checkpoint,
    checkpoint_family,
    load_captioner,
    read_captioner_info,
)
from .captioning.prefix import PrefixCaptioner, prefix_image_features, prefix_processor
from .captioning.text import (
    DEFAULT_PROMPT,
    IMAGE_TOKEN,
    OFFICIAL_PUNCTUATION,
    TextBatch,
    clean_caption,
    decoder_prompt_ids,
    encode_decoder_texts,
    encode_prefix_texts,
    official_caption,
    prefix_prompt_text,
    special_ids,
)
from .captioning.tiny import TINY_PATCH, TINY_TEXT, TINY_VISION, TinyCaptioner, minilm_vocab
from .captioning.vision import (
    clip_image_processor,
    interpolate_position_embeddings,
    load_clip_vision,
    squash_processor,
    vision_at_size,
)

__all__ = [
    "CAPTIONER_FILE",
    "DEFAULT_PROMPT",
    "IMAGE_TOKEN",
    "OFFICIAL_PUNCTUATION",
    "TINY_PATCH",
    "TINY_TEXT",
    "TINY_VISION",
    "CaptionLoss",
    "CaptionModel",
    "Captioner",
    "CaptionerFamily",
    "CaptionerSpec",
    "IcsdCaptioner",
    "PrefixCaptioner",
    "TextBatch",
    "TinyCaptioner",
    "build_caption_model",
    "check_all_weights_loaded",
    "checkpoint_family",
    "clean_caption",
    "clip_image_processor",
    "compose_encoder_decoder",
    "cross_attention_modules",
    "decoder_prompt_ids",
    "dropout_overrides",
    "encode_decoder_texts",
    "encode_prefix_texts",
    "interpolate_position_embeddings",
    "kv_per_image",
    "load_captioner",
    "check_checkpoint",
    "load_clip_vision",
    "minilm_vocab",
    "official_caption",
    "prefix_image_features",
    "prefix_processor",
    "prefix_prompt_text",
    "quiet_transformers",
    "read_captioner_info",
    "special_ids",
    "squash_processor",
    "vision_at_size",
]
