"""Training data: (image, caption) pairs streamed from webdataset shards.

The data is cut into ``streams``: independent, endless sequences of samples, each drawing whole
shards at random (``ResampledShards``, so uneven shards never leave a rank or worker waiting),
shuffling them in a buffer and cutting them into stream-batches. The global batch of a step is one
stream-batch from every stream; rank ``r`` of ``R`` owns streams ``r*S/R ... (r+1)*S/R - 1`` and
splits them among its data workers. Because every stream's content depends only on
(seed, epoch, stream), the same global batch comes out whether one process reads all the
streams or several ranks read a share each, and a resumed run skips exactly the batches it had
consumed (before decoding them). ``with_epoch`` bounds each stream to one epoch's batches.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .augment import augment, center_square, sample_seed

log = logging.getLogger(__name__)

IMAGE_MEMBERS: tuple[str, ...] = ("jpg", "jpeg", "webp", "png")


@dataclass(frozen=True)
class StreamPlan:
    """Everything a data worker needs to rebuild its streams (picklable)."""

    urls: tuple[str, ...]
    captions: dict[str, list[str]]
    seed: int
    streams: int
    world: int
    stream_batch: int
    shuffle_buffer: int
    image_size: int
    augment: bool
    crop_scale_min: float
    features: bool

    @property
    def streams_per_rank(self) -> int:
        return self.streams // self.world

    @property
    def rank_batch(self) -> int:
        return self.stream_batch * self.streams_per_rank


def plan_streams(streams: int | None, world: int, num_workers: int, rank_batch: int) -> tuple[int, int, int]:
    """(streams, stream batch, data workers per rank) for a per-rank batch.

    By default every data worker of every rank reads one stream. ``streams`` fixes the global
    number instead (keep it when the number of ranks changes to keep the same global batches).
    """
    total = streams if streams is not None else world * max(1, num_workers)
    if total % world:
        raise ValueError(f"{total} data streams cannot be split evenly over {world} ranks")
    per_rank = total // world
    if rank_batch % per_rank:
        raise ValueError(f"batch size {rank_batch} per rank is not a multiple of its {per_rank} data streams")
    workers = max((w for w in range(1, min(num_workers, per_rank) + 1) if per_rank % w == 0), default=0)
    return total, rank_batch // per_rank, workers if num_workers else 0


def expand_pairs(samples: Iterator[dict[str, Any]], captions: dict[str, list[str]], features: bool) -> Iterator[dict[str, Any]]:
    """One item per (image, caption) pair of the training set; other samples are passed over."""
    for sample in samples:
        texts = captions.get(sample.get("__key__", ""))
        if not texts:
            continue
        if features:
            data = sample.get("npy")
        else:
            data = next((sample[m] for m in IMAGE_MEMBERS if m in sample), None)
        if data is None:
            continue
        for text in texts:
            yield {"key": sample["__key__"], "data": data, "caption": text}


def number_and_skip(items: Iterator[dict[str, Any]], skip: int) -> Iterator[dict[str, Any]]:
    """Attach each item's position in its stream and drop the first ``skip`` (already trained on)."""
    for position, item in enumerate(items):
        if position >= skip:
            yield {**item, "position": position}


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode to RGB; with ``min_side``, JPEGs decode at the smallest DCT scale keeping both sides >= it."""
    with Image.open(io.BytesIO(data)) as im:
        if min_side is not None:
            im.draft("RGB", (min_side, min_side))
        return im.convert("RGB")


def decode_features(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


class PairStreams(IterableDataset):
    """The micro-batches of one rank for one epoch: each item is one stream-batch from every
    stream the calling data worker owns, concatenated (``{"images", "captions", "keys"}``)."""

    def __init__(self, plan: StreamPlan, rank: int, normalize: Callable[[list[Image.Image]], torch.Tensor]) -> None:
        super().__init__()
        self.plan = plan
        self.rank = rank
        self.normalize = normalize
        self.epoch = 0
        self.skip_batches = 0
        self.batches = 0

    def set_epoch(self, epoch: int, batches: int, skip_batches: int = 0) -> None:
        """Next iteration yields batches ``skip_batches .. batches-1`` of ``epoch`` per stream."""
        self.epoch, self.batches, self.skip_batches = epoch, batches, skip_batches

    def owned_streams(self) -> list[int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_rank = self.plan.streams_per_rank
        local = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        return [s for i, s in enumerate(local) if i % workers == worker]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        remaining = self.batches - self.skip_batches
        if remaining <= 0:
            return
        pipes = [iter(self.stream(s, remaining)) for s in self.owned_streams()]
        for _ in range(remaining):
            parts = [next(p) for p in pipes]
            yield {
                "images": torch.cat([p["images"] for p in parts]),
                "captions": [c for p in parts for c in p["captions"]],
                "keys": [k for p in parts for k in p["keys"]],
            }

    def stream(self, stream: int, batches: int) -> wds.DataPipeline:
        plan, epoch = self.plan, self.epoch
        shard_seed = sample_seed(plan.seed, epoch, stream, 0) & 0x7FFFFFFF
        return wds.DataPipeline(
            wds.ResampledShards(list(plan.urls), seed=shard_seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.pipelinefilter(expand_pairs)(plan.captions, plan.features),
            wds.shuffle(plan.shuffle_buffer, min(100, plan.shuffle_buffer), rng=random.Random(sample_seed(plan.seed, epoch, stream, 1))),
            wds.pipelinefilter(number_and_skip)(self.skip_batches * plan.stream_batch),
            wds.map(lambda item: self.decode(item, stream), handler=wds.warn_and_continue),
            wds.batched(plan.stream_batch, collation_fn=self.collate, partial=False),
        ).with_epoch(nbatches=batches)

    def decode(self, item: dict[str, Any], stream: int) -> dict[str, Any]:
        plan = self.plan
        if plan.features:
            value: Any = decode_features(item["data"])
        else:
            image = decode_image(item["data"], self.decode_side())
            if plan.augment:
                rng = random.Random(sample_seed(plan.seed, self.epoch, stream, item["position"], 2))
                value = augment(image, plan.image_size, rng, plan.crop_scale_min)
            else:
                value = center_square(image, plan.image_size)
        return {"value": value, "caption": item["caption"], "key": item["key"]}

    def decode_side(self) -> int:
        """The smallest source side that still fills the smallest crop without upscaling."""
        plan = self.plan
        return math.ceil(plan.image_size / math.sqrt(plan.crop_scale_min)) if plan.augment else plan.image_size

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        values = [it["value"] for it in items]
        images = torch.stack(values) if self.plan.features else self.normalize(values)
        return {"images": images, "captions": [it["caption"] for it in items], "keys": [it["key"] for it in items]}


def processor_normalizer(image_processor: Any) -> Callable[[list[Image.Image]], torch.Tensor]:
    """Rescale + normalise already-cropped images with the model's transformers image processor."""

    def normalize(images: list[Image.Image]) -> torch.Tensor:
        out = image_processor(images, do_resize=False, do_center_crop=False, return_tensors="pt")
        return out["pixel_values"]

    return normalize
