"""Caption image files with a trained checkpoint (`icsd caption`).

Inputs are files, globs or folders. Files that are missing, corrupt or not images are reported
and skipped; the rest are captioned in batches. Output is JSON lines (``{"image", "caption"}``) or
the COCO results format (``[{"image_id", "caption"}]``), to a file or to stdout.

:func:`caption_batched` is the one batched captioning loop of icsd (``icsd caption``, ``icsd
evaluate --model`` and the training validation all use it), with one bad-image policy: an image
that cannot be read is skipped (never captioned, never scored), counted, and named in one note.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar

from PIL import Image, UnidentifiedImageError

from .console import progress_bar
from .errors import UserError
from .formats import image_id_from_file
from .images import open_image
from .store import atomic_write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
OutputFormat = Literal["jsonl", "coco"]
T = TypeVar("T")
# What reading a broken, truncated, huge or non-image file raises.
BAD_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    Image.DecompressionBombError,
)


@dataclass
class Captioned(Generic[T]):
    """What :func:`caption_batched` made: ``(item, caption)`` in input order, and the items it
    skipped with the reason."""

    captions: list[tuple[T, str]] = field(default_factory=list)
    skipped: list[tuple[T, str]] = field(default_factory=list)

    def note(self, what: str = "images") -> str | None:
        """One line saying how many images were skipped and why (None when none were)."""
        return skipped_note(len(self.skipped), len(self.captions) + len(self.skipped), self.skipped, what)


def skip_reason(exc: BaseException) -> str:
    return "not an image or corrupt" if isinstance(exc, UnidentifiedImageError) else str(exc) or type(exc).__name__


def skipped_note(n: int, total: int, examples: Sequence[tuple[Any, str]], what: str = "images") -> str | None:
    if not n:
        return None
    shown = "; ".join(f"{item}: {reason}" for item, reason in examples[:3])
    return f"note: {n} of {total} {what} could not be read and were skipped, not captioned or scored (e.g. {shown})"


def caption_batched(
    captioner: Any,
    items: Sequence[T],
    load: Callable[[T], Image.Image],
    *,
    beams: int = 3,
    min_new_tokens: int = 5,
    max_new_tokens: int = 30,
    batch_size: int = 32,
    lengths: str = "new",
    on_skip: Callable[[T, str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Captioned[T]:
    """Caption ``items`` in batches of ``batch_size``; ``load(item)`` gives the image. An item
    whose image cannot be read is skipped and counted (``on_skip`` hears of it at once)."""
    out: Captioned[T] = Captioned()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch: list[tuple[T, Image.Image]] = []
        for item in chunk:
            try:
                batch.append((item, load(item)))
            except BAD_IMAGE_ERRORS as exc:
                reason = skip_reason(exc)
                out.skipped.append((item, reason))
                if on_skip is not None:
                    on_skip(item, reason)
        if batch:
            texts = captioner.caption(
                [im for _, im in batch],
                beams=beams,
                min_new_tokens=min_new_tokens,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                lengths=lengths,
            )
            out.captions += [(item, text) for (item, _), text in zip(batch, texts, strict=True)]
        if progress is not None:
            progress(len(chunk))
    return out


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


def check_model(model: str, missing_images: list[tuple[str, str]]) -> None:
    """Fail on a bad ``--model`` before anything is said about the images; a missing model is named
    first, with the image paths that are missing too."""
    from .backends.captioners import check_checkpoint

    try:
        check_checkpoint(model)
    except UserError as exc:
        also = "; ".join(f"{name} ({reason})" for name, reason in missing_images)
        raise UserError(f"{exc}" + (f"; images not found either: {also}" if also else "")) from None


def coco_image_id(path: Path) -> int | str:
    """The id :mod:`icsd.formats` gives an image file (``COCO_val2014_000000391895.jpg`` -> 391895),
    as an integer when it is one, as COCO results files have it."""
    key = image_id_from_file(path)
    return int(key) if key.isdigit() else key


def format_output(captions: list[tuple[Path, str]], fmt: OutputFormat) -> str:
    if fmt == "coco":
        return json.dumps([{"image_id": coco_image_id(p), "caption": c} for p, c in captions], indent=1) + "\n"
    return "".join(json.dumps({"image": str(p), "caption": c}) + "\n" for p, c in captions)


def caption_files(
    model: str,
    inputs: list[str],
    *,
    beams: int,
    min_new_tokens: int,
    max_new_tokens: int,
    batch_size: int,
    device: str,
    fmt: OutputFormat = "jsonl",
    out: Path | None = None,
    stdout: IO[str] | None = None,
    report: Callable[[str], None] | None = None,
) -> CaptionRun:
    """Caption every readable image among ``inputs``; write the results to ``out`` or stdout.
    The decoding settings are ``icsd evaluate --model``'s (:class:`icsd.config.EvaluateConfig`)."""
    from .backends.captioners import load_captioner

    start = time.perf_counter()
    if fmt not in ("jsonl", "coco"):
        raise UserError(f"unknown output format {fmt!r}: use jsonl or coco")
    if not inputs:
        raise UserError("give at least one image file, glob or folder")
    say = report or (lambda msg: print(msg, file=sys.stderr))
    paths, skipped = collect_images(inputs)
    check_model(model, skipped)
    for name, reason in skipped:
        say(f"skipped {name}: {reason}")
    if not paths:
        raise UserError("no image files found in the given inputs")
    captioner = load_captioner(model, device)
    bar = progress_bar(len(paths), "caption", "img")
    try:
        done = caption_batched(
            captioner,
            paths,
            open_image,
            beams=beams,
            min_new_tokens=min_new_tokens,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            on_skip=lambda p, reason: say(f"skipped {p}: {reason}"),
            progress=bar.update,
        )
    finally:
        bar.close()
    captions = done.captions
    skipped += [(str(p), reason) for p, reason in done.skipped]
    if not captions:
        raise UserError(f"none of the {len(paths)} files could be read as an image")
    text = format_output(captions, fmt)
    if out is not None:
        atomic_write_text(out, text)
    else:
        (stdout or sys.stdout).write(text)
    return CaptionRun(captions, skipped, time.perf_counter() - start, out)
