"""Captioning images with a trained checkpoint of any registered family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from ...errors import UserError
from ...images import to_rgb
from ..registry import CAPTIONERS
from .base import CAPTIONER_FILE, CaptionerFamily
from .decoding import decoding_context
from .text import DEFAULT_PROMPT, clean_caption, decoder_prompt_ids


class Captioner:
    """Caption PIL images with a trained checkpoint (beam search through ``generate()``)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        family: type[CaptionerFamily],
        prompt: str,
        device: str,
        length_norm: str = "new",
        decode_dtype: str = "bf16",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = family
        self.prompt = prompt
        self.device = device
        #: beam scores over the new tokens (``new``) or the full sequence (``total``, transformers 4.15)
        self.length_norm = length_norm
        #: ``bf16``: autocast on a GPU; ``fp32``: full precision (the official evaluation)
        self.decode_dtype = decode_dtype

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
        with decoding_context(self.model, self.device, self.length_norm, self.decode_dtype):
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


CHECKPOINT_HINT = "a checkpoint is a folder such as RUN/train/best"


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder ``path`` names, or a :class:`UserError` that says what is wrong with it:
    missing, or no ``config.json`` (for a run folder or its ``train/``: the checkpoint inside)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"model not found: {path} ({CHECKPOINT_HINT})")
    if (folder / "config.json").is_file():
        return folder
    subfolders = ("train/best", "best", "train/last", "last")
    inside = next((folder / s for s in subfolders if (folder / s / "config.json").is_file()), None)
    hint = f"did you mean --model {inside}?" if inside is not None else CHECKPOINT_HINT
    raise UserError(f"not a captioner checkpoint (no config.json): {folder}; {hint}")


def load_captioner(
    path: str, device: str = "auto", *, length_norm: str | None = None, decode_dtype: str | None = None
) -> Captioner:
    """A captioner from a ``save_pretrained`` folder of any registered family. ``length_norm`` and
    ``decode_dtype`` default to what the checkpoint's ``captioner.json`` records (``new`` and
    ``bf16`` for checkpoints that record neither)."""
    from ...executor import resolve_device

    folder = check_checkpoint(path)
    config_file = folder / "config.json"
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
    return Captioner(
        model,
        tokenizer,
        processor,
        family=family,
        prompt=prompt,
        device=dev,
        length_norm=str(length_norm or info.get("length_norm") or "new"),
        decode_dtype=str(decode_dtype or info.get("decode_dtype") or "bf16"),
    )
