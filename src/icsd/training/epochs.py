"""The official data order: every training unit exactly once per epoch, in one global shuffle.

What the paper's code does with ``torch.utils.data.DistributedSampler``: each epoch is a
permutation of all (image, caption) pairs, ``torch.randperm(n)`` seeded with ``seed + epoch``.
The epoch is cut into global micro-batches of ``unit_batch * world`` units; rank ``r`` of ``world``
takes the interleaved slice ``[r::world]`` of each (DistributedSampler's layout), so the global
sequence does not depend on the number of ranks, and a resumed run starts at any micro-batch of
an epoch with the same units and the same augmentations (each a function of seed, epoch and the
unit's position in the epoch).

A unit is one (image, caption) pair, or with ``grouped`` one image with all its captions (the
vision encoder then runs once per image). Images are read by random access into the render
shards (each tar is indexed once: member offsets and sizes), so shards should be on local disk or
a file system that serves random reads well; the ``streams`` order reads shards sequentially.

The last global micro-batch of an epoch is usually short. Every rank must still run each
micro-batch (DDP), so a rank whose share is empty gets one *pad* unit: a real sample whose labels
the trainer masks out of the loss (``pad`` flags). No unit is dropped or visited twice.
"""

from __future__ import annotations

import math
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .augment import augment, center_square, sample_seed

IMAGE_MEMBERS: tuple[str, ...] = ("jpg", "jpeg", "webp", "png")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / extension split

Member = tuple[str, int, int]  # (tar path, data offset, size)


def index_shards(paths: Sequence[str], keys: set[str], features: bool = False) -> dict[str, Member]:
    """Where each wanted key's image (or ``.npy`` features) lies inside the tar shards."""
    wanted = ("npy",) if features else IMAGE_MEMBERS
    found: dict[str, Member] = {}
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                match = _KEY_EXT.match(info.name)
                if not info.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key in keys and ext in wanted and key not in found:
                    found[key] = (path, info.offset_data, info.size)
    return found


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of ``n`` units: DistributedSampler's ``randperm`` with ``seed + epoch``."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).numpy()


def rank_positions(n: int, micro: int, global_batch: int, rank: int, world: int) -> np.ndarray:
    """Epoch positions of rank ``rank``'s share of global micro-batch ``micro`` (may be empty)."""
    start = micro * global_batch
    return np.arange(start, min(start + global_batch, n), dtype=np.int64)[rank::world]


