"""CLIP image-text similarity (cosine of the projected, normalised embeddings) for filtering."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError


class ClipScorer:
    def __init__(self, model: str, device: str = "cpu") -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
            raise UserError(f"CLIP model path does not exist: {model}")
        try:
            self.processor = CLIPProcessor.from_pretrained(model)
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            self.model = CLIPModel.from_pretrained(model, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot load CLIP model {model!r} (not local and not downloadable here?): {first}") from None
        self.device = device
        self.name = model

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        import torch
        from PIL import Image

        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        inputs = self.processor(images=pil, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            feats = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.model.dtype))
        return _normalise(_tensor(feats))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=77)
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            feats = self.model.get_text_features(**inputs)
        return _normalise(_tensor(feats))


def _tensor(out: Any) -> np.ndarray:
    feats = out if not hasattr(out, "pooler_output") else out.pooler_output
    return np.asarray(feats.float().cpu().numpy(), dtype=np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
