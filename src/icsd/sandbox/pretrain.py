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
from .lexicon import BACKGROUNDS, COLOURS, KINDS
from .world import Scene, random_scene

if TYPE_CHECKING:
    import torch

PACKAGED = Path(__file__).with_name("encoder")
RECORD = "pretraining.json"
HEAD = "label_head.safetensors"  # the linear label head of pretraining (not part of the captioner)
# the scene streams: far from the world's seeds (0, 1, ...) and each other
TRAIN_SEED = 1_000_003
PROBE_SEED = 2_000_003
GROUPS = (
    ("kinds", "kind", KINDS),
    ("colours", "colour", COLOURS),
    ("backgrounds", "background", BACKGROUNDS),
)
LABELS = tuple(f"{prefix}:{value}" for _, prefix, values in GROUPS for value in values)
INDEX = {label: i for i, label in enumerate(LABELS)}
SLICES = {
    name: slice(INDEX[f"{prefix}:{values[0]}"], INDEX[f"{prefix}:{values[-1]}"] + 1)
    for name, prefix, values in GROUPS
}


@dataclass(frozen=True)
class PretrainSettings:
    images: int = 10_000
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    probe_images: int = 400
    image_size: int = 64
    seed: int = 0


def scene_labels(scene: Scene) -> np.ndarray:
    """Multi-hot over :data:`LABELS`: the scene's kinds, colours and background."""
    y = np.zeros(len(LABELS), dtype=np.float32)
    for obj in scene.objects:
        y[[INDEX[f"kind:{obj.kind}"], INDEX[f"colour:{obj.colour}"]]] = 1
    y[INDEX[f"background:{scene.background}"]] = 1
    return y


def labelled_images(n: int, seed: int, style: Style, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random scenes drawn in ``style``: normalised pixels ``[n, 3, S, S]`` and labels ``[n, L]``."""
    import torch

    from ..backends.captioners import clip_image_processor

    processor = clip_image_processor(size)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    rng = random.Random(seed)
    pixels, labels = [], []
    for i in range(n):
        scene = random_scene(rng)
        pixels.append(
            draw_scene(scene.background, list(scene.objects), size=size, seed=seed * 7919 + i, style=style)
        )
        labels.append(scene_labels(scene))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return (x - mean) / std, torch.from_numpy(np.stack(labels))


def recall_at_truth(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per label group: of each picture's ``n`` true labels, the share among its top ``n`` scores."""
    out: dict[str, float] = {}
    for name, group in SLICES.items():
        hits = total = 0
        for row, truth in zip(scores[:, group], labels[:, group], strict=True):
            n = int(truth.sum())
            hits += int(truth[row.topk(n).indices].sum())
            total += n
        out[name] = hits / max(1, total)
    return out


def chance_recall(labels: torch.Tensor) -> dict[str, float]:
    """What :func:`recall_at_truth` gives a random ranking."""
    return {
        name: float(labels[:, group].sum(1).mean()) / (group.stop - group.start)
        for name, group in SLICES.items()
    }


def pretrain_encoder(
    out: Path,
    settings: PretrainSettings = PretrainSettings(),
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the sandbox encoder (plus a linear label head, dropped after) and save it, frozen,
    as a ``save_pretrained`` folder with ``pretraining.json`` (settings and probe scores)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from .captioner import VISION
    from .renderer import RENDER
    from .vision import SandboxVisionConfig, SandboxVisionModel

    torch.manual_seed(settings.seed)
    x, y = labelled_images(settings.images, TRAIN_SEED + settings.seed, RENDER, settings.image_size)
    probe_x, probe_y = labelled_images(settings.probe_images, PROBE_SEED, CAMERA, settings.image_size)
    encoder = SandboxVisionModel(SandboxVisionConfig(image_size=settings.image_size, **VISION))
    head = nn.Linear(encoder.config.hidden_size, len(LABELS))

    def scores(pixels: torch.Tensor) -> torch.Tensor:
        return head(encoder(pixel_values=pixels).last_hidden_state.amax(1))  # type: ignore[no-any-return]

    params = [*encoder.parameters(), *head.parameters()]
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
        loss = nn.functional.binary_cross_entropy_with_logits(scores(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, total, {"loss": float(loss.detach())})
    encoder.eval()
    with torch.no_grad():
        probe = recall_at_truth(scores(probe_x), probe_y)
    record = {
        "what": "the sandbox captioner's image encoder, pretrained multi-label (kinds, colours, background) "
        "on renderer pictures of random scenes; scored on camera pictures of other random scenes",
        "settings": asdict(settings),
        "labels": list(LABELS),
        "final_loss": round(float(loss.detach()), 4),
        "camera_probe": {k: round(v, 4) for k, v in probe.items()},
        "camera_probe_chance": {k: round(v, 4) for k, v in chance_recall(probe_y).items()},
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    encoder.config.frozen = True
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out / HEAD))
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def label_scores(folder: Path, encoder: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Scores over :data:`LABELS` of the encoder of ``folder`` with its saved label head."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(folder / HEAD))
    with torch.no_grad():
        pooled = encoder(pixel_values=pixels).last_hidden_state.amax(1)
        return pooled @ weights["weight"].T + weights["bias"]


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