def micro_batches(units: int, unit_batch: int, world: int, accum: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches) of one epoch over ``units``."""
    steps = max(1, math.ceil(units / (unit_batch * world * accum)))
    return steps, steps * accum


@dataclass(frozen=True)
class EpochPlan:
    """Everything a data worker needs to rebuild the official order (picklable)."""

    keys: tuple[str, ...]  # images, sorted
    captions: dict[str, list[str]]
    members: dict[str, Member]
    seed: int
    world: int
    unit_batch: int  # units per rank micro-batch (pairs; images when grouped)
    grouped: bool
    image_size: int
    augment: bool
    crop_scale_min: float
    features: bool

    def units(self) -> np.ndarray:
        """``[n, 2]`` int32: (image index, caption index) per pair, or (image index, -1) per image
        when grouped (arrays, not Python tuples: millions of pairs stay small in every worker)."""
        counts = np.array([len(self.captions[key]) for key in self.keys], dtype=np.int64)
        if self.grouped:
            return np.stack([np.arange(len(self.keys)), np.full(len(self.keys), -1)], axis=1).astype(np.int32)
        images = np.repeat(np.arange(len(self.keys)), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        return np.stack([images, np.arange(len(images)) - starts], axis=1).astype(np.int32)


class OfficialPairs(IterableDataset):
    """One rank's micro-batches of one epoch in the official order.

    With ``W`` DataLoader workers, worker ``w`` yields part ``w`` of every micro-batch (an even
    split); the trainer joins ``W`` consecutive items (:func:`join_parts`) into the micro-batch.
    Items: ``{"images", "captions", "keys", "pad"}`` and, when grouped, ``"image_index"`` (the
    row of ``images`` each caption belongs to).
    """

    def __init__(
        self, plan: EpochPlan, rank: int, normalize: Callable[[list[Image.Image]], torch.Tensor]
    ) -> None:
        super().__init__()
        self.plan = plan
        self.rank = rank
        self.normalize = normalize
        self.units = plan.units()
        self.epoch = 0
        self.batches = 0
        self.skip_batches = 0
        self._files: dict[str, BinaryIO] = {}

    def set_epoch(self, epoch: int, batches: int, skip_batches: int = 0) -> None:
        """Next iteration yields micro-batches ``skip_batches .. batches-1`` of ``epoch``."""
        self.epoch, self.batches, self.skip_batches = epoch, batches, skip_batches

    def positions(self, micro: int) -> tuple[np.ndarray, bool]:
        """This rank's epoch positions for a micro-batch, and whether they are one pad unit."""
        plan = self.plan
        mine = rank_positions(len(self.units), micro, plan.unit_batch * plan.world, self.rank, plan.world)
        if len(mine):
            return mine, False
        return np.zeros(1, dtype=np.int64), True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = epoch_permutation(len(self.units), self.plan.seed, self.epoch)
        try:
            for micro in range(self.skip_batches, self.batches):
                positions, pad = self.positions(micro)
                part = np.array_split(positions, workers)[worker]
                yield self.load(order, part, pad)
        finally:
            for fh in self._files.values():
                fh.close()
            self._files.clear()

    def load(self, order: np.ndarray, positions: np.ndarray, pad: bool) -> dict[str, Any]:
        plan = self.plan
        values: list[Any] = []
        captions: list[str] = []
        keys: list[str] = []
        image_index: list[int] = []
        for position in positions.tolist():
            image, caption = (int(v) for v in self.units[int(order[position])])
            key = plan.keys[image]
            texts = plan.captions[key] if caption < 0 else [plan.captions[key][caption]]
            values.append(self.decode(key, position))
            image_index += [len(values) - 1] * len(texts)
            captions += texts
            keys += [key] * len(texts)
        item: dict[str, Any] = {
            "images": self.collate(values),
            "captions": captions,
            "keys": keys,
            "pad": [pad] * len(captions),
        }
        if plan.grouped:
            item["image_index"] = torch.tensor(image_index, dtype=torch.long)
        return item

    def read(self, key: str) -> bytes:
        path, offset, size = self.plan.members[key]
        fh = self._files.get(path)
        if fh is None:
            fh = self._files[path] = open(path, "rb")  # noqa: SIM115 - kept open for the epoch
        fh.seek(offset)
        return fh.read(size)

    def decode(self, key: str, position: int) -> Any:
        from .data import decode_features, decode_image

        plan, data = self.plan, self.read(key)
        if plan.features:
            return decode_features(data)
        side = (
            math.ceil(plan.image_size / math.sqrt(plan.crop_scale_min)) if plan.augment else plan.image_size
        )
        image = decode_image(data, side)
        if plan.augment:
            rng = random.Random(sample_seed(plan.seed, self.epoch, position, 2))
            return augment(image, plan.image_size, rng, plan.crop_scale_min)
        return center_square(image, plan.image_size)

    def collate(self, values: list[Any]) -> torch.Tensor:
        if not values:
            return torch.empty(0)
        return torch.stack(values) if self.plan.features else self.normalize(values)


def join_parts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One micro-batch from the consecutive items of the data workers (empty parts skipped)."""
    parts = [p for p in parts if p["captions"]] or list(parts[:1])
    if len(parts) == 1:
        return dict(parts[0])
    out: dict[str, Any] = {
        "images": torch.cat([p["images"] for p in parts]),
        "captions": [c for p in parts for c in p["captions"]],
        "keys": [k for p in parts for k in p["keys"]],
    }
    if all("pad" in p for p in parts):
        out["pad"] = [x for p in parts for x in p["pad"]]
    if all("image_index" in p for p in parts):
        offsets = np.cumsum([0] + [len(p["images"]) for p in parts[:-1]])
        out["image_index"] = torch.cat(
            [p["image_index"] + int(o) for p, o in zip(parts, offsets, strict=True)]
        )
    return out
