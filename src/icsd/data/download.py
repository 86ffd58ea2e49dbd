"""``icsd data download NAME...``: fetch, verify and lay out data sets under a root.

Per data set: its archives are fetched in parallel (:func:`icsd.data.fetch.fetch`: resumable,
size and published SHA-256 checked), unpacked into ``ROOT/.staging/<name>/`` (the archive's own
integrity checked on the way) and each target renamed into place, so a target is either whole
or absent. A damaged download is removed; a failure leaves the finished archives and ``.part``
files in ``ROOT/downloads/``, and the same command finishes the work. What arrived is recorded in
``ROOT/.icsd-data.json`` (URL, size, SHA-256 and whether the checksum was published).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..store import atomic_write_json, sha256_file
from .catalogue import DATASETS, Dataset, Source, Target, mirror_url, resolve_names
from .fetch import DownloadError, Fetched, fetch
from .unpack import archive_kind, check_image, check_json, move_into_place, unpack

RECORD = ".icsd-data.json"
DOWNLOADS = "downloads"
STAGING = ".staging"


@dataclass
class Summary:
    root: Path
    done: list[str] = field(default_factory=list)  # fetched and laid out by this call
    present: list[str] = field(default_factory=list)  # already in place
    manual: list[str] = field(default_factory=list)  # need a step by hand
    failed: list[str] = field(default_factory=list)  # one line each
    fetched_bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        parts = [f"{len(self.done)} downloaded", f"{len(self.present)} already in place"]
        if self.manual:
            parts.append(f"{len(self.manual)} to fetch by hand ({', '.join(self.manual)})")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return f"data: {', '.join(parts)} in {self.seconds:.1f}s, {human_bytes(self.fetched_bytes)} fetched -> {self.root}"


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"


# ----------------------------------------------------------------------------- the record


def read_record(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(root: Path, name: str, entry: dict[str, Any]) -> None:
    record = read_record(root)
    record[name] = {**entry, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_json(root / RECORD, record)


def file_entry(src: Source, got: Fetched) -> dict[str, Any]:
    return {
        "url": src.url,
        "size": got.size,
        "sha256": got.sha256,
        "checksum": f"published ({src.checksum_from})" if src.sha256 else "recorded at download",
    }


# ----------------------------------------------------------------------------- what is there


def images_in(folder: Path) -> int:
    from .unpack import IMAGE_SUFFIXES

    with contextlib.suppress(OSError):
        return sum(1 for e in _scan(folder) if e.name.lower().endswith(IMAGE_SUFFIXES))
    return 0


def _scan(folder: Path) -> list[Any]:
    import os

    with os.scandir(folder) as it:
        return [e for e in it if e.is_file()]


def target_present(root: Path, t: Target) -> bool:
    path = root / t.path
    if t.kind == "file":
        return path.is_file()
    return path.is_dir() and (t.images is None or images_in(path) >= t.images)


def state(root: Path, d: Dataset) -> str:
    """complete | absent | partial (some targets there, or a folder short of images)."""
    there = [target_present(root, t) for t in d.targets]
    if all(there):
        return "complete"
    if any(there) or any((root / t.path).exists() for t in d.targets):
        return "partial"
    return "absent"


# ----------------------------------------------------------------------------- installing


def target_sums(root: Path, d: Dataset) -> dict[str, str]:
    """SHA-256 of each file target as laid out (``icsd data check`` compares against it)."""
    return {t.path: sha256_file(root / t.path) for t in d.targets if t.kind == "file"}


def install_archive(root: Path, d: Dataset, archive: Path) -> None:
    """Unpack ``archive`` into staging, then each target into place; nothing half there on failure.
    A damaged archive is removed (the next call fetches it anew); on a full disk it is kept."""
    staging = root / STAGING / d.name
    drop_staging(root, d.name)
    try:
        if archive_kind(archive) == "file":
            (staging / d.targets[0].path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(archive, staging / d.targets[0].path)
            if archive.suffix == ".json":
                check_json(staging / d.targets[0].path, archive.name)
        else:
            unpack(archive, d.targets, staging)
        move_into_place(staging, root, d.targets)
    except DownloadError:
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()
        raise
    finally:
        drop_staging(root, d.name)


def drop_staging(root: Path, name: str) -> None:
    shutil.rmtree(root / STAGING / name, ignore_errors=True)
    with contextlib.suppress(OSError):
        (root / STAGING).rmdir()  # only when empty


def image_list(annotations: Path) -> list[tuple[str, str]]:
    """``[(file_name, url)]`` of a NoCaps-style annotation file (``images[].file_name, coco_url``)."""
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        return [(str(im["file_name"]), str(im["coco_url"])) for im in data["images"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DownloadError(f"{annotations} does not list images with file_name and coco_url ({exc})") from None


def fetch_images(root: Path, d: Dataset, mirror: str | None, jobs: int, retries: int) -> dict[str, Any]:
    """Every image an annotation file names, into staging (kept across calls: a rerun fetches only
    what is not there yet), each checked to decode; then the folder is renamed into place."""
    from tqdm.auto import tqdm

    needs = DATASETS[d.needs[0]].targets[0]
    items = image_list(root / needs.path)
    target = d.targets[0]
    staging = root / STAGING / d.name / target.path
    staging.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    failures: list[str] = []

    def one(item: tuple[str, str]) -> tuple[str, str | None, str | None]:
        name, url = item
        if "/" in name or name.startswith("."):
            return name, None, "not a plain file name"
        try:
            got = fetch(mirror_url(url, mirror), staging / name, retries=retries, position=1)
        except DownloadError as exc:
            return name, None, str(exc)
        problem = check_image(got.path)
        if problem:
            got.path.unlink()
            return name, None, f"{name} does not decode ({problem})"
        return name, got.sha256, None

    with ThreadPoolExecutor(max(1, jobs)) as pool, tqdm(total=len(items), desc=d.name, unit="img",
                                                        dynamic_ncols=True, disable=None) as bar:  # fmt: skip
        for name, digest, problem in pool.map(one, items):
            if problem:
                failures.append(problem)
            elif digest:
                sums[name] = digest
            bar.update(1)
    if failures:
        raise DownloadError(
            f"{d.name}: {len(failures)} of {len(items):,} images failed (e.g. {failures[0]}); the "
            f"{len(sums):,} fetched are kept: run the same command again for the rest"
        )
    move_into_place(root / STAGING / d.name, root, d.targets)
    drop_staging(root, d.name)
    return {"images": len(sums), "sha256": sums, "checksum": "recorded at download; each image decoded"}


def manual_archive(root: Path, d: Dataset) -> Path | None:
    for name in d.manual_archives:
        path = root / DOWNLOADS / name
        if path.is_file():
            return path
    return None


# ----------------------------------------------------------------------------- the command


def download(
    names: list[str],
    root: Path,
    *,
    mirror: str | None = None,
    jobs: int = 4,
    retries: int = 3,
    keep_archives: bool = False,
    echo: Callable[[str], None] = print,
) -> Summary:
    """Fetch and lay out ``names`` (data sets or groups) under ``root``. Raises
    :class:`DownloadError` (after finishing whatever else it can) when one failed."""
    started = time.perf_counter()
    datasets = resolve_names(names)
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    root.mkdir(parents=True, exist_ok=True)
    summary = Summary(root)
    todo: list[Dataset] = []
    for d in datasets:
        s = state(root, d)
        if s == "complete":
            summary.present.append(d.name)
        elif s == "partial" and d.name not in read_record(root):
            paths = ", ".join(str(root / t.path) for t in d.targets if (root / t.path).exists())
            summary.failed.append(
                f"{d.name}: {paths} exists but is incomplete and was not laid out by icsd: move it away "
                "(or complete it by hand) and run the same command again; `icsd data check` lists what is missing"
            )
        else:
            todo.append(d)

    fetched: dict[str, list[tuple[Source, Fetched]]] = {}
    archive_jobs = [(d, src) for d in todo if d.automatic for src in d.sources if src.unpack != "image-list"]
    with ThreadPoolExecutor(max(1, min(jobs, len(archive_jobs) or 1))) as pool:
        futures = [
            (d, src, pool.submit(fetch, mirror_url(src.url, mirror), root / DOWNLOADS / src.filename,
                                 size=src.size, sha256=src.sha256, retries=retries, position=i))  # fmt: skip
            for i, (d, src) in enumerate(archive_jobs)
        ]
        for d, src, future in futures:
            try:
                got = future.result()
            except DownloadError as exc:
                summary.failed.append(str(exc))
                continue
            summary.fetched_bytes += got.downloaded
            fetched.setdefault(d.name, []).append((src, got))

    for d in todo:
        try:
            if not d.automatic:
                archive = manual_archive(root, d)
                if archive is None:
                    summary.manual.append(d.name)
                    echo(f"{d.name}: {d.manual.replace('ROOT', str(root)) if d.manual else ''}")
                    continue
                install_archive(root, d, archive)
                write_record(root, d.name, {"files": [{"path": str(archive), "size": archive.stat().st_size,
                                                       "sha256": sha256_file(archive), "checksum": "recorded"}]})  # fmt: skip
            elif any(src.unpack == "image-list" for src in d.sources):
                missing = [n for n in d.needs if state(root, DATASETS[n]) != "complete"]
                if missing:
                    summary.failed.append(f"{d.name}: needs {', '.join(missing)} in place first")
                    continue
                write_record(root, d.name, fetch_images(root, d, mirror, jobs * 4, retries))
            elif d.name in fetched and len(fetched[d.name]) == len(d.sources):
                for _, got in fetched[d.name]:
                    install_archive(root, d, got.path)
                    if not keep_archives:
                        got.path.unlink(missing_ok=True)
                write_record(root, d.name, {"files": [file_entry(s, g) for s, g in fetched[d.name]],
                                             "targets": target_sums(root, d)})  # fmt: skip
            else:
                continue  # its fetch failed (already reported)
        except DownloadError as exc:
            summary.failed.append(f"{d.name}: {exc}" if not str(exc).startswith(d.name) else str(exc))
            continue
        if d.name not in summary.manual:
            summary.done.append(d.name)
            echo(f"{d.name}: in place under {root} ({', '.join(t.path for t in d.targets)})")
    with contextlib.suppress(OSError):
        (root / DOWNLOADS).rmdir()  # only when empty
    summary.seconds = time.perf_counter() - started
    return summary


