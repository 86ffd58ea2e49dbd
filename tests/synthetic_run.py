"""Build run directories the way ingest, summarize and render leave them, from real COCO files.

Shards follow the render contract: ``<key>.jpg`` + ``<key>.json`` per sample, tar renamed into
place when complete, then its done-marker.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

from icsd.records import Caption, SampleMeta, Selection, to_table
from icsd.store import RunDir, atomic_path, mark_done, safe_key, write_parquet


def coco_items(captions_json: Path, images_dir: Path, n: int) -> list[tuple[Path, int, list[str]]]:
    """The first ``n`` COCO test images (sorted by name) with their human captions."""
    data = json.loads(captions_json.read_text())
    by_image: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"].strip())
    out = []
    for path in sorted(images_dir.glob("*.jpg"))[:n]:
        image_id = int(path.stem)
        out.append((path, image_id, by_image[image_id]))
    return out


def sample_meta(item_id: str, prompt: str, source: str = "summary", nsfw: bool | None = False) -> SampleMeta:
    return SampleMeta(
        id=item_id,
        prompt_source=source,
        summary=prompt,
        seed=0,
        model="real-coco-photo",
        scheduler="none",
        steps=0,
        guidance=0.0,
        width=0,
        height=0,
        nsfw=nsfw,
        safety_checker=nsfw is not None,
    )


def write_shard(path: Path, samples: list[tuple[str, bytes, SampleMeta]]) -> None:
    """A webdataset shard of (item_id, jpeg bytes, json meta) samples plus its done-marker."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for item_id, jpg, meta in samples:
            key = safe_key(item_id)
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", meta.to_json())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    mark_done(path, {"count": len(samples)})


def make_summary_run(
    root: Path,
    items: list[tuple[Path, int, list[str]]],
    *,
    shard_size: int = 4,
    nsfw_ids: frozenset[int] = frozenset(),
) -> RunDir:
    """A run whose 'rendered' images are the real photos, one group per image: the group's
    selected captions are that photo's human captions and its summary is the first of them."""
    run = RunDir.at(root)
    captions, selections, samples = [], [], []
    for path, image_id, texts in items:
        ids = [f"{image_id}-{i}" for i in range(len(texts))]
        captions += [Caption(cid, t, "coco", str(image_id), "val") for cid, t in zip(ids, texts, strict=True)]
        group = f"g{image_id}"
        selections.append(Selection(group, "ok", ids, texts[0], None, "test", "h", "{}"))
        samples.append((group, path.read_bytes(), sample_meta(group, texts[0], nsfw=image_id in nsfw_ids)))
    write_parquet(to_table(captions, Caption), run.captions)
    write_parquet(to_table(selections, Selection), run.selections)
    for i in range(0, len(samples), shard_size):
        write_shard(run.images / f"shard-{i // shard_size:05d}.tar", samples[i : i + shard_size])
    return run
