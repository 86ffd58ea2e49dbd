"""Training-time image augmentation on PIL images: RandomResizedCrop and horizontal flip.

Same sampling as torchvision's ``RandomResizedCrop`` (area scale, log-uniform aspect ratio, ten
tries, then a central crop), without torchvision. Each sample gets its own ``random.Random`` so an
augmentation depends only on (seed, epoch, stream, position), never on what ran before it.
"""

from __future__ import annotations

import math
import random

from PIL import Image

Box = tuple[int, int, int, int]


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A crop box (left, top, right, bottom) covering ``scale`` of the area at a random aspect ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def augment(image: Image.Image, size: int, rng: random.Random, scale_min: float = 0.5) -> Image.Image:
    """RandomResizedCrop(size, scale=(scale_min, 1)) with bicubic resampling, then a coin-flip mirror."""
    box = random_resized_crop_box(image.width, image.height, rng, scale=(scale_min, 1.0))
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre (what CLIP's processor does)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike ``hash`` of strings)."""
    seed = 0x9E3779B97F4A7C15
    for p in parts:
        seed = (seed * 6364136223846793005 + (p & 0xFFFFFFFFFFFFFFFF) + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        seed ^= seed >> 29
    return seed & 0x7FFFFFFFFFFFFFFF
