"""The sandbox captioner's pretrained image encoder: the world's stand-in for CLIP.

The paper's captioner starts from a pretrained CLIP image encoder, trained on web images that were
never the benchmark's. The sandbox does the same: :func:`pretrain_encoder` trains the
:mod:`.vision` encoder, multi-label, to say which object kinds, colours and background a picture
shows, on the *renderer's* pictures of random scenes (its own seed stream: none of them is a
corpus, validation or test scene), and scores it on camera pictures of other random scenes. The
packaged encoder (``icsd/sandbox/encoder``) is this function's output with its defaults; ``icsd
sandbox encoder --out DIR`` writes it again.

Without it, a captioner trained from random weights for a few hundred steps names the world's
backgrounds but its objects only at chance (docs/sandbox.md, "The captioner").
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .draw import CAMERA, Style, draw_scene
from .lexicon import BACKGROUNDS, COLOURS, KINDS, POSITIONS, SIZES
from .world import Scene, random_scene

if TYPE_CHECKING:
    import torch

PACKAGED = Path(__file__).with_name("encoder")
RECORD = "pretraining.json"
HEAD = "label_head.safetensors"  # the label head of pretraining (not part of the captioner)
# the scene streams: far from the world's seeds (0, 1, ...) and each other
TRAIN_SEED = 1_000_003
PROBE_SEED = 2_000_003
# What a picture is labelled with, as CLIP learns it from captions that say which thing has which
# colour, how large it is and where: per kind, whether it is there and, when it is, its colour, size
# and cell; and the background.
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", COLOURS),
    ("size", SIZES),
    ("position", POSITIONS),
)
MISSING = -100  # an attribute of a kind the picture does not show (ignored by the loss)


@dataclass(frozen=True)
class PretrainSettings:
    images: int = 10_000
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    probe_images: int = 400
    image_size: int = 64
    seed: int = 0


@dataclass
class Labels:
    """A batch of pictures' labels: ``kinds`` multi-hot ``[n, K]``; per attribute ``[n, K]`` class
    indices (:data:`MISSING` where the kind is absent); ``background`` ``[n]``."""

    kinds: torch.Tensor
    attributes: dict[str, torch.Tensor]
    background: torch.Tensor

    def __getitem__(self, rows: torch.Tensor) -> Labels:
        return Labels(self.kinds[rows], {k: v[rows] for k, v in self.attributes.items()}, self.background[rows])


def scene_labels(scene: Scene) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    kinds = np.zeros(len(KINDS), dtype=np.float32)
    attributes = {name: np.full(len(KINDS), MISSING, dtype=np.int64) for name, _ in ATTRIBUTES}
    for obj in scene.objects:
        k = KINDS.index(obj.kind)
        kinds[k] = 1
        for name, values in ATTRIBUTES:
            attributes[name][k] = values.index(getattr(obj, name))
    return kinds, attributes, BACKGROUNDS.index(scene.background)


def labelled_images(n: int, seed: int, style: Style, size: int) -> tuple[torch.Tensor, Labels]:
    """``n`` random scenes drawn in ``style``: normalised pixels ``[n, 3, S, S]`` and their labels."""
    import torch

    from ..backends.captioners import clip_image_processor

    processor = clip_image_processor(size)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    rng = random.Random(seed)
    pixels, kinds, backgrounds = [], [], []
    attributes: dict[str, list[np.ndarray]] = {name: [] for name, _ in ATTRIBUTES}
    for i in range(n):
        scene = random_scene(rng)
        pixels.append(
            draw_scene(scene.background, list(scene.objects), size=size, seed=seed * 7919 + i, style=style)
        )
        k, a, b = scene_labels(scene)
        kinds.append(k)
        backgrounds.append(b)
        for name in attributes:
            attributes[name].append(a[name])
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    labels = Labels(
        torch.from_numpy(np.stack(kinds)),
        {name: torch.from_numpy(np.stack(v)) for name, v in attributes.items()},
        torch.tensor(backgrounds),
    )
    return (x - mean) / std, labels


class LabelHead:
    """Per kind, a learned query pools the encoder's grid (so the kind's own cells answer for it);
    linear maps give its presence and its attributes. The background comes from the mean token."""

    def __init__(self, hidden: int) -> None:
        from torch import nn

        self.modules = nn.ModuleDict(
            {
                "queries": nn.Embedding(len(KINDS), hidden),
                "presence": nn.Linear(hidden, 1),
                "background": nn.Linear(hidden, len(BACKGROUNDS)),
                **{name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES},
            }
        )

    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.modules
        queries: torch.Tensor = m["queries"].weight  # type: ignore[assignment]  # [K, H]
        weights = (tokens @ queries.T / tokens.shape[-1] ** 0.5).softmax(dim=1)  # [n, T, K]
        pooled = weights.transpose(1, 2) @ tokens  # [n, K, H]
        out = {"kinds": m["presence"](pooled).squeeze(-1), "background": m["background"](tokens.mean(1))}
        out.update({name: m[name](pooled) for name, _ in ATTRIBUTES})
        return out


def label_loss(scores: dict[str, torch.Tensor], labels: Labels) -> torch.Tensor:
    from torch.nn import functional as F

    loss = F.binary_cross_entropy_with_logits(scores["kinds"], labels.kinds)
    loss = loss + F.cross_entropy(scores["background"], labels.background)
    for name, _ in ATTRIBUTES:
        logits = scores[name]
        loss = loss + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.attributes[name].reshape(-1), ignore_index=MISSING
        )
    return loss


def probe_scores(scores: dict[str, torch.Tensor], labels: Labels) -> dict[str, float]:
    """``kinds``: of each picture's ``n`` kinds, the share among its top ``n`` presence scores;
    per attribute: for the kinds a picture shows, how often the kind's own attribute is named
    (colour bound to its object, size, cell); ``background``: accuracy."""
    hits = total = 0
    for row, truth in zip(scores["kinds"], labels.kinds, strict=True):
        n = int(truth.sum())
        hits += int(truth[row.topk(n).indices].sum())
        total += n
    out = {"kinds": hits / max(1, total)}
    for name, _ in ATTRIBUTES:
        target = labels.attributes[name]
        shown = target != MISSING
        out[name] = float((scores[name].argmax(-1)[shown] == target[shown]).float().mean())
    out["background"] = float((scores["background"].argmax(-1) == labels.background).float().mean())
    return out


def chance_scores(labels: Labels) -> dict[str, float]:
    """What :func:`probe_scores` gives a random guess."""
    out = {"kinds": float(labels.kinds.sum(1).mean()) / len(KINDS)}
    out.update({name: 1 / len(values) for name, values in ATTRIBUTES})
    out["background"] = 1 / len(BACKGROUNDS)
    return out


def pretrain_encoder(
    out: Path,
    settings: PretrainSettings = PretrainSettings(),
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the sandbox encoder (plus a linear label head, dropped after) and save it, frozen,
    as a ``save_pretrained`` folder with ``pretraining.json`` (settings and probe scores)."""
    import torch
    from safetensors.torch import save_file

    from .captioner import VISION
    from .renderer import RENDER
    from .vision import SandboxVisionConfig, SandboxVisionModel

    torch.manual_seed(settings.seed)
    x, y = labelled_images(settings.images, TRAIN_SEED + settings.seed, RENDER, settings.image_size)
    probe_x, probe_y = labelled_images(settings.probe_images, PROBE_SEED, CAMERA, settings.image_size)
    encoder = SandboxVisionModel(SandboxVisionConfig(image_size=settings.image_size, **VISION))
    head = LabelHead(encoder.config.hidden_size)

    def scores(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return head(encoder(pixel_values=pixels).last_hidden_state)

    params = [*encoder.parameters(), *head.modules.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    total = settings.steps

    def factor(step: int) -> float:
        return (
            min(1.0, (step + 1) / settings.warmup_steps)
            * 0.5
            * (1 + float(np.cos(np.pi * min(step, total) / total)))
        )

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(settings.seed)
    start = time.perf_counter()
    loss = torch.tensor(0.0)
    for step in range(1, total + 1):
        batch = torch.randint(0, len(x), (settings.batch_size,), generator=generator)
        loss = label_loss(scores(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, total, {"loss": float(loss.detach())})
    encoder.eval()
    with torch.no_grad():
        probe = probe_scores(scores(probe_x), probe_y)
    record = {
        "what": "the sandbox captioner's image encoder, pretrained to say which kinds a picture shows and, "
        "per kind, its colour, size and cell, and the background, on renderer pictures of random scenes; "
        "scored on camera pictures of other random scenes",
        "settings": asdict(settings),
        "labels": {"kinds": list(KINDS), **{n: list(v) for n, v in ATTRIBUTES}, "background": list(BACKGROUNDS)},
        "final_loss": round(float(loss.detach()), 4),
        "camera_probe": {k: round(v, 4) for k, v in probe.items()},
        "camera_probe_chance": {k: round(v, 4) for k, v in chance_scores(probe_y).items()},
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    encoder.config.frozen = True
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    save_file({k: v.detach().contiguous() for k, v in head.modules.state_dict().items()}, str(out / HEAD))
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def label_scores(folder: Path, encoder: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The label scores of the encoder of ``folder`` with its saved label head."""
    import torch
    from safetensors.torch import load_file

    head = LabelHead(encoder.config.hidden_size)
    head.modules.load_state_dict(load_file(str(folder / HEAD)))
    with torch.no_grad():
        return head(encoder(pixel_values=pixels).last_hidden_state)


def load_encoder(source: str | Path) -> Any:
    """The frozen pretrained encoder of a folder (``world`` = the packaged one)."""
    from ..errors import UserError
    from .vision import SandboxVisionModel

    folder = PACKAGED if str(source) == "world" else Path(source)
    if not (folder / "config.json").is_file():
        raise UserError(f"no sandbox encoder in {folder} (write one with: icsd sandbox encoder --out DIR)")
    model = SandboxVisionModel.from_pretrained(folder)
    model.config.frozen = True
    return model.apply_frozen()
