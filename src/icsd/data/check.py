"""What data a config needs, and whether it is there: ``icsd data check CONFIG`` and the
rehearsal's missing-data listing are this one code.

Every path a config names is checked to exist and be readable; a JSON file to parse (and, when
``icsd data download`` laid it out, to have the SHA-256 it arrived with); a folder of a known data
set to hold all its images; an image folder to hold every image its annotation file references.
Each path is matched to the data set that provides it, so the table says what to download.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

PATH_KEYS: tuple[tuple[str, str, str], ...] = (
    ("ingest", "corpus", "file"),
    ("summarize", "prompt", "file"),
    ("train", "val_images", "folder"),
    ("train", "val_captions", "file"),
    ("evaluate", "annotations", "file"),
    ("evaluate", "images", "folder"),
    ("evaluate", "predictions", "file"),
    ("evaluate", "model", "folder"),
    ("evaluate", "spice_jars", "folder"),
)
# the image folder of each annotation key: its referenced images must all be there
IMAGE_REFERENCES = {"evaluate.images": "evaluate.annotations", "train.val_images": "train.val_captions"}


@dataclass
class PathCheck:
    key: str
    path: str
    status: str  # ok | missing | unreadable | not a file | not a folder | corrupt (...) | incomplete (...)
    dataset: str | None = None  # the data set that provides it (icsd data list)
    root: str | None = None  # the data root that path lies under

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        return f"{self.key}: {self.path} -- {self.status}"


def check_path(path: Path, kind: str) -> str:
    """ok | missing | not a file | not a folder | unreadable (...)."""
    if not path.exists():
        return "missing"
    if kind == "file":
        if not path.is_file():
            return "not a file"
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        return "ok"
    if not path.is_dir():
        return "not a folder"
    try:
        next(iter(os.scandir(path)), None)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return "ok"


def provider(path: str, key: str, benchmark: str | None) -> tuple[str | None, str | None]:
    """(data set, data root) of a config path: the catalogue target it ends with, else for an
    evaluation image folder the data set of the benchmark's images."""
    from .catalogue import BENCHMARK_IMAGES, DATASETS, dataset_for_path

    parts = PurePosixPath(Path(path).as_posix()).parts
    for i in range(len(parts)):
        found = dataset_for_path("/".join(parts[i:]))
        if found is not None:
            return found[0].name, str(PurePosixPath(*parts[:i])) if i else "."
    if key == "evaluate.images" and benchmark in BENCHMARK_IMAGES:
        name = BENCHMARK_IMAGES[benchmark]
        target = DATASETS[name].targets[0].path
        if target.startswith(parts[-1] + "/"):
            return name, str(PurePosixPath(*parts[:-1])) if len(parts) > 1 else "."
        return name, None
    return None, None


