"""Evaluation references, read from files the user gives (nothing is downloaded).

Formats:

- Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``): ``images`` with ``split``,
  ``filepath``/``filename``, ``cocoid`` (COCO) and ``sentences[].raw``. Image ids are COCO's
  ``cocoid``; for Flickr30k, the file name's stem (``1000092795``).
- NoCaps validation (``nocaps_val_4500_captions.json``): COCO-style, each image with a ``domain``
  (in-domain, near-domain, out-domain); scored per domain and overall.
- COCO caption annotations (``captions_val2017.json``, ...): ``images`` + ``annotations``.

Predictions are COCO results JSON: ``[{"image_id": ..., "caption": ...}, ...]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

Format = Literal["karpathy", "nocaps", "coco"]
NOCAPS_DOMAINS: tuple[str, ...] = ("in-domain", "near-domain", "out-domain")


@dataclass(frozen=True)
class BenchmarkSpec:
    format: Format
    split: str | None = None
    dataset: str | None = None
    expected_images: int | None = None


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "coco-karpathy-test": BenchmarkSpec("karpathy", "test", "coco", 5000),
    "coco-karpathy-val": BenchmarkSpec("karpathy", "val", "coco", 5000),
    "flickr30k-karpathy-test": BenchmarkSpec("karpathy", "test", "flickr30k", 1000),
    "flickr30k-karpathy-val": BenchmarkSpec("karpathy", "val", "flickr30k", 1014),
    "nocaps-val": BenchmarkSpec("nocaps", None, None, 4500),
    "coco-captions": BenchmarkSpec("coco"),
}


@dataclass(frozen=True)
class RefImage:
    """One image to caption: its id as a string (the matching key), the id as the file has it
    (written back into predictions.json), its file path relative to the images folder, its
    reference captions and, for NoCaps, its domain."""

    key: str
    image_id: int | str
    file: str | None
    captions: tuple[str, ...]
    domain: str | None = None


@dataclass(frozen=True)
class References:
    name: str
    path: Path
    format: Format
    split: str | None
    images: tuple[RefImage, ...]

    def captions(self) -> dict[str, list[str]]:
        """``{key: [caption, ...]}`` in file order (the evaluation order)."""
        return {im.key: list(im.captions) for im in self.images}

    def domains(self) -> dict[str, list[str]]:
        """NoCaps: ``{domain: [key, ...]}`` in the standard domain order; empty for other formats."""
        out: dict[str, list[str]] = {}
        for domain in NOCAPS_DOMAINS:
            keys = [im.key for im in self.images if im.domain == domain]
            if keys:
                out[domain] = keys
        return out

    @property
    def n_captions(self) -> int:
        return sum(len(im.captions) for im in self.images)


# ----------------------------------------------------------------------------- reading


def read_json_file(path: str | Path, what: str) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} is not valid JSON ({p}): {exc}") from None


def detect_format(data: Any, path: Path) -> Format:
    """karpathy (images with sentences), nocaps (COCO-style with image domains) or coco."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(
            f"{path} is not a caption annotation file: expected a JSON object with 'images' "
            "(Karpathy split, NoCaps or COCO captions format)"
        )
    images = data["images"]
    if images and isinstance(images[0], dict) and "sentences" in images[0]:
        return "karpathy"
    if "annotations" not in data:
        raise UserError(f"{path} has 'images' but neither 'sentences' (Karpathy) nor 'annotations' (COCO)")
    if any(isinstance(im, dict) and "domain" in im for im in images[:50]):
        return "nocaps"
    return "coco"


