"""Drawing the sandbox world: a background, objects of 20 kinds on a 3x3 grid, and a style.

One function, :func:`draw_scene`, serves both the world's camera (benchmark images of full scenes,
with jitter, texture and noise) and the renderer backend (images of what a sentence says, in a
clean style), so the two differ only by the style knobs and by what they are given to draw.
Shapes are drawn with PIL at 4x and downsampled (anti-aliased).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .lexicon import CELLS

RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (245, 215, 40),
    "orange": (245, 140, 20),
    "purple": (140, 50, 170),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "pink": (245, 150, 190),
    "brown": (120, 72, 30),
    "gray": (150, 150, 150),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grass": (110, 175, 80),
    "sand": (225, 200, 145),
    "snow": (225, 235, 245),
    "road": (105, 105, 110),
    "water": (70, 140, 200),
    "floor": (160, 110, 65),
    "carpet": (165, 45, 60),
    "dirt": (135, 100, 60),
    "tiles": (200, 215, 215),
    "ice": (175, 215, 235),
    "gravel": (170, 160, 140),
}
SIZE_SCALE = {"small": 0.13, "medium": 0.19, "large": 0.26}  # object radius as a share of the image


@dataclass(frozen=True)
class Placed:
    """One object group as drawn: kind, colour, size, how many, and its grid cell."""

    kind: str
    colour: str
    size: str
    count: int
    position: str


@dataclass(frozen=True)
class Style:
    """How an image looks beyond its content: position jitter (share of a cell), background
    texture (0-1), pixel noise (std in 0-255 units) and colour jitter (share of each channel).
    ``close_up`` (0 = none) draws pictures of few object groups the way a text-to-image model
    draws a short prompt: each object larger by up to that share (all of it for one group, none
    for five), and a lone group in the middle whatever its cell."""

    jitter: float = 0.0
    texture: float = 0.0
    noise: float = 0.0
    colour_jitter: float = 0.0
    close_up: float = 0.0


CLEAN = Style()
CAMERA = Style(jitter=0.18, texture=0.6, noise=7.0, colour_jitter=0.08)

Box = tuple[float, float, float]  # centre x, centre y, radius (pixels at drawing scale)
Draw = ImageDraw.ImageDraw


def _darker(c: tuple[int, int, int], f: float = 0.6) -> tuple[int, int, int]:
    return (int(c[0] * f), int(c[1] * f), int(c[2] * f))


def _outline(c: tuple[int, int, int]) -> tuple[int, int, int]:
    return (90, 90, 90) if sum(c) < 150 else _darker(c, 0.45)


def _ball(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=c, outline=_outline(c), width=max(1, int(r / 8)))
    d.ellipse([x - r * 0.5, y - r * 0.55, x - r * 0.15, y - r * 0.2], fill=(255, 255, 255))


def _box(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    s = r * 0.8
    d.polygon(
        [(x - s, y - s * 0.6), (x - s * 0.6, y - s), (x + s, y - s), (x + s * 0.6, y - s * 0.6)],
        fill=_darker(c, 0.8),
    )
    d.rectangle(
        [x - s, y - s * 0.6, x + s * 0.6, y + s], fill=c, outline=_outline(c), width=max(1, int(r / 10))
    )


def _cone(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.polygon(
        [(x, y - r), (x - r * 0.7, y + r * 0.8), (x + r * 0.7, y + r * 0.8)], fill=c, outline=_outline(c)
    )
    d.rectangle([x - r * 0.9, y + r * 0.75, x + r * 0.9, y + r], fill=_darker(c))
    d.line(
        [(x - r * 0.4, y + r * 0.1), (x + r * 0.4, y + r * 0.1)],
        fill=(255, 255, 255),
        width=max(1, int(r / 6)),
    )


def _star(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.42
        pts.append((x + rr * math.cos(a), y + rr * math.sin(a)))
    d.polygon(pts, fill=c, outline=_outline(c))


def _ring(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], outline=c, width=max(2, int(r * 0.35)))


def _tree(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.rectangle([x - r * 0.15, y + r * 0.3, x + r * 0.15, y + r], fill=(110, 70, 30))
    d.polygon(
        [(x, y - r), (x - r * 0.75, y + r * 0.4), (x + r * 0.75, y + r * 0.4)], fill=c, outline=_outline(c)
    )


def _house(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.rectangle([x - r * 0.7, y - r * 0.1, x + r * 0.7, y + r], fill=c, outline=_outline(c))
    d.polygon([(x - r * 0.9, y - r * 0.1), (x, y - r), (x + r * 0.9, y - r * 0.1)], fill=(150, 40, 30))
    d.rectangle([x - r * 0.15, y + r * 0.4, x + r * 0.15, y + r], fill=(70, 45, 20))


def _car(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.rectangle([x - r, y - r * 0.1, x + r, y + r * 0.45], fill=c, outline=_outline(c))
    d.polygon(
        [
            (x - r * 0.55, y - r * 0.1),
            (x - r * 0.35, y - r * 0.55),
            (x + r * 0.35, y - r * 0.55),
            (x + r * 0.55, y - r * 0.1),
        ],
        fill=_darker(c, 0.8),
    )
    for wx in (x - r * 0.55, x + r * 0.55):
        d.ellipse([wx - r * 0.25, y + r * 0.3, wx + r * 0.25, y + r * 0.8], fill=(30, 30, 30))


def _boat(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.polygon(
        [(x - r, y + r * 0.3), (x + r, y + r * 0.3), (x + r * 0.6, y + r * 0.8), (x - r * 0.6, y + r * 0.8)],
        fill=c,
        outline=_outline(c),
    )
    d.line([(x, y + r * 0.3), (x, y - r)], fill=(60, 40, 20), width=max(1, int(r / 8)))
    d.polygon(
        [(x + r * 0.05, y - r * 0.9), (x + r * 0.7, y + r * 0.2), (x + r * 0.05, y + r * 0.2)],
        fill=(245, 245, 240),
    )


def _kite(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.polygon(
        [(x, y - r), (x + r * 0.6, y - r * 0.2), (x, y + r * 0.7), (x - r * 0.6, y - r * 0.2)],
        fill=c,
        outline=_outline(c),
    )
    d.line(
        [(x, y + r * 0.7), (x - r * 0.3, y + r), (x + r * 0.1, y + r * 1.2)],
        fill=(60, 60, 60),
        width=max(1, int(r / 10)),
    )


def _umbrella(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.pieslice([x - r, y - r * 0.8, x + r, y + r * 0.8], 180, 360, fill=c, outline=_outline(c))
    d.line([(x, y), (x, y + r)], fill=(50, 50, 50), width=max(1, int(r / 8)))
    d.arc([x - r * 0.3, y + r * 0.7, x, y + r * 1.05], 0, 180, fill=(50, 50, 50), width=max(1, int(r / 8)))


def _cup(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.ellipse([x + r * 0.3, y - r * 0.35, x + r * 0.95, y + r * 0.35], outline=c, width=max(2, int(r / 5)))
    d.polygon(
        [
            (x - r * 0.65, y - r * 0.6),
            (x + r * 0.55, y - r * 0.6),
            (x + r * 0.4, y + r * 0.7),
            (x - r * 0.5, y + r * 0.7),
        ],
        fill=c,
        outline=_outline(c),
    )


def _bottle(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.rectangle([x - r * 0.35, y - r * 0.3, x + r * 0.35, y + r], fill=c, outline=_outline(c))
    d.rectangle([x - r * 0.13, y - r, x + r * 0.13, y - r * 0.3], fill=c, outline=_outline(c))


def _clock(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=c)
    d.ellipse([x - r * 0.72, y - r * 0.72, x + r * 0.72, y + r * 0.72], fill=(250, 250, 245))
    w = max(1, int(r / 8))
    d.line([(x, y), (x, y - r * 0.55)], fill=(20, 20, 20), width=w)
    d.line([(x, y), (x + r * 0.4, y + r * 0.1)], fill=(20, 20, 20), width=w)


def _flower(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.line([(x, y), (x, y + r)], fill=(30, 120, 40), width=max(1, int(r / 7)))
    for i in range(5):
        a = i * 2 * math.pi / 5
        px, py = x + r * 0.42 * math.cos(a), y - r * 0.3 + r * 0.42 * math.sin(a)
        d.ellipse([px - r * 0.3, py - r * 0.3, px + r * 0.3, py + r * 0.3], fill=c)
    d.ellipse([x - r * 0.2, y - r * 0.5, x + r * 0.2, y - r * 0.1], fill=(250, 200, 30))


def _fish(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.polygon([(x + r * 0.4, y), (x + r, y - r * 0.45), (x + r, y + r * 0.45)], fill=_darker(c, 0.8))
    d.ellipse([x - r, y - r * 0.45, x + r * 0.55, y + r * 0.45], fill=c, outline=_outline(c))
    d.ellipse([x - r * 0.7, y - r * 0.15, x - r * 0.5, y + r * 0.05], fill=(10, 10, 10))


def _bird(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    w = max(2, int(r / 4))
    d.line([(x - r, y - r * 0.5), (x - r * 0.4, y - r * 0.1), (x, y + r * 0.1)], fill=c, width=w)
    d.line([(x + r, y - r * 0.5), (x + r * 0.4, y - r * 0.1), (x, y + r * 0.1)], fill=c, width=w)
    d.ellipse([x - r * 0.25, y - r * 0.05, x + r * 0.25, y + r * 0.4], fill=c)


def _hat(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.ellipse([x - r, y + r * 0.2, x + r, y + r * 0.6], fill=_darker(c, 0.8))
    d.rectangle([x - r * 0.55, y - r * 0.6, x + r * 0.55, y + r * 0.4], fill=c, outline=_outline(c))
    d.rectangle([x - r * 0.55, y + r * 0.1, x + r * 0.55, y + r * 0.3], fill=(30, 30, 30))


def _chair(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    w = max(1, int(r / 6))
    d.rectangle([x - r * 0.6, y - r, x - r * 0.4, y + r], fill=c)
    d.rectangle([x - r * 0.6, y, x + r * 0.6, y + r * 0.2], fill=c, outline=_outline(c))
    d.line([(x + r * 0.5, y + r * 0.2), (x + r * 0.5, y + r)], fill=c, width=w * 2)


def _lamp(d: Draw, x: float, y: float, r: float, c: tuple[int, int, int]) -> None:
    d.polygon(
        [(x - r * 0.3, y - r), (x + r * 0.3, y - r), (x + r * 0.6, y - r * 0.3), (x - r * 0.6, y - r * 0.3)],
        fill=c,
        outline=_outline(c),
    )
    d.line([(x, y - r * 0.3), (x, y + r * 0.8)], fill=(60, 60, 60), width=max(1, int(r / 8)))
    d.ellipse([x - r * 0.45, y + r * 0.7, x + r * 0.45, y + r], fill=(60, 60, 60))


SHAPES: dict[str, Callable[[Draw, float, float, float, tuple[int, int, int]], None]] = {
    "ball": _ball, "box": _box, "cone": _cone, "star": _star, "ring": _ring, "tree": _tree,
    "house": _house, "car": _car, "boat": _boat, "kite": _kite, "umbrella": _umbrella, "cup": _cup,
    "bottle": _bottle, "clock": _clock, "flower": _flower, "fish": _fish, "bird": _bird, "hat": _hat,
    "chair": _chair, "lamp": _lamp,
}  # fmt: skip


def _background(img: Image.Image, name: str, rng: random.Random, style: Style) -> None:
    d = ImageDraw.Draw(img)
    w, h = img.size
    base = BACKGROUND_RGB[name]
    d.rectangle([0, 0, w, h], fill=base)
    # each background's own pattern, so a background is recognisable without its colour alone
    step = max(4, w // 8)
    if name == "road":
        for x0 in range(0, w, step * 2):
            d.rectangle([x0, h * 0.48, x0 + step, h * 0.52], fill=(240, 210, 60))
    elif name == "water":
        for y0 in range(step // 2, h, step):
            d.arc([0, y0, w / 2, y0 + step / 2], 200, 340, fill=(150, 200, 240), width=max(1, w // 96))
            d.arc([w / 2, y0 + step / 3, w, y0 + step], 200, 340, fill=(150, 200, 240), width=max(1, w // 96))
    elif name == "floor":
        for y0 in range(0, h, step):
            d.line([(0, y0), (w, y0)], fill=_darker(base, 0.75), width=max(1, w // 128))
    elif name == "grass":
        for _ in range(40):
            gx, gy = rng.uniform(0, w), rng.uniform(0, h)
            d.line(
                [(gx, gy), (gx + rng.uniform(-2, 2) * w / 128, gy - w / 40)],
                fill=(70, 140, 50),
                width=max(1, w // 128),
            )
    elif name == "carpet":
        for x0 in range(0, w, step):
            d.line([(x0, 0), (x0, h)], fill=_darker(base, 0.85), width=max(1, w // 128))
    elif name == "snow":
        for _ in range(25):
            sx, sy = rng.uniform(0, w), rng.uniform(0, h)
            d.ellipse([sx - 1, sy - 1, sx + 1, sy + 1], fill=(255, 255, 255))
    elif name == "dirt":
        for _ in range(30):
            sx, sy = rng.uniform(0, w), rng.uniform(0, h)
            d.ellipse([sx - 2, sy - 1, sx + 2, sy + 1], fill=_darker(base, 0.7))
    elif name == "tiles":
        for t in range(0, w, step):
            d.line([(t, 0), (t, h)], fill=_darker(base, 0.8), width=max(1, w // 128))
            d.line([(0, t), (w, t)], fill=_darker(base, 0.8), width=max(1, w // 128))
    elif name == "ice":
        for _ in range(6):
            sx, sy = rng.uniform(0, w), rng.uniform(0, h)
            d.line([(sx, sy), (sx + w / 6, sy + h / 12)], fill=(235, 245, 250), width=max(1, w // 96))
    elif name == "gravel":
        for _ in range(60):
            sx, sy = rng.uniform(0, w), rng.uniform(0, h)
            d.ellipse([sx - 1, sy - 1, sx + 1, sy + 1], fill=_darker(base, rng.uniform(0.6, 0.9)))
    if style.texture > 0:
        arr = np.asarray(img, dtype=np.float32)
        gen = np.random.default_rng(rng.getrandbits(32))
        coarse = gen.normal(0, 1, (8, 8, 1))
        field = np.asarray(
            Image.fromarray(coarse[..., 0].astype(np.float32), mode="F").resize(
                (w, h), Image.Resampling.BILINEAR
            )
        )
        arr += style.texture * 22 * field[..., None]
        img.paste(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))


def draw_scene(
    background: str, objects: list[Placed], *, size: int, seed: int, style: Style = CLEAN
) -> np.ndarray:
    """(size, size, 3) uint8 of ``objects`` (on their grid cells) over ``background``."""
    rng = random.Random(seed)
    scale = 4
    big = size * scale
    img = Image.new("RGB", (big, big))
    _background(img, background, rng, style)
    d = ImageDraw.Draw(img)
    cell = big / 3
    zoom = 1.0 + style.close_up * max(0, 5 - len(objects)) / 4
    for obj in sorted(objects, key=lambda o: CELLS[o.position][1]):  # back (top) to front
        cx, cy = CELLS["middle"] if style.close_up and len(objects) == 1 else CELLS[obj.position]
        x = (cx + 0.5) * cell + rng.uniform(-1, 1) * style.jitter * cell
        y = (cy + 0.5) * cell + rng.uniform(-1, 1) * style.jitter * cell
        r = SIZE_SCALE[obj.size] * big * (0.75 if obj.count > 1 else 1.0) * zoom
        colour = RGB[obj.colour]
        if style.colour_jitter:
            colour = tuple(
                int(min(255, max(0, ch * (1 + rng.uniform(-1, 1) * style.colour_jitter)))) for ch in colour
            )  # type: ignore[assignment]
        gap = r * 1.5
        for i in range(obj.count):
            ox = (i - (obj.count - 1) / 2) * gap
            oy = (i % 2) * r * 0.25 if obj.count > 1 else 0.0
            SHAPES[obj.kind](d, x + ox, y + oy, r, colour)
    out = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(out, dtype=np.float64)
    if style.noise:
        arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0, style.noise, arr.shape)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)
