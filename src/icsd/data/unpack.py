"""Unpack a downloaded archive into a staging folder, in the layout the configs expect, checking
it as it goes (a zip member's CRC, a tar's structure, a JSON that parses).

Members are never extracted by their own names: each one wanted is mapped onto a target path
(:class:`icsd.data.catalogue.Target`), so no member can write outside the staging folder.
"""

from __future__ import annotations

import json
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from .catalogue import Target
from .fetch import DownloadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def member_target(name: str, targets: tuple[Target, ...]) -> str | None:
    """Where archive member ``name`` goes (a path relative to the root), or None when unwanted.
    A file target takes a member of that file name at any depth; a folder target (``val2014/``)
    takes the files below a folder of that name at the top or one level down."""
    parts = PurePosixPath(name.lstrip("./")).parts
    if not parts or any(p in ("..", "") for p in parts):
        return None
    for t in targets:
        if not t.member:
            continue
        if not t.member.endswith("/"):
            if parts[-1] == t.member:
                return t.path
            continue
        folder = t.member.rstrip("/")
        for depth in (0, 1):
            if len(parts) > depth + 1 and parts[depth] == folder:
                rest = parts[depth + 1 :]
                if rest[-1].startswith("._") or "__MACOSX" in parts:
                    return None
                return str(PurePosixPath(t.path, *rest))
    return None


def _copy(src: IO[bytes], dest: Path) -> None:
    from .fetch import CHUNK, write_chunk

    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        for block in iter(lambda: src.read(CHUNK), b""):
            write_chunk(out, block)


def _members(archive: Path, kind: str) -> Iterator[tuple[str, IO[bytes]]]:
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as fh:
                        yield info.filename, fh
        return
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is not None:
                yield member.name, extracted


def archive_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "tar"
    return "file"


def unpack(archive: Path, targets: tuple[Target, ...], staging: Path) -> dict[str, int]:
    """Every wanted member of ``archive`` into ``staging`` (by target path); returns files per
    target. A damaged archive is a :class:`DownloadError`; ``staging`` is left for the caller."""
    from tqdm.auto import tqdm

    counts = {t.path: 0 for t in targets}
    kind = archive_kind(archive)
    try:
        with tqdm(desc=f"unpack {archive.name}", unit="file", dynamic_ncols=True, file=sys.stderr, disable=None) as bar:
            for name, fh in _members(archive, kind):
                rel = member_target(name, targets)
                if rel is None:
                    continue
                _copy(fh, staging / rel)
                top = next(t.path for t in targets if rel == t.path or rel.startswith(t.path + "/"))
                counts[top] += 1
                bar.update(1)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zipfile.LargeZipFile, zlib.error) as exc:
        raise DownloadError(f"{archive.name} is damaged ({exc}); it was removed: run the same command again "
                            "to fetch it anew") from None  # fmt: skip
    for t in targets:
        if t.kind == "file" and (staging / t.path).suffix == ".json":
            check_json(staging / t.path, archive.name)
    empty = [t.path for t in targets if counts[t.path] == 0]
    if empty:
        raise DownloadError(f"{archive.name} holds nothing for {', '.join(empty)}: not the expected archive")
    return counts


def check_json(path: Path, origin: str) -> None:
    try:
        with path.open("rb") as fh:
            json.load(fh)
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{origin}: {path.name} is not valid JSON ({str(exc)[:80]}); it was removed: "
                            "run the same command again to fetch it anew") from None  # fmt: skip


def check_image(path: Path) -> str | None:
    """Why ``path`` is not a readable image, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many kinds for a bad file
        return f"{type(exc).__name__}: {exc}"
    return None


def move_into_place(staging: Path, root: Path, targets: tuple[Target, ...]) -> None:
    """Each staged target renamed onto its place under ``root`` (one rename each: never half there)."""
    for t in targets:
        src, dest = staging / t.path, root / t.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            raise DownloadError(f"{dest} appeared while unpacking: move it away and run the same command again")
        src.replace(dest)
