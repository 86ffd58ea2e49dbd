"""The validation split that picks the best checkpoint, and its scores (CIDEr + BLEU-4).

Either a held-out split the user gives (an image folder plus COCO, Karpathy or JSON-lines
captions) or, for a strictly synthetic run, a held-out share of the synthetic images with their
pair captions. Never the test split. Scores come from pycocoevalcap's Bleu and Cider scorers on
lower-cased, punctuation-stripped text.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..images import to_rgb
from ..store import iter_shard_samples

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class ValSet:
    """Validation images (file paths or encoded bytes) with their reference captions."""

    source: str
    ids: list[str]
    images: list[Path | bytes]
    refs: list[list[str]]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Image.Image:
        item = self.images[index]
        data = item.read_bytes() if isinstance(item, Path) else item
        with Image.open(io.BytesIO(data)) as im:
            return to_rgb(im)


# ----------------------------------------------------------------------------- user split


def read_reference_file(path: Path) -> dict[str, list[str]]:
    """Image file name -> captions, from COCO captions JSON, Karpathy JSON (split 'val') or JSON lines."""
    if not path.is_file():
        raise UserError(f"validation captions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    refs: dict[str, list[str]] = defaultdict(list)
    try:
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    add_jsonl_record(refs, json.loads(line))
            return dict(refs)
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"validation captions file is not valid JSON ({path}): {exc}") from None
    if isinstance(data, dict) and "annotations" in data:
        names = {img["id"]: img["file_name"] for img in data.get("images", [])}
        for ann in data["annotations"]:
            if ann.get("image_id") in names:
                refs[names[ann["image_id"]]].append(str(ann["caption"]))
    elif isinstance(data, dict) and "images" in data:
        for img in data["images"]:
            if img.get("split", "val") == "val":
                refs[img["filename"]].extend(str(s["raw"]) for s in img.get("sentences", []))
    elif isinstance(data, list):
        for record in data:
            add_jsonl_record(refs, record)
    else:
        raise UserError(f"unknown validation captions format in {path}: use COCO, Karpathy JSON or JSON lines")
    return dict(refs)


def add_jsonl_record(refs: dict[str, list[str]], record: Any) -> None:
    if not isinstance(record, dict):
        raise UserError("each validation caption record must be an object with 'image' and 'caption(s)'")
    name = record.get("image") or record.get("file_name") or record.get("filename")
    texts = record.get("captions") or ([record["caption"]] if "caption" in record else [])
    if not name or not texts:
        raise UserError(f"validation caption record lacks an image name or captions: {str(record)[:80]}")
    refs[Path(str(name)).name].extend(str(t) for t in texts)


def load_user_split(images_dir: str, captions_file: str, limit: int) -> ValSet:
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"validation image folder not found: {folder}")
    refs = read_reference_file(Path(captions_file).expanduser())
    files = {p.name: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
    names = sorted(n for n in refs if Path(n).name in files)[:limit]
    if not names:
        raise UserError(f"no image in {folder} has captions in {captions_file}")
    return ValSet(
        source=f"user split {folder}",
        ids=names,
        images=[files[Path(n).name] for n in names],
        refs=[refs[n] for n in names],
    )


# ----------------------------------------------------------------------------- held-out synthetic


def holdout_keys(keys: Iterable[str], fraction: float, limit: int) -> set[str]:
    """A fixed pseudo-random share of the image keys (at least one, never all), by key hash."""
    keys = sorted(set(keys))
    if fraction <= 0 or len(keys) < 2:
        return set()
    n = min(max(1, math.ceil(fraction * len(keys))), limit, len(keys) - 1)
    ordered = sorted(keys, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    return set(ordered[:n])


def load_holdout(images_dir: Path, keys: set[str], refs: dict[str, list[str]], shards: set[str]) -> ValSet:
    """The held-out images read from the render shards that hold them."""
    found: dict[str, bytes] = {}
    for name in sorted(shards):
        for sample in iter_shard_samples(images_dir / name):
            if sample.key in keys and sample.image is not None:
                found[sample.key] = sample.image
    ids = sorted(found)
    return ValSet(source="held-out synthetic pairs", ids=ids, images=[found[k] for k in ids], refs=[refs[k] for k in ids])


def readable(valset: ValSet) -> tuple[ValSet, list[str]]:
    """The items whose image decodes, and the ids of those that do not."""
    keep, bad = [], []
    for i, item_id in enumerate(valset.ids):
        try:
            valset.load(i)
            keep.append(i)
        except (UnidentifiedImageError, OSError, ValueError):
            bad.append(item_id)
    return (
        ValSet(valset.source, [valset.ids[i] for i in keep], [valset.images[i] for i in keep], [valset.refs[i] for i in keep]),
        bad,
    )


# ----------------------------------------------------------------------------- scores


def simple_tokens(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr of predictions against their references, and CIDEr + BLEU-4."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        raise ValueError("no predictions to score")
    res = {i: [simple_tokens(p) or "empty"] for i, p in enumerate(predictions)}
    gts = {i: [simple_tokens(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["CIDEr"] = float(cider)
    scores["score"] = scores["CIDEr"] + scores["BLEU-4"]
    return scores
