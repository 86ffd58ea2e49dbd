"""The run directory: atomic writes, parquet parts with done-markers, the manifest and the saved config.

Every write goes to a temporary name in the same folder, is fsynced and then renamed, so a reader
sees either the old file or the complete new one. A part or shard counts as done only when its
done-marker exists and still matches the file it describes; markers are written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .errors import UserError
from .records import ImageSample

_TRACKED_PACKAGES = (
    "icsd",
    "torch",
    "transformers",
    "diffusers",
    "sentence-transformers",
    "faiss-cpu",
    "pyarrow",
    "numpy",
    "webdataset",
    "openai",
    "pycocoevalcap",
)


# ----------------------------------------------------------------------------- atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should be as readable as any file
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write a parquet file atomically (zstd-compressed)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(path: str | os.PathLike[str], what: str = "") -> pa.Table:
    """Read a parquet file; a missing or unreadable file is a one-line :class:`UserError`."""
    p = Path(path)
    label = what or p.name
    if not p.exists():
        raise UserError(f"{label} not found: {p}")
    try:
        return pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{label} is not a readable parquet file ({p}): {exc}") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    """A stable short hash of a JSON-able object (key order does not matter)."""
    data = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:16]


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def safe_key(item_id: str) -> str:
    """A file-name and webdataset-safe key for an id.

    Ids made only of letters, digits, ``_`` and ``-`` are kept as they are. Others (with ``/``,
    ``..``, dots, spaces, ...) become their safe characters plus a short hash, so distinct ids
    never collide and no key can leave its folder or confuse webdataset's extension split.
    """
    if _SAFE_KEY.match(item_id):
        return item_id
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", item_id)[:60].strip("_") or "id"
    return f"{stem}-{hashlib.sha256(item_id.encode('utf-8')).hexdigest()[:12]}"


# ----------------------------------------------------------------------------- parts and markers


def marker_path(data_path: str | os.PathLike[str]) -> Path:
    """``part-00003.parquet`` -> ``part-00003.done.json``; ``shard-00001.tar`` -> ``shard-00001.done.json``."""
    p = Path(data_path)
    return p.with_name(p.name.split(".", 1)[0] + ".done.json")


def mark_done(data_path: str | os.PathLike[str], info: dict[str, Any]) -> dict[str, Any]:
    """Write the done-marker of a finished part or shard (its size and sha256 included)."""
    p = Path(data_path)
    marker = {
        **info,
        "file": p.name,
        "bytes": p.stat().st_size,
        "sha256": sha256_file(p),
        "finished_at": time.time(),
    }
    atomic_write_json(marker_path(p), marker)
    return marker


def read_marker(data_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    m = marker_path(data_path)
    try:
        marker = read_json(m)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def is_done(
    data_path: str | os.PathLike[str], expect: dict[str, Any] | None = None, verify_hash: bool = False
) -> bool:
    """True when the marker exists, its file exists with the recorded size (and hash), and every
    ``expect`` item equals the marker's. A shard without marker, a marker without shard, or a
    truncated shard all read as not done."""
    p = Path(data_path)
    marker = read_marker(p)
    if marker is None or not p.exists():
        return False
    if marker.get("bytes") != p.stat().st_size:
        return False
    if expect and any(marker.get(k) != v for k, v in expect.items()):
        return False
    return not (verify_hash and marker.get("sha256") != sha256_file(p))


def clear_part(data_path: str | os.PathLike[str]) -> None:
    """Remove a part and its marker (marker first, so a crash in between leaves no false 'done')."""
    p = Path(data_path)
    with contextlib.suppress(FileNotFoundError):
        marker_path(p).unlink()
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def remove_stale_parts(folder: Path, keep: set[str], pattern: str) -> int:
    """Delete parts matching ``pattern`` whose names are not in ``keep``, markers whose data file is
    gone, and temporary files left by a killed writer. Returns how many parts were removed."""
    if not folder.exists():
        return 0
    removed = 0
    for p in folder.glob(pattern):
        if p.name not in keep:
            clear_part(p)
            removed += 1
    for m in folder.glob("*.done.json"):
        stem = m.name.removesuffix(".done.json")
        if not any(not x.name.endswith(".done.json") for x in folder.glob(stem + ".*")):
            m.unlink()
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return removed


def read_embeddings(folder: Path) -> tuple[list[str], Any]:
    """All embedding parts in order as (ids, float32 matrix); a missing or incomplete part is an error."""
    import numpy as np

    from .records import embeddings_from_table

    parts = sorted(folder.glob("part-*.parquet")) if folder.exists() else []
    if not parts:
        raise UserError(f"no embeddings in {folder} (run `icsd embed` first)")
    ids: list[str] = []
    mats = []
    for p in parts:
        if not is_done(p):
            raise UserError(f"embedding part {p.name} is incomplete (run `icsd embed` again to finish it)")
        pid, mat = embeddings_from_table(read_parquet(p))
        ids.extend(pid)
        mats.append(mat)
    return ids, np.concatenate(mats)


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def done_shards(images_dir: Path) -> tuple[list[Path], int]:
    """Finished image shards (sorted) and how many shard files are not finished."""
    shards = sorted(images_dir.glob("shard-*.tar")) if images_dir.exists() else []
    done = [s for s in shards if is_done(s)]
    return done, len(shards) - len(done)


def iter_shard_samples(shard: Path, with_images: bool = True) -> Iterator[ImageSample]:
    """Every sample of a webdataset shard, read with ``tarfile`` (members are never extracted to
    disk, so no member name can escape). A damaged shard is a one-line :class:`UserError`."""
    import tarfile

    try:
        with tarfile.open(shard, "r") as tar:
            grouped: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if ext != "json" and not (with_images and ext in IMAGE_EXTS):
                    continue
                fh = tar.extractfile(member)
                if fh is not None:
                    grouped.setdefault(key, {})[ext] = fh.read()
        for key, parts in grouped.items():
            img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
            try:
                sample = ImageSample.from_json(
                    key, shard.name, parts.get("json", b"{}"), parts.get(img_ext) if img_ext else None, img_ext
                )
            except (ValueError, TypeError) as exc:
                raise UserError(f"image shard is unreadable ({shard}): sample {key}: {exc}") from None
            yield sample
    except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"image shard is unreadable ({shard}): {exc}") from None


# ----------------------------------------------------------------------------- run directory


@dataclass(frozen=True)
class RunDir:
    """Paths of the run-directory contract (see docs/architecture.md)."""

    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str], create: bool = True) -> RunDir:
        root = Path(path).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise UserError(f"run directory is a file, not a folder: {root}")
        if create:
            root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_json(self) -> Path:
        return self.root / "manifest.json"

    @property
    def captions(self) -> Path:
        return self.root / "captions.parquet"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def candidates(self) -> Path:
        return self.root / "candidates.parquet"

    @property
    def selections(self) -> Path:
        return self.root / "selections.parquet"

    @property
    def selection_parts(self) -> Path:
        return self.root / "selections"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def scores(self) -> Path:
        return self.root / "scores.parquet"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.parquet"

    @property
    def train(self) -> Path:
        return self.root / "train"

    def eval_dir(self, benchmark: str) -> Path:
        return self.root / "eval" / safe_key(benchmark)

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    # manifest -------------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any]:
        try:
            data = read_json(self.manifest_json)
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"manifest is not valid JSON ({self.manifest_json}): {exc}") from None
        return data if isinstance(data, dict) else {}

    def update_manifest(self, stage: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Replace the manifest entry of one stage; other stages' entries are kept."""
        manifest = self.read_manifest()
        stages = manifest.setdefault("stages", {})
        stages[stage] = {**entry, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest["icsd_version"] = package_versions().get("icsd")
        atomic_write_json(self.manifest_json, manifest)
        return manifest

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        entry = self.read_manifest().get("stages", {}).get(stage)
        return entry if isinstance(entry, dict) else None

    def drop_manifest_entries(self, stages: list[str]) -> None:
        manifest = self.read_manifest()
        if not manifest:
            return
        for s in stages:
            manifest.get("stages", {}).pop(s, None)
        atomic_write_json(self.manifest_json, manifest)

    # config ---------------------------------------------------------------------------------

    def save_stage_config(self, stage: str, cfg: dict[str, Any]) -> None:
        """Merge one stage's resolved config into ``config.yaml``."""
        merged: dict[str, Any] = {}
        if self.config_yaml.exists():
            try:
                loaded = yaml.safe_load(self.config_yaml.read_text(encoding="utf-8"))
                merged = loaded if isinstance(loaded, dict) else {}
            except yaml.YAMLError:
                merged = {}
        merged[stage] = cfg
        atomic_write_text(self.config_yaml, yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _marker_sha256(marker: Path) -> str | None:
    """The sha256 a done-marker records; None for a garbled marker (its part is not done anyway)."""
    try:
        data = read_json(marker)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("sha256") if isinstance(data, dict) else None


def input_hashes(*paths: Path) -> dict[str, str]:
    """sha256 of each input file, or of the sorted done-markers of an input folder."""
    out: dict[str, str] = {}
    for p in paths:
        if p.is_dir():
            markers = sorted(p.glob("*.done.json"))
            if markers:
                out[p.name] = hash_obj([(m.name, _marker_sha256(m)) for m in markers])
            else:
                files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
                out[p.name] = hash_obj([(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
        elif p.exists():
            out[p.name] = sha256_file(p)
    return out


def manifest_entry(
    *,
    config: dict[str, Any],
    inputs: dict[str, str],
    counts: dict[str, Any],
    seconds: float,
    models: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest record of one complete stage run."""
    return {
        "config_hash": hash_obj(config),
        "config": config,
        "inputs": inputs,
        "models": models or {},
        "versions": package_versions(),
        "counts": counts,
        "seconds": round(seconds, 3),
        "complete": True,
        **(extra or {}),
    }
