"""``icsd``: the paper's captioner, a CLIP vision encoder + a BERT decoder with cross-attention.

A CLIP vision encoder (any HF CLIP id or path; ViT-B/32 at 384 px with its position embeddings
interpolated) feeding a BERT decoder with cross-attention initialised from a BERT id or path, as one
:class:`~transformers.VisionEncoderDecoderModel`. The text prompt "a picture of " is masked out of
the loss. Decoding is transformers' ``generate()`` (beam search), never a hand-written loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...errors import UserError
from .base import CaptionerFamily, CaptionerSpec, CaptionModel, dropout_overrides
from .cross_attention import cross_attention_modules, kv_per_image
from .hf import quiet_transformers
from .text import DEC_TOKEN, ENC_TOKEN, TextBatch, decoder_prompt_ids, encode_decoder_texts, special_ids
from .vision import load_clip_vision


def compose_encoder_decoder(encoder: Any, decoder: Any) -> Any:
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    # CLIP's pooled-output norm feeds nothing the decoder sees; frozen so DDP sees no unused grads.
    pooled_norm = getattr(model.encoder, "post_layernorm", None)
    for p in pooled_norm.parameters() if pooled_norm is not None else ():
        p.requires_grad_(False)
    return model


def blip_decoder(decoder: Any, tokenizer: Any) -> None:
    """In place: the official BLIP-based decoder of a BERT LM-head model (training/src/blip.py of
    the official code): the tokenizer gains ``[DEC]`` as its BOS token, the decoder start, and
    ``[ENC]``; the embeddings grow by those two rows, drawn N(0, initializer_range) as transformers
    4.15 drew them; the LM-head transform (dense + LayerNorm) and the output bias start fresh, as
    the official ``BertLMHeadModel(config)`` whose ``.bert`` alone is replaced by the pretrained
    weights; the output weights stay tied to the (pretrained) word embeddings."""
    from torch import nn

    head = getattr(getattr(decoder, "cls", None), "predictions", None)
    transform = getattr(head, "transform", None)
    if head is None or transform is None:
        raise UserError("decoder_style blip needs a BERT decoder (an LM head with a prediction transform)")
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
    decoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    std = float(decoder.config.initializer_range)
    with torch.no_grad():
        embeddings = decoder.get_input_embeddings().weight
        embeddings[-2:].normal_(0.0, std)
        for module in transform.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        for bias in {id(b): b for b in (getattr(head, "bias", None), head.decoder.bias) if b is not None}.values():
            bias.zero_()
    decoder.config.bos_token_id = tokenizer.bos_token_id


class IcsdCaptioner(CaptionerFamily):
    """CLIP vision encoder + BERT decoder with cross-attention (the paper's model)."""

    name = "icsd"
    kind = "encoder-decoder"
    model_type = "vision-encoder-decoder"
    defaults = {
        "vision_model": "openai/clip-vit-base-patch32",
        "text_model": "bert-base-uncased",
        "image_size": 384,
        # the official decoder and decoding (docs/fidelity.md)
        "decoder_style": "blip",
        "length_norm": "total",
        "decode_dtype": "fp32",
    }
    lr = 1e-5

    @classmethod
    def build(cls, spec: CaptionerSpec) -> CaptionModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (spec.vision_model and spec.text_model):
            raise UserError(f"the {cls.name} captioner needs a vision model and a text model")
        vision, processor = load_clip_vision(spec.vision_model, spec.image_size)
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(spec.text_model)
                decoder = AutoModelForCausalLM.from_pretrained(
                    spec.text_model, is_decoder=True, add_cross_attention=True, **dropout_overrides(spec.dropout)
                )
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load text decoder {spec.text_model!r}: {str(exc).splitlines()[0]}") from None
        return cls.compose(vision, decoder, tokenizer, processor, spec)

    @classmethod
    def compose(cls, vision: Any, decoder: Any, tokenizer: Any, processor: Any, spec: CaptionerSpec) -> CaptionModel:
        if spec.decoder_style == "blip":
            blip_decoder(decoder, tokenizer)
        model = compose_encoder_decoder(vision, decoder)
        model.config.decoder_start_token_id, _, model.config.pad_token_id = special_ids(tokenizer)
        return CaptionModel(model, tokenizer, processor, cls, spec, vision.config.image_size)

    @classmethod
    def model_class(cls) -> Any:
        from transformers import VisionEncoderDecoderModel

        return VisionEncoderDecoderModel

    @classmethod
    def start_tokens(cls, tokenizer: Any) -> dict[str, Any]:
        start, _, _ = special_ids(tokenizer)
        return {"decoder_start_token_id": start, "bos_token_id": start}

    @classmethod
    def text_batch(cls, cm: CaptionModel, captions: Sequence[str], max_tokens: int, fixed: bool = False) -> TextBatch:
        return encode_decoder_texts(cm.tokenizer, cm.prompt, captions, max_tokens, fixed)

    @classmethod
    def logits(
        cls, model: Any, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        out = model(pixel_values=images, decoder_input_ids=input_ids, decoder_attention_mask=attention_mask)
        return out.logits  # type: ignore[no-any-return]

    @classmethod
    def grouped_logits(
        cls,
        model: Any,
        images: torch.Tensor,
        image_index: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The vision encoder and the cross-attention key/value projections once per image, the
        rest of the decoder once per caption (what ``model(...)`` computes on repeated images)."""
        cores = cross_attention_modules(model.decoder)
        if not cores:
            return super().grouped_logits(model, images, image_index, input_ids, attention_mask)
        states = model.encoder(pixel_values=images).last_hidden_state
        if (
            model.encoder.config.hidden_size != model.decoder.config.hidden_size
            and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None
        ):
            states = model.enc_to_dec_proj(states)
        with kv_per_image(cores, image_index):
            out = model.decoder(
                input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=states, use_cache=False
            )
        return out.logits  # type: ignore[no-any-return]

    @classmethod
    def generate(cls, model: Any, tokenizer: Any, pixels: torch.Tensor, prompt: str, **settings: Any) -> torch.Tensor:
        prompt_ids = decoder_prompt_ids(tokenizer, prompt).to(pixels.device).expand(len(pixels), -1)
        generated = model.generate(pixel_values=pixels, decoder_input_ids=prompt_ids, **settings)
        return generated[:, prompt_ids.shape[1] :]  # type: ignore[no-any-return]
