"""Can an image encoder of the ``sandbox`` captioner's size learn the world's object kinds at all?

A probe with the strongest possible signal: the encoder plus a linear head, trained from random
weights to say which of the 20 kinds a camera image holds (multi-label, binary cross-entropy),
on N camera images of random scenes, then scored on 400 other camera images. The score is the
share of the kinds in a held-out image found among the head's top n (n = the kinds it holds),
beside the share a random ranking gets. Both encoders run in this one process, same data, same
steps, same optimiser:

- ``vit``:  the CLIP vision transformer the ``sandbox`` preset used before (8 px patches, hidden
  96, 2 layers), mean of its patch states;
- ``conv``: the preset's convolutional encoder (``icsd.sandbox.vision``), mean of its grid states.

    python benchmarks/sandbox_kind_probe.py                 # 3000 images, 600 steps, batch 32
    python benchmarks/sandbox_kind_probe.py --steps 1200 --encoders conv

Prints the score every 200 steps and the final ratio conv / vit.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from icsd.sandbox.draw import CAMERA, draw_scene
from icsd.sandbox.lexicon import KINDS
from icsd.sandbox.world import random_scene

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)  # what clip_image_processor normalises with
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def camera_images(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    index = {k: i for i, k in enumerate(KINDS)}
    images, labels = [], []
    for i in range(n):
        scene = random_scene(rng)
        images.append(draw_scene(scene.background, list(scene.objects), size=size, seed=seed * 1_000_003 + i, style=CAMERA))
        y = np.zeros(len(KINDS), np.float32)
        y[[index[o.kind] for o in scene.objects]] = 1
        labels.append(y)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD, torch.tensor(np.stack(labels))


class Probe(nn.Module):
    def __init__(self, encoder: nn.Module, width: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, len(KINDS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixel_values=x).last_hidden_state.mean(1))  # type: ignore[no-any-return]


def build(name: str, size: int) -> Probe:
    if name == "vit":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(
            image_size=size, patch_size=8, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4
        )
        return Probe(CLIPVisionModel(config), 96)
    from icsd.sandbox.captioner import VISION
    from icsd.sandbox.vision import SandboxVisionConfig, SandboxVisionModel

    return Probe(SandboxVisionModel(SandboxVisionConfig(image_size=size, **VISION)), VISION["hidden_size"])


def top_n_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        scores = model(x)
    model.train()
    hits = sum(int(yi[si.topk(int(yi.sum())).indices].sum()) for si, yi in zip(scores, y, strict=True))
    return hits / float(y.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000, help="training images (camera, random scenes)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--encoders", nargs="+", default=["vit", "conv"], choices=["vit", "conv"])
    args = ap.parse_args()

    t0 = time.perf_counter()
    x_train, y_train = camera_images(args.images, 1, args.size)
    x_test, y_test = camera_images(400, 2, args.size)
    chance = float(y_test.sum(1).mean()) / len(KINDS)
    print(f"data: {args.images} train / 400 test camera images in {time.perf_counter() - t0:.0f}s; chance {chance:.3f}")
    final: dict[str, float] = {}
    for name in args.encoders:
        torch.manual_seed(0)
        model = build(name, args.size)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(x_train), (args.batch_size,), generator=g)
            loss = F.binary_cross_entropy_with_logits(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 200 == 0 or step == args.steps:
                final[name] = top_n_share(model, x_test, y_test)
                print(
                    f"{name:>4} ({params / 1e3:.0f}k params) step {step}: kinds found {final[name]:.3f} "
                    f"(chance {chance:.3f}) {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
    if {"vit", "conv"} <= final.keys():
        print(f"conv / vit: {final['conv'] / final['vit']:.2f}x kinds found after {args.steps} steps")


if __name__ == "__main__":
    main()
