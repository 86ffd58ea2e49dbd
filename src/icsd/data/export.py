"""``icsd export``: a run's image-caption pairs as people in the field share them.

- ``hf``: a Hugging Face dataset folder: ``data/train-%05d-of-%05d.parquet`` shards (one row per
  pair: the image bytes, the caption, and the group id, summary, selected captions, seed and
  model of its image) and a dataset card ``README.md`` whose YAML front matter declares the files
  and features, so ``datasets.load_dataset(FOLDER)`` reads it and ``huggingface-cli upload``
  pushes it unchanged.
- ``webdataset``: ``shard-%05d.tar`` with one sample per image (``.jpg``/``.webp``/``.png``, ``.txt``
  with its captions one a line, ``.json`` with the rest).

Streams the run's image shards one at a time: memory holds one input shard and one output shard,
never the whole set. The folder is written under ``.OUT.partial`` and renamed when complete.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..records import ImageSample
from ..store import RunDir, done_shards, iter_shard_samples, read_parquet
from .recipe import Recipe, read_recipe

# the Hugging Face `datasets` features of a row (also written into each parquet file's metadata)
FEATURES: dict[str, Any] = {
    "image": {"_type": "Image"},
    "caption": {"dtype": "string", "_type": "Value"},
    "kind": {"dtype": "string", "_type": "Value"},
    "group_id": {"dtype": "string", "_type": "Value"},
    "summary": {"dtype": "string", "_type": "Value"},
    "selected_captions": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
    "seed": {"dtype": "int64", "_type": "Value"},
    "image_model": {"dtype": "string", "_type": "Value"},
    "llm_model": {"dtype": "string", "_type": "Value"},
}
SCHEMA = pa.schema(
    [
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("caption", pa.string()),
        ("kind", pa.string()),
        ("group_id", pa.string()),
        ("summary", pa.string()),
        ("selected_captions", pa.list_(pa.string())),
        ("seed", pa.int64()),
        ("image_model", pa.string()),
        ("llm_model", pa.string()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})},
)


@dataclass(frozen=True)
class Exported:
    out: Path
    pairs: int
    images: int
    shards: int


class SelectionIndex:
    """Per image key: the LLM's selected captions (their text) and model, from the run's tables."""

    def __init__(self, run: RunDir) -> None:
        self.selected: dict[str, list[str]] = {}
        self.model: dict[str, str] = {}
        if not run.selections.exists():
            return
        texts = {}
        if run.captions.exists():
            captions = read_parquet(run.captions, "captions.parquet").select(["caption_id", "text"])
            texts = dict(zip(captions.column(0).to_pylist(), captions.column(1).to_pylist(), strict=True))
        table = read_parquet(run.selections, "selections.parquet").select(["group_id", "selected_ids", "model"])
        for gid, ids, model in zip(*(table.column(i).to_pylist() for i in range(3)), strict=True):
            self.selected[gid] = [texts.get(i, "") for i in ids or []]
            self.model[gid] = model or ""


def pairs_by_shard(run: RunDir) -> dict[str, list[tuple[str, str, str]]]:
    """``{shard: [(image_key, caption, kind)]}`` in the order of pairs.parquet."""
    if not run.pairs.exists():
        raise UserError(f"no pairs in {run.root}: run `icsd pairs --run {run.root}` first")
    table = read_parquet(run.pairs, "pairs.parquet").select(["image_key", "shard", "caption", "kind"])
    out: dict[str, list[tuple[str, str, str]]] = {}
    for key, shard, caption, kind in zip(*(table.column(i).to_pylist() for i in range(4)), strict=True):
        out.setdefault(shard, []).append((key, caption, kind))
    return out


def samples_with_pairs(run: RunDir) -> Iterator[tuple[ImageSample, list[tuple[str, str]]]]:
    """Every image that has pairs, with its (caption, kind) pairs, one input shard at a time."""
    by_shard = pairs_by_shard(run)
    shards, _ = done_shards(run.images)
    names = {s.name: s for s in shards}
    missing = [s for s in by_shard if s not in names]
    if missing:
        raise UserError(f"pairs.parquet names image shard {missing[0]}, which is not a finished shard of {run.images}")
    for name in sorted(by_shard):
        wanted: dict[str, list[tuple[str, str]]] = {}
        for key, caption, kind in by_shard[name]:
            wanted.setdefault(key, []).append((caption, kind))
        for sample in iter_shard_samples(names[name]):
            if sample.key in wanted and sample.image is not None:
                yield sample, wanted.pop(sample.key)
        if wanted:
            raise UserError(f"image {next(iter(wanted))} of pairs.parquet is not in {names[name]}")


def hf_rows(run: RunDir) -> Iterator[tuple[dict[str, Any], bool]]:
    """One row per pair; the flag is True on an image's first row."""
    index = SelectionIndex(run)
    for sample, pairs in samples_with_pairs(run):
        meta = sample.meta
        for i, (caption, kind) in enumerate(pairs):
            yield {
                "image": {"bytes": sample.image, "path": f"{sample.key}.{sample.image_ext}"},
                "caption": caption,
                "kind": kind,
                "group_id": meta.id,
                "summary": meta.summary,
                "selected_captions": index.selected.get(meta.id, []),
                "seed": int(meta.seed),
                "image_model": meta.model,
                "llm_model": index.model.get(meta.id, ""),
            }, i == 0


