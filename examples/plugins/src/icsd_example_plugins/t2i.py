"""``--backend gradient``: a seeded colour gradient per prompt (no model, no download).

Image ``i`` depends on ``seeds[i]`` and its prompt alone, so it is the same whatever batch it is
drawn in; there is no safety checker, so every NSFW flag is ``None``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icsd.backends.t2i import Rendered


class GradientGenerator:
    has_safety_checker = False
    pipeline_class = "GradientGenerator"
    scheduler_name = "none"

    def __init__(self, device: str) -> None:
        self.device = device

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int,
        guidance: float,
        width: int,
        height: int,
        negative_prompt: str | None = None,
    ) -> Rendered:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images = [self.draw(p, int(s), width, height) for p, s in zip(prompts, seeds, strict=True)]
        return Rendered(pixels=np.stack(images), nsfw=[None] * len(images))

    @staticmethod
    def draw(prompt: str, seed: int, width: int, height: int) -> np.ndarray:
        digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        start, end = rng.integers(0, 256, size=(2, 3))
        t = np.linspace(0.0, 1.0, width)[None, :, None] * np.ones((height, 1, 1))
        image = start + (end - start) * t + rng.normal(0, 4, size=(height, width, 3))
        return np.clip(np.round(image), 0, 255).astype(np.uint8)


class GradientBackend:
    untrained = True  # its images carry no meaning

    @staticmethod
    def prepare(model: str, cache: Path) -> str:
        return model

    @staticmethod
    def model_label(model: str) -> str:
        return "gradient"

    @staticmethod
    def load(spec: Any, device: str) -> GradientGenerator:
        return GradientGenerator(device)