def _id_key(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise UserError(f"{where}: image id must be an integer or a non-empty string, got {value!r}")
    return str(value)


def _karpathy_image_id(im: dict[str, Any], dataset: str) -> int | str:
    if "cocoid" in im:
        return int(im["cocoid"])
    filename = str(im.get("filename", ""))
    stem = filename.rsplit(".", 1)[0]
    if dataset != "coco" and stem:
        return int(stem) if stem.isdigit() else stem
    if "imgid" in im:
        return int(im["imgid"])
    raise UserError(f"Karpathy image without cocoid, filename or imgid: {str(im)[:120]}")


def load_karpathy(path: str | Path, split: str = "test", data: Any = None) -> tuple[str, list[RefImage]]:
    """``(dataset name, images of ``split``)`` from a Karpathy split file (``restval`` counts as its own split)."""
    p = Path(path)
    data = read_json_file(p, "Karpathy split file") if data is None else data
    dataset = str(data.get("dataset") or p.stem.removeprefix("dataset_"))
    images = []
    splits_seen: set[str] = set()
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise UserError(f"{p}: images[{n}] is not an object")
        splits_seen.add(str(im.get("split")))
        if im.get("split") != split:
            continue
        sentences = im.get("sentences") or []
        captions = tuple(str(s["raw"]) for s in sentences if isinstance(s, dict) and "raw" in s)
        image_id = _karpathy_image_id(im, dataset)
        filepath, filename = im.get("filepath"), im.get("filename")
        file = "/".join(x for x in (filepath, filename) if x) or None
        images.append(
            RefImage(key=_id_key(image_id, str(p)), image_id=image_id, file=file, captions=captions)
        )
    if not images:
        raise UserError(
            f"{p} has no images in split {split!r} (splits there: {', '.join(sorted(splits_seen))})"
        )
    return dataset, images


def _coco_images(p: Path, data: dict[str, Any], what: str) -> list[RefImage]:
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise UserError(f"{p}: 'annotations' must be a list")
    by_image: dict[str, list[str]] = {}
    for n, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise UserError(f"{p}: annotations[{n}] needs 'image_id' and 'caption'")
        by_image.setdefault(_id_key(a["image_id"], str(p)), []).append(str(a["caption"]))
    images: list[RefImage] = []
    seen: set[str] = set()
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise UserError(f"{p}: images[{n}] needs an 'id'")
        key = _id_key(im["id"], str(p))
        if key in seen:
            raise UserError(f"{p}: image id {im['id']!r} is listed twice")
        seen.add(key)
        domain = im.get("domain")
        images.append(
            RefImage(
                key=key,
                image_id=im["id"],
                file=im.get("file_name"),
                captions=tuple(by_image.get(key, ())),
                domain=str(domain) if domain is not None else None,
            )
        )
    unknown = set(by_image) - seen
    if unknown:
        raise UserError(
            f"{p}: {len(unknown)} {what} annotations refer to images not in 'images' (e.g. {sorted(unknown)[:3]})"
        )
    return images


def load_coco_captions(path: str | Path, data: Any = None) -> list[RefImage]:
    p = Path(path)
    data = read_json_file(p, "COCO caption file") if data is None else data
    return _coco_images(p, data, "caption")


def load_nocaps(path: str | Path, data: Any = None) -> list[RefImage]:
    p = Path(path)
    data = read_json_file(p, "NoCaps file") if data is None else data
    images = _coco_images(p, data, "NoCaps")
    bad = sorted({im.domain for im in images if im.domain not in NOCAPS_DOMAINS}, key=str)
    if bad:
        raise UserError(f"{p}: unknown NoCaps domain(s) {bad}; expected {', '.join(NOCAPS_DOMAINS)}")
    return images


def load_references(path: str | Path, *, benchmark: str | None = None, split: str = "test") -> References:
    """The references of a benchmark file; ``benchmark`` (a name in :data:`BENCHMARKS`) checks the
    file's format and fixes the split; without it the format is detected and the name derived."""
    p = Path(path).expanduser()
    spec = None
    if benchmark is not None:
        spec = BENCHMARKS.get(benchmark)
        if spec is None:
            raise UserError(f"unknown benchmark {benchmark!r}: choose from {', '.join(BENCHMARKS)}")
    data = read_json_file(p, "references file")
    fmt = detect_format(data, p)
    if spec is not None and spec.format != fmt:
        raise UserError(f"benchmark {benchmark} needs a {spec.format} file, but {p} is in {fmt} format")
    if fmt == "karpathy":
        use_split = spec.split if spec is not None and spec.split else split
        dataset, images = load_karpathy(p, use_split, data)
        if spec is not None and spec.dataset and dataset != spec.dataset:
            raise UserError(
                f"benchmark {benchmark} needs the {spec.dataset} Karpathy file, but {p} is {dataset!r}"
            )
        name = benchmark or f"{dataset}-karpathy-{use_split}"
        return References(name=name, path=p, format=fmt, split=use_split, images=tuple(images))
    if fmt == "nocaps":
        return References(name=benchmark or "nocaps-val", path=p, format=fmt, split="val",
                          images=tuple(load_nocaps(p, data)))  # fmt: skip
    return References(
        name=benchmark or p.stem, path=p, format=fmt, split=None, images=tuple(load_coco_captions(p, data))
    )


def count_note(refs: References) -> str | None:
    """A one-line note when a named benchmark's image count differs from the standard one."""
    spec = BENCHMARKS.get(refs.name)
    if spec is None or spec.expected_images is None:
        return None
    n = sum(1 for im in refs.images if im.captions)
    if n == spec.expected_images:
        return None
    return f"note: {refs.name} usually has {spec.expected_images} images; {refs.path.name} gives {n}"


# ----------------------------------------------------------------------------- predictions


def load_predictions(path: str | Path) -> dict[str, tuple[int | str, str]]:
    """COCO results JSON -> ``{key: (image_id, caption)}``; also accepts ``{image_id: caption}``."""
    p = Path(path).expanduser()
    data = read_json_file(p, "predictions file")
    rows: Iterable[tuple[Any, Any]]
    if isinstance(data, dict):
        rows = data.items()
    elif isinstance(data, list):
        pairs = []
        for n, item in enumerate(data):
            if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
                raise UserError(f"{p}: item {n} needs 'image_id' and 'caption' (COCO results format)")
            pairs.append((item["image_id"], item["caption"]))
        rows = pairs
    else:
        raise UserError(f"{p}: predictions must be a list of {{image_id, caption}} objects")
    out: dict[str, tuple[int | str, str]] = {}
    for image_id, caption in rows:
        key = _id_key(image_id, str(p))
        if not isinstance(caption, str):
            raise UserError(f"{p}: caption for image {image_id!r} is not a string")
        if key in out:
            raise UserError(f"{p}: image {image_id!r} has more than one prediction")
        out[key] = (image_id, caption)
    if not out:
        raise UserError(f"{p} holds no predictions")
    return out


def predictions_json(refs: References, captions: dict[str, str]) -> list[dict[str, Any]]:
    """COCO results format in reference order, with the ids as the references file has them."""
    return [
        {"image_id": im.image_id, "caption": captions[im.key]} for im in refs.images if im.key in captions
    ]
