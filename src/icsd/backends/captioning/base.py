"""What every captioner family shares: the spec, the family contract, a built model and its loss.

A family is a :class:`CaptionerFamily` subclass: ``build`` (the model from a spec), ``loss``,
``text_batch``, ``generate``, ``save`` and ``load``. Every checkpoint is a ``save_pretrained`` folder
(safetensors + tokenizer + image processor + generation config) that loads with plain
transformers; ``captioner.json`` beside it records the family and the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ...errors import UserError
from .hf import check_all_weights_loaded, quiet_transformers
from .options import CaptionerOptions
from .text import TextBatch, official_caption, special_ids
from .vision import squash_processor

if TYPE_CHECKING:
    from .inference import Captioner

CAPTIONER_FILE = "captioner.json"


#: What to build: a preset (captioner family) and the components it starts from, with its decoding
#: settings: the family's validated options (``CaptionerSpec(preset="tiny", max_new_tokens=8)``).
CaptionerSpec = CaptionerOptions


# ----------------------------------------------------------------------------- families


class CaptionerFamily:
    """One way of building, training, running, saving and loading a captioner.

    Stateless: every method is a classmethod, so a family is its class, registered by name in
    :data:`icsd.backends.registry.CAPTIONERS`. A new family subclasses this (or a family close to
    it) and overrides what differs; the shared contract tests (``tests/test_contract_captioners.py``)
    check it once a test subclass names it.
    """

    name: ClassVar[str] = ""
    #: its settings (a pydantic model; a family with settings of its own declares a subclass and
    #: registers it beside the family: :mod:`.options`)
    Options: ClassVar[type[CaptionerOptions]] = CaptionerOptions
    #: written to ``captioner.json`` for people reading the folder (nothing branches on it)
    kind: ClassVar[str] = ""
    #: the ``model_type`` in ``config.json`` of the checkpoints it saves
    model_type: ClassVar[str] = ""
    #: spec values used where the spec leaves them None
    defaults: ClassVar[dict[str, Any]] = {}
    #: what every family uses where neither the spec nor :attr:`defaults` says
    common_defaults: ClassVar[dict[str, Any]] = {"decoder_style": "bert", "length_norm": "new", "decode_dtype": "bf16"}
    #: the peak learning rate when the training config gives none
    lr: ClassVar[float] = 1e-5
    #: whether training augments images when the training config does not say
    augment: ClassVar[bool] = True
    #: whether the trainer may feed it precomputed frozen image features (:meth:`image_features`)
    trains_on_features: ClassVar[bool] = False

    @classmethod
    def resolve(cls, spec: CaptionerSpec) -> CaptionerSpec:
        """``spec`` as this family's options, with its defaults where ``spec`` leaves None."""
        values = spec.model_dump()
        for key, value in {**cls.common_defaults, **cls.defaults}.items():
            if values.get(key) is None:
                values[key] = value
        return cls.Options.model_validate(values)

    @classmethod
    def components(cls, spec: CaptionerSpec) -> list[tuple[str, str, str]]:
        """The pretrained components a resolved spec loads by name, as ``(role, setting, use)``
        (``use``: vision | text): what ``icsd run --rehearse`` builds with random weights."""
        named = [("captioner image encoder", "vision_model", "vision"), ("captioner text decoder", "text_model", "text")]
        return [c for c in named if getattr(spec, c[1])]

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
            "decoder_style": cm.spec.decoder_style,
            "length_norm": cm.spec.length_norm,
            "decode_dtype": cm.spec.decode_dtype,
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
        from .inference import Captioner

        dev = device or str(next(self.model.parameters()).device)
        return Captioner(
            self.model,
            self.tokenizer,
            self.image_processor,
            family=self.family,
            prompt=self.prompt,
            device=dev,
            length_norm=self.spec.length_norm or "new",
            decode_dtype=self.spec.decode_dtype or "bf16",
        )

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