def _fresh(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty: give a new folder")
    staged = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def _bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="export", unit="pair", dynamic_ncols=True, file=sys.stderr, disable=None)


def write_hf(run: RunDir, staged: Path, shard_rows: int, total: int) -> tuple[int, int, int]:
    n_shards = max(1, math.ceil(total / shard_rows))
    (staged / "data").mkdir()
    rows: list[dict[str, Any]] = []
    written = images = shard = 0

    def flush() -> None:
        nonlocal shard
        name = f"train-{shard:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), staged / "data" / name, compression="zstd",
                       row_group_size=min(len(rows), 1000))  # fmt: skip
        shard += 1
        rows.clear()

    with _bar(total) as bar:
        for row, first in hf_rows(run):
            rows.append(row)
            images += first
            written += 1
            bar.update(1)
            if len(rows) == shard_rows:
                flush()
        if rows or shard == 0:
            flush()
    return written, images, shard


def write_webdataset(run: RunDir, staged: Path, shard_rows: int, total: int) -> tuple[int, int, int]:
    index = SelectionIndex(run)
    written = images = shard = in_shard = 0
    tar: tarfile.TarFile | None = None

    def add(name: str, data: bytes) -> None:
        assert tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

    with _bar(total) as bar:
        try:
            for sample, pairs in samples_with_pairs(run):
                if tar is None or in_shard >= shard_rows:
                    if tar is not None:
                        tar.close()
                    tar = tarfile.open(staged / f"shard-{shard:05d}.tar", "w")
                    shard += 1
                    in_shard = 0
                meta = sample.meta
                captions = [c for c, _ in pairs]
                doc = {"captions": captions, "kinds": [k for _, k in pairs], "group_id": meta.id,
                       "summary": meta.summary, "selected_captions": index.selected.get(meta.id, []),
                       "seed": meta.seed, "image_model": meta.model, "llm_model": index.model.get(meta.id, "")}  # fmt: skip
                add(f"{sample.key}.{sample.image_ext}", sample.image or b"")
                add(f"{sample.key}.txt", "\n".join(captions).encode("utf-8"))
                add(f"{sample.key}.json", json.dumps(doc, ensure_ascii=False).encode("utf-8"))
                in_shard += len(pairs)
                written += len(pairs)
                images += 1
                bar.update(len(pairs))
        finally:
            if tar is not None:
                tar.close()
    return written, images, shard


def export(run_dir: Path, out: Path, *, fmt: str = "hf", shard_rows: int = 10_000) -> Exported:
    from .cards import dataset_card

    if not run_dir.is_dir():
        raise UserError(f"no run at {run_dir}")
    run = RunDir.at(run_dir, create=False)
    total = read_parquet(run.pairs, "pairs.parquet").num_rows if run.pairs.exists() else 0
    if total == 0:
        raise UserError(f"no pairs in {run.root}: run `icsd pairs --run {run.root}` first")
    staged = _fresh(out)
    try:
        writer = write_hf if fmt == "hf" else write_webdataset
        pairs, images, shards = writer(run, staged, shard_rows, total)
        recipe: Recipe = read_recipe(run.root)
        card = dataset_card(recipe, run.root, pairs=pairs, images=images, fmt=fmt)
        (staged / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            out.rmdir()
        staged.rename(out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return Exported(out, pairs, images, shards)
