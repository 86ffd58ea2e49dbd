"""The CLIP vision side of the captioners: loading at any image size, image processors."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from ...errors import UserError
from .hf import check_all_weights_loaded, quiet_transformers


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


def squash_processor(processor: Any) -> Any:
    """``processor`` resizing to ``size x size`` without keeping the aspect ratio and without a crop
    (bicubic): the official test-time transform ``Resize((s, s), BICUBIC)``."""
    crop = getattr(processor, "crop_size", None)
    side = int(crop["height"]) if crop else int(processor.size["shortest_edge"])
    processor.size = {"height": side, "width": side}
    processor.do_center_crop = False
    processor.resample = 3  # PIL.Image.BICUBIC
    return processor


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
