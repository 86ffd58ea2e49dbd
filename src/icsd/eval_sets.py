"""The evaluation sets the captioning papers report on, by name, and how their references load.

A name fixes the file format, the split and the expected image count (a different count is
noted, not refused). The files themselves are read by :mod:`icsd.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .formats import (
    Format,
    References,
    detect_format,
    load_coco_captions,
    load_karpathy,
    load_nocaps,
    read_json_file,
)


@dataclass(frozen=True)
class EvalSetSpec:
    format: Format
    split: str | None = None
    dataset: str | None = None
    expected_images: int | None = None


EVAL_SETS: dict[str, EvalSetSpec] = {
    "coco-karpathy-test": EvalSetSpec("karpathy", "test", "coco", 5000),
    "coco-karpathy-val": EvalSetSpec("karpathy", "val", "coco", 5000),
    "flickr30k-karpathy-test": EvalSetSpec("karpathy", "test", "flickr30k", 1000),
    "flickr30k-karpathy-val": EvalSetSpec("karpathy", "val", "flickr30k", 1014),
    "nocaps-val": EvalSetSpec("nocaps", None, None, 4500),
    "coco-captions": EvalSetSpec("coco"),
    "sandbox-test": EvalSetSpec("coco", None, "sandbox"),  # the sandbox world's benchmarks (docs/sandbox.md)
    "sandbox-val": EvalSetSpec("coco", None, "sandbox"),
}


def load_references(path: str | Path, *, benchmark: str | None = None, split: str = "test") -> References:
    """The references of an evaluation file; ``benchmark`` (a name in :data:`EVAL_SETS`) checks the
    file's format and fixes the split; without it the format is detected and the name derived."""
    p = Path(path).expanduser()
    spec = None
    if benchmark is not None:
        spec = EVAL_SETS.get(benchmark)
        if spec is None:
            raise UserError(f"unknown benchmark {benchmark!r}: choose from {', '.join(EVAL_SETS)}")
    data = read_json_file(p, "references file")
    fmt = detect_format(data, p)
    if fmt == "jsonl":
        raise UserError(
            f"{p} is not a caption annotation file: expected a JSON object with 'images' "
            "(Karpathy split, NoCaps or COCO captions format), not a list"
        )
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
    """A one-line note when a named evaluation set's image count differs from the standard one."""
    spec = EVAL_SETS.get(refs.name)
    if spec is None or spec.expected_images is None:
        return None
    n = sum(1 for im in refs.images if im.captions)
    if n == spec.expected_images:
        return None
    return f"note: {refs.name} usually has {spec.expected_images} images; {refs.path.name} gives {n}"
