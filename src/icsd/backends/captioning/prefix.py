"""``prefix``: a light ClipCap-style captioner as a :class:`~transformers.LlavaForConditionalGeneration`.

Frozen CLIP image features -> a small MLP (the projector) -> the prefix of a causal LM (GPT-2,
SmolLM2, ...). Trains from precomputed image features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from .base import CaptionerFamily, CaptionerSpec, CaptionModel
from .hf import quiet_transformers
from .options import PrefixOptions
from .text import IMAGE_TOKEN, TextBatch, encode_prefix_texts, prefix_prompt_text
from .vision import load_clip_vision


def prefix_processor(image_processor: Any, tokenizer: Any, config: Any) -> Any:
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def prefix_image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's hidden states that Llava projects (class token dropped for 'default')."""
    layer = model.config.vision_feature_layer
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[layer]
    if model.config.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return feats


class PrefixCaptioner(CaptionerFamily):
    """Frozen CLIP features -> MLP projector -> prefix of a causal LM, as a Llava model."""

    name = "prefix"
    Options = PrefixOptions
    kind = "prefix"
    model_type = "llava"
    defaults = {"vision_model": "openai/clip-vit-base-patch32", "text_model": "gpt2", "image_size": None}
    lr = 2e-5
    augment = False
    trains_on_features = True

    @classmethod
    def build(cls, spec: CaptionerSpec) -> CaptionModel:
        from transformers import (
            AutoModelForCausalLM,
            AutoTokenizer,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

        if not (spec.vision_model and spec.text_model):
            raise UserError(f"the {cls.name} captioner needs a vision model and a text model")
        vision, processor = load_clip_vision(spec.vision_model, spec.image_size)
        from ...llm.local import resolve_local_model

        folder, gguf = resolve_local_model(spec.text_model, None)
        extra = {"gguf_file": gguf} if gguf else {}
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
                lm = AutoModelForCausalLM.from_pretrained(folder, **extra)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load language model {spec.text_model!r}: {str(exc).splitlines()[0]}") from None
        if tokenizer.eos_token_id is None:
            raise UserError(f"the tokenizer of {spec.text_model!r} has no end-of-text token")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the image token is always replaced
        text_config = lm.config
        text_config.tie_word_embeddings = False
        grid = vision.config.image_size // vision.config.patch_size
        num_tokens = grid * grid
        config = LlavaConfig(
            vision_config=vision.config,
            text_config=text_config,
            image_token_index=int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)),  # type: ignore[arg-type]
            image_seq_length=num_tokens,
            vision_feature_layer=PrefixOptions.model_validate(spec.model_dump()).vision_feature_layer,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        with quiet_transformers():
            model = LlavaForConditionalGeneration(config)
        model.model.vision_tower.load_state_dict(vision.state_dict())
        model.model.language_model.load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
        model.model.vision_tower.requires_grad_(False)
        return CaptionModel(model, tokenizer, processor, cls, spec, vision.config.image_size, num_image_tokens=num_tokens)

    @classmethod
    def model_class(cls) -> Any:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def text_batch(cls, cm: CaptionModel, captions: Sequence[str], max_tokens: int, fixed: bool = False) -> TextBatch:
        image_token_id = cm.model.config.image_token_id
        return encode_prefix_texts(cm.tokenizer, cm.prompt, captions, max_tokens, image_token_id, cm.num_image_tokens, fixed)

    @classmethod
    def logits(
        cls, model: Any, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Pixel values ``[B, 3, H, W]`` or precomputed features ``[B, N, D]`` (what the trainer caches)."""
        if images.dim() == 4:
            with torch.no_grad():
                images = prefix_image_features(model, images)
        embeds = model.get_input_embeddings()(input_ids)
        projected = model.model.multi_modal_projector(images.to(embeds.dtype))
        mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, projected.to(embeds.dtype))
        return model(inputs_embeds=embeds, attention_mask=attention_mask).logits  # type: ignore[no-any-return]

    @classmethod
    def generate(cls, model: Any, tokenizer: Any, pixels: torch.Tensor, prompt: str, **settings: Any) -> torch.Tensor:
        num = model.config.image_seq_length
        text = tokenizer([prefix_prompt_text(prompt, num)] * len(pixels), return_tensors="pt")
        generated = model.generate(
            input_ids=text["input_ids"].to(pixels.device),
            attention_mask=text["attention_mask"].to(pixels.device),
            pixel_values=pixels.to(model.dtype),
            **settings,
        )
        return generated[:, text["input_ids"].shape[1] :]  # type: ignore[no-any-return]

    @classmethod
    def image_features(cls, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        return prefix_image_features(model, pixels)

    @classmethod
    def feature_identity(cls, model: Any) -> dict[str, Any]:
        return {"layer": model.config.vision_feature_layer, "strategy": model.config.vision_feature_select_strategy}

    @classmethod
    def save_processors(cls, cm: CaptionModel, out: Path) -> None:
        prefix_processor(cm.image_processor, cm.tokenizer, cm.model.config).save_pretrained(out)
