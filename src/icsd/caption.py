"""Caption image files with a trained checkpoint (`icsd caption`).

Inputs are files, globs or folders. Files that are missing, corrupt or not images are reported
and skipped; the rest are captioned in batches. Output is JSON lines (``{"image", "caption"}``) or
the COCO results format (``[{"image_id", "caption"}]``), to a file or to stdout.
"""

from __future__ import annotations

import glob
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .errors import UserError
from .images import to_rgb
from .store import atomic_write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
OutputFormat = Literal["jsonl", "coco"]


@dataclass
class CaptionRun:
    captions: list[tuple[Path, str]]
    skipped: list[tuple[str, str]]
    seconds: float
    output: Path | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        where = f" -> {self.output}" if self.output else ""
        return f"caption: {len(self.captions)} images captioned, {len(self.skipped)} skipped in {self.seconds:.1f}s{where}"


def collect_images(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image paths from files, globs and folders (folders: image files inside, recursively)."""
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                missing.append((item, "no file matches this pattern"))
            found += matches
        else:
            missing.append((item, "file not found"))
    unique = list(dict.fromkeys(found))
    return unique, missing


def open_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def coco_image_id(path: Path) -> int | str:
    """COCO-style ids: the trailing digits of the file name (``COCO_val2014_000000391895.jpg`` -> 391895)."""
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else path.stem


def format_output(captions: list[tuple[Path, str]], fmt: OutputFormat) -> str:
    if fmt == "coco":
        return json.dumps([{"image_id": coco_image_id(p), "caption": c} for p, c in captions], indent=1) + "\n"
    return "".join(json.dumps({"image": str(p), "caption": c}) + "\n" for p, c in captions)


def caption_files(
    model: str,
    inputs: list[str],
    *,
    beams: int = 3,
    min_new_tokens: int = 5,
    max_new_tokens: int = 30,
    batch_size: int = 32,
    device: str = "auto",
    fmt: OutputFormat = "jsonl",
    out: Path | None = None,
    stdout: IO[str] | None = None,
    report: Callable[[str], None] | None = None,
) -> CaptionRun:
    """Caption every readable image among ``inputs``; write the results to ``out`` or stdout."""
    from .backends.captioners import load_captioner

    start = time.perf_counter()
    if fmt not in ("jsonl", "coco"):
        raise UserError(f"unknown output format {fmt!r}: use jsonl or coco")
    if not inputs:
        raise UserError("give at least one image file, glob or folder")
    say = report or (lambda msg: print(msg, file=sys.stderr))
    paths, skipped = collect_images(inputs)
    for name, reason in skipped:
        say(f"skipped {name}: {reason}")
    if not paths:
        raise UserError("no image files found in the given inputs")
    captioner = load_captioner(model, device)
    captions: list[tuple[Path, str]] = []
    bar = tqdm(total=len(paths), desc="caption", unit="img", disable=None, file=sys.stderr)
    try:
        for i in range(0, len(paths), batch_size):
            batch: list[tuple[Path, Image.Image]] = []
            for p in paths[i : i + batch_size]:
                try:
                    batch.append((p, open_image(p)))
                except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
                    reason = "not an image or corrupt" if isinstance(exc, UnidentifiedImageError) else str(exc)
                    skipped.append((str(p), reason))
                    say(f"skipped {p}: {reason}")
            if batch:
                texts = captioner.caption(
                    [im for _, im in batch],
                    beams=beams,
                    min_new_tokens=min_new_tokens,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                )
                captions += [(p, t) for (p, _), t in zip(batch, texts, strict=True)]
            bar.update(len(paths[i : i + batch_size]))
    finally:
        bar.close()
    if not captions:
        raise UserError(f"none of the {len(paths)} files could be read as an image")
    text = format_output(captions, fmt)
    if out is not None:
        atomic_write_text(out, text)
    else:
        (stdout or sys.stdout).write(text)
    return CaptionRun(captions, skipped, time.perf_counter() - start, out)