def recorded_sha256(root: Path, rel: str) -> str | None:
    from .download import RECORD

    try:
        record = json.loads((root / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for entry in record.values() if isinstance(record, dict) else ():
        sha = (entry.get("targets") or {}).get(rel) if isinstance(entry, dict) else None
        if sha:
            return str(sha)
    return None


def content_problem(path: Path, dataset: str | None, root: str | None) -> str | None:
    """A readable path that is still not usable: corrupt JSON, a changed file, missing images."""
    from ..store import sha256_file
    from .catalogue import DATASETS
    from .download import images_in

    target = next((t for t in DATASETS[dataset].targets if root and Path(root) / t.path == path), None) if dataset else None
    if path.is_file() and path.suffix == ".json":
        if target is not None and root is not None:
            sha = recorded_sha256(Path(root), target.path)
            if sha and sha256_file(path) != sha:
                return "corrupt (SHA-256 differs from the downloaded file's)"
        try:
            with path.open("rb") as fh:
                json.load(fh)
        except ValueError as exc:
            return f"corrupt (not valid JSON: {str(exc)[:60]})"
    if path.is_dir() and target is not None and target.images:
        have = images_in(path)
        if have < target.images:
            return f"incomplete ({have:,} of {target.images:,} images)"
    return None


def referenced_images_problem(images: Path, annotations: Path, benchmark: str | None, split: str) -> str | None:
    """How many of the images ``annotations`` references are not under ``images`` (the lookup
    of :mod:`icsd.stages.evaluate`: the file's relative path, or its bare name)."""
    from ..errors import UserError
    from ..eval_sets import load_references

    try:
        refs = load_references(annotations, benchmark=benchmark, split=split)
    except UserError:
        return None  # the annotation file's own row says what is wrong with it
    files = [im.file for im in refs.images if im.captions and im.file]
    names = {e.name for e in os.scandir(images) if e.is_file()}
    subdirs: dict[str, set[str]] = {}

    def present(file: str) -> bool:
        rel = PurePosixPath(file)
        if rel.name in names and len(rel.parts) == 1:
            return True
        folder = str(rel.parent)
        if folder not in subdirs:
            sub = images / folder
            subdirs[folder] = {e.name for e in os.scandir(sub) if e.is_file()} if sub.is_dir() else set()
        return rel.name in subdirs[folder] or rel.name in names

    missing = [f for f in files if not present(f)]
    if missing:
        return f"incomplete ({len(missing):,} of {len(files):,} images of {refs.name} missing, e.g. {missing[0]})"
    return None


def check_paths(cfg: Any) -> list[PathCheck]:
    """Every data path the config names, each checked to exist, be readable and be whole."""
    from ..llm.prompts import PROMPT_NAMES

    out: list[PathCheck] = []
    benchmark = cfg.evaluate.benchmark
    for stage, key, kind in PATH_KEYS:
        value = getattr(getattr(cfg, stage), key)
        if not value or (key == "prompt" and value in PROMPT_NAMES):
            continue  # unset, or a bundled prompt's name
        name = f"{stage}.{key}"
        path = Path(value).expanduser()
        dataset, root = provider(str(value), name, benchmark)
        status = check_path(path, kind)
        if status == "ok":
            status = content_problem(path, dataset, root) or "ok"
        out.append(PathCheck(name, str(value), status, dataset, root))
    by_key = {c.key: c for c in out}
    for images_key, refs_key in IMAGE_REFERENCES.items():
        images, refs = by_key.get(images_key), by_key.get(refs_key)
        if images is not None and refs is not None and images.ok and refs.ok:
            split = "test" if images_key == "evaluate.images" else "val"
            problem = referenced_images_problem(
                Path(images.path).expanduser(), Path(refs.path).expanduser(),
                benchmark if images_key == "evaluate.images" else None, cfg.evaluate.split if split == "test" else split,
            )  # fmt: skip
            images.status = problem or images.status
    return out


def exists(checks: list[PathCheck], key: str) -> bool:
    return any(c.key == key and c.ok for c in checks)


def table(checks: list[PathCheck]) -> str:
    """One table: every needed path, its state and the data set that provides it."""
    head = ["needed by", "path", "state", "provided by"]
    rows = [[c.key, c.path, c.status, c.dataset or "-"] for c in checks]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def download_hint(checks: list[PathCheck]) -> str | None:
    """``icsd data download A B --root R`` for the data sets behind the paths that are not ok."""
    from .catalogue import DATASETS

    bad = [c for c in checks if not c.ok and c.dataset]
    if not bad:
        return None
    names = list(dict.fromkeys(c.dataset for c in bad if c.dataset))
    roots = {c.root for c in bad if c.root}
    root = roots.pop() if len(roots) == 1 else "data"
    manual = [n for n in names if not DATASETS[n].automatic]
    hint = f"get them: icsd data download {' '.join(names)}" + (f" --root {root}" if root != "data" else "")
    if manual:
        hint += f"  ({', '.join(manual)}: by hand, see icsd data list)"
    return hint
