"""Turning any image a user gives into the 8-bit RGB the models take, the same way everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit and 32-bit grey images are scaled to 8 bits (PIL's own ``convert`` clips
    them, turning most 16-bit photos white); float images in 0..1 are scaled by 255."""
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if image.mode in _SIXTEEN_BIT or values.max(initial=0) > 255:
            values = values >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        floats = np.asarray(image, dtype=np.float32)
        if floats.max(initial=0.0) <= 1.0:
            floats = floats * 255.0
        image = Image.fromarray(np.clip(floats, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """The image file at ``path``, fully read (the file is closed again) and in 8-bit RGB."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)
