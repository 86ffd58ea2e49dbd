"""The sandbox world's text-to-image backends (registered in ``T2I_BACKENDS``).

``sandbox`` (``--render.backend sandbox --render.model world``) parses any English sentence with
the world's lexicon and draws what it names, in a clean style; what the sentence leaves open
(a colour, a size, a position, the background) comes from the image's seed. A prompt naming more
object kinds than ``capacity`` (``world:capacity=3``, the default; at most 5, the grid's cells) is
drawn with the first ones it names, as text-to-image models leave objects out of long prompts. ``world:extra=0.3``
also adds an unmentioned object to each free cell with probability 0.3 (a renderer that invents
clutter); ``world:jitter=0.1,texture=0.5,noise=5`` changes the style; ``world:close_up=1`` draws a
prompt that names few objects as a diffusion model draws a short prompt (larger, a lone object in
the middle), unlike the camera: the composition gap the paper's multi-context images close.

``sandbox-camera`` (``--render.model DIR``, a world folder) is the world's camera, for the oracle
bound: a prompt that is one of the world's training captions is drawn as the full hidden scene
that caption was written about, in the camera's style (any other prompt is parsed as above).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.t2i import Rendered, T2ISpec
from ..errors import UserError
from .draw import CAMERA, Style, draw_scene
from .lexicon import POSITIONS, parse
from .world import Scene, realise

MODEL = "world"
RENDER = Style(jitter=0.06)  # flat colours and clean backgrounds; placement varies a little by seed
OPTIONS = ("extra", "capacity", "jitter", "texture", "noise", "colour_jitter", "close_up")
# How many object kinds one picture shows at most: a prompt naming more is drawn with the first
# CAPACITY it names (the rest are left out). An assumption about the text-to-image model, not a
# measurement: Stable Diffusion v1 often leaves out one of two subjects ("catastrophic neglect",
# Chefer et al., Attend-and-Excite, 2023) and scores low on multi-object prompts (Huang et al.,
# T2I-CompBench, 2023). docs/sandbox-protocol.md fixes 3; the sweep of docs/sandbox.md varies it.
CAPACITY = 3


@dataclass(frozen=True)
class RendererSettings:
    extra: float = 0.0
    capacity: int = CAPACITY
    style: Style = RENDER


def parse_model(model: str) -> RendererSettings:
    """``world`` or ``world:extra=0.3,noise=5`` -> settings; anything else is one line."""
    name, _, opts = model.partition(":")
    if name != MODEL:
        raise UserError(
            f"the sandbox renderer draws the sandbox world: --render.model {MODEL} "
            f"(or {MODEL}:extra=P,jitter=J,texture=T,noise=N), got {model!r}"
        )
    values: dict[str, float] = {}
    for part in filter(None, opts.split(",")):
        key, _, value = part.partition("=")
        if key not in OPTIONS:
            raise UserError(f"unknown sandbox renderer option {key!r}; options: {', '.join(OPTIONS)}")
        try:
            values[key] = float(value)
        except ValueError:
            raise UserError(f"sandbox renderer option {key} needs a number, got {value!r}") from None
    extra = values.pop("extra", 0.0)
    capacity = values.pop("capacity", CAPACITY)
    if capacity != int(capacity) or not 1 <= capacity <= len(POSITIONS):
        raise UserError(f"sandbox renderer option capacity is a whole number of kinds, 1-{len(POSITIONS)}")
    return RendererSettings(extra=extra, capacity=int(capacity), style=replace(RENDER, **values))


@dataclass
class SceneRenderer:
    """The generator both backends return: prompt -> scene -> pixels, image i from seeds[i] alone."""

    settings: RendererSettings
    scenes: dict[str, list[Scene]] = field(default_factory=dict)  # camera: caption text -> its scenes
    device: str = "cpu"
    has_safety_checker: bool = False
    pipeline_class: str = "SandboxRenderer"
    scheduler_name: str = "none"

    def scene_for(self, prompt: str, seed: int) -> Scene:
        rng = random.Random(seed)
        known = self.scenes.get(" ".join(prompt.split()))
        if known:
            return known[rng.randrange(len(known))]
        return realise(parse(prompt), rng, self.settings.extra, self.settings.capacity)

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int = 0,
        guidance: float = 0.0,
        width: int = 64,
        height: int = 64,
        negative_prompt: str | None = None,
    ) -> Rendered:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            scene = self.scene_for(prompt, int(seed))
            pixels = draw_scene(
                scene.background, list(scene.objects), size=width, seed=int(seed), style=self.settings.style
            )
            if height != width:
                from PIL import Image

                pixels = np.asarray(Image.fromarray(pixels).resize((width, height)))
            images.append(pixels)
        return Rendered(pixels=np.stack(images), nsfw=[None] * len(prompts))


class SandboxRenderer:
    """``render.backend: sandbox``: draws what each prompt says."""

    untrained = False

    @staticmethod
    def prepare(model: str, cache: Path) -> str:
        parse_model(model)
        return model

    @staticmethod
    def model_label(model: str) -> str:
        return f"sandbox:{model}"

    @staticmethod
    def load(spec: T2ISpec, device: str) -> SceneRenderer:
        return SceneRenderer(parse_model(spec.model))


def train_scene_index(world_dir: Path) -> dict[str, list[Scene]]:
    """Each training caption's text -> the hidden scenes it was written about."""
    data = json.loads((world_dir / "train_scenes.json").read_text(encoding="utf-8"))
    index: dict[str, list[Scene]] = {}
    for entry in data["scenes"]:
        scene = Scene.from_json(entry["scene"])
        for caption in entry["captions"]:
            index.setdefault(" ".join(caption.split()), []).append(scene)
    return index


class SandboxCamera:
    """``render.backend: sandbox-camera`` with ``render.model`` a world folder: the oracle's images."""

    untrained = False

    @staticmethod
    def prepare(model: str, cache: Path) -> str:
        folder = Path(model).expanduser()
        if not (folder / "train_scenes.json").is_file():
            raise UserError(
                f"not a sandbox world folder (no train_scenes.json): {folder} (see `icsd sandbox make`)"
            )
        return str(folder.resolve())

    @staticmethod
    def model_label(model: str) -> str:
        return f"sandbox-camera:{Path(model).name}"

    @staticmethod
    def load(spec: T2ISpec, device: str) -> Any:
        return SceneRenderer(RendererSettings(style=CAMERA), scenes=train_scene_index(Path(spec.model)))
