"""The validation split that picks the best checkpoint, and its scores (CIDEr + BLEU-4).

Either a held-out split the user gives (an image folder plus COCO, Karpathy (split ``val``) or
JSON-lines captions, read by :mod:`icsd.formats`, so its image ids are the ones ingest and
evaluate give) or, for a strictly synthetic run, a held-out share of the synthetic images with
their pair captions. Never the test split. Images are captioned by :func:`icsd.caption.caption_batched`:
an image that cannot be read is skipped, counted and noted. Scores come from pycocoevalcap's Bleu
and Cider scorers on lower-cased, punctuation-stripped text, on pycocoevalcap's 0-1 scale.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..caption import Captioned, caption_batched
from ..errors import UserError
from ..formats import load_reference_file
from ..images import to_rgb
from ..metrics import SCALE_LABEL, format_score
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


def load_user_split(images_dir: str, captions_file: str, limit: int | None) -> ValSet:
    """The images of ``images_dir`` that the captions file names (matched on the file name), by image id."""
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"validation image folder not found: {folder}")
    _, _, images = load_reference_file(captions_file, split="val")
    files = {p.name: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
    found = sorted(
        (im.key, files[Path(im.file).name], list(im.captions))
        for im in images
        if im.file and im.captions and Path(im.file).name in files
    )[:limit]
    if not found:
        raise UserError(f"no image in {folder} has captions in {captions_file}")
    return ValSet(
        source=f"user split {folder}",
        ids=[key for key, _, _ in found],
        images=[path for _, path, _ in found],
        refs=[refs for _, _, refs in found],
    )


# ----------------------------------------------------------------------------- held-out synthetic


def holdout_keys(keys: Iterable[str], fraction: float, limit: int | None) -> set[str]:
    """A fixed pseudo-random share of the image keys (at least one, never all), by key hash."""
    keys = sorted(set(keys))
    if fraction <= 0 or len(keys) < 2:
        return set()
    n = min(max(1, math.ceil(fraction * len(keys))), limit or len(keys), len(keys) - 1)
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


def caption_valset(
    captioner: Any,
    valset: ValSet,
    indices: Sequence[int],
    *,
    beams: int,
    min_new_tokens: int,
    max_new_tokens: int,
    batch_size: int = 32,
    lengths: str = "new",
) -> Captioned[int]:
    """Caption the validation items ``indices``; unreadable images are skipped and counted."""
    return caption_batched(
        captioner,
        indices,
        valset.load,
        beams=beams,
        min_new_tokens=min_new_tokens,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        lengths=lengths,
    )


def validation_line(step: int, scores: dict[str, float]) -> str:
    """The line a person reads after each validation (scores on pycocoevalcap's 0-1 scale)."""
    shown = " ".join(f"{k} {format_score(scores[k])}" for k in ("CIDEr", "BLEU-4", "score") if k in scores)
    skipped = int(scores.get("unreadable", 0))
    tail = f", {skipped} unreadable image(s) skipped" if skipped else ""
    return f"step {step}: validation ({SCALE_LABEL}) {shown} on {int(scores.get('images', 0))} images{tail}"


# ----------------------------------------------------------------------------- scores


def simple_tokens(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def ptb_tokenized(predictions: list[str], references: list[list[str]]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(references, predictions) through pycocoevalcap's PTB tokenizer, as COCOEvalCap scores them."""
    from ..jvm import ptb_tokenize

    gts = ptb_tokenize(dict(enumerate(references)))
    res = ptb_tokenize({i: [p] for i, p in enumerate(predictions)})
    return gts, res


def caption_scores(predictions: list[str], references: list[list[str]], tokenizer: str = "simple") -> dict[str, float]:
    """BLEU-1..4 and CIDEr of predictions against their references, and CIDEr + BLEU-4.

    ``tokenizer`` ``ptb`` tokenises as COCOEvalCap does (the official selection); ``simple``
    lower-cases and strips punctuation in Python (no Java process)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        raise ValueError("no predictions to score")
    if tokenizer == "ptb":
        gts, res = ptb_tokenized(predictions, references)
        res = {i: [r[0] or "empty"] for i, r in res.items()}
    else:
        res = {i: [simple_tokens(p) or "empty"] for i, p in enumerate(predictions)}
        gts = {i: [simple_tokens(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["CIDEr"] = float(cider)
    scores["score"] = scores["CIDEr"] + scores["BLEU-4"]
    return scores
