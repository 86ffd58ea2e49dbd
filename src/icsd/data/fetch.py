"""Fetch one URL to a file: resumable (HTTP Range), retried, size- and checksum-checked, with a
progress bar.

The bytes go to ``NAME.part`` beside the destination; a stop at any moment leaves a ``.part`` that
holds a prefix of the file, and the next call asks the server for the rest (``Range: bytes=N-``).
Only a complete file whose size (and published SHA-256) match is renamed to its name.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import UserError
from ..store import sha256_file

CHUNK = 1 << 20


class DownloadError(UserError):
    """A source that could not be fetched or did not verify: one line, exit 1 (not a user mistake)."""

    exit_code = 1


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    sha256: str
    resumed_from: int  # bytes already there when this call started (0: a fresh download)
    downloaded: int  # bytes this call received


def write_chunk(fh: IO[bytes], chunk: bytes) -> None:
    """Every byte written to a ``.part`` file goes through here (tests inject a full disk)."""
    fh.write(chunk)


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _total_from(response: Any, offset: int) -> int | None:
    content_range = response.headers.get("content-range", "")
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
    if match and match.group(3) != "*":
        return int(match.group(3))
    length = response.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None


def _bar(name: str, total: int | None, initial: int, position: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                position=position, leave=True, dynamic_ncols=True, file=sys.stderr, disable=None)  # fmt: skip


def _stream_once(client: Any, url: str, part: Path, name: str, expect_size: int | None, position: int) -> int | None:
    """One GET (with Range when ``part`` holds bytes) appended to ``part``; returns the total size
    the server gave. Transport errors propagate; a refusal is a :class:`DownloadError`."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 416 and expect_size is not None and offset == expect_size:
            return expect_size  # the .part is already whole
        if response.status_code == 416:  # a stale .part: start over
            part.unlink()
            return None
        if response.status_code >= 400:
            raise DownloadError(f"{url}: the server answered HTTP {response.status_code}")
        if response.status_code != 206:
            offset = 0  # no range support: the whole file again
        total = _total_from(response, offset)
        if expect_size is not None and total is not None and total != expect_size:
            raise DownloadError(
                f"{url}: the server offers {total:,} bytes but the published size is {expect_size:,}; "
                "not downloaded (a changed file or a wrong mirror)"
            )
        with part.open("ab" if offset else "wb") as fh, _bar(name, total or expect_size, offset, position) as bar:
            for chunk in response.iter_bytes():  # as they arrive: a break keeps what came
                write_chunk(fh, chunk)
                bar.update(len(chunk))
        return total


def fetch(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    position: int = 0,
    client_factory: Callable[[], Any] | None = None,
) -> Fetched:
    """``url`` -> ``dest``, resuming a ``.part`` left by an earlier call. ``size``/``sha256``: the
    published values (checked when given; a mismatch removes the file). A connection that breaks
    is resumed ``retries`` times before giving up with one line that says how to go on."""
    import httpx

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    started_with = part.stat().st_size if part.exists() else 0
    if dest.exists():
        got = dest.stat().st_size
        return Fetched(dest, got, sha256_file(dest), got, 0)
    make = client_factory or (lambda: httpx.Client(timeout=timeout, follow_redirects=True))
    total: int | None = None
    failures = 0
    have = started_with
    with make() as client:
        while True:
            try:
                total = _stream_once(client, url, part, dest.name, size, position)
            except (httpx.TransportError, httpx.HTTPError) as exc:
                failures += 1
                before, have = have, part.stat().st_size if part.exists() else 0
                if failures > retries:
                    of = f" of {size or total:,}" if (size or total) else ""
                    raise DownloadError(
                        f"{dest.name}: the connection failed after {have:,}{of} bytes ({type(exc).__name__}); "
                        "the part is kept: run the same command again to resume"
                    ) from None
                if have == before:  # no progress: wait before asking again
                    time.sleep(min(2.0**failures * 0.1, 5.0))
                continue
            have = part.stat().st_size if part.exists() else 0
            expected = size if size is not None else total
            if expected is None or have == expected:
                break
            if have > expected:
                part.unlink()
                raise DownloadError(f"{dest.name}: got {have:,} bytes, more than the {expected:,} announced; "
                                    "removed: run the same command again")  # fmt: skip
            failures += 1  # the body ended early: resume from where it stopped
            if failures > retries:
                raise DownloadError(
                    f"{dest.name}: the server stopped after {have:,} of {expected:,} bytes; "
                    "the part is kept: run the same command again to resume"
                )
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise DownloadError(
            f"{dest.name}: SHA-256 {digest[:12]}... does not match the published {sha256[:12]}...; "
            "the file was removed: run the same command again to fetch it anew"
        )
    got = part.stat().st_size
    part.replace(dest)
    return Fetched(dest, got, digest, started_with, got - started_with)
