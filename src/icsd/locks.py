"""One writer per run folder and stage: ``RUN/.locks/<name>.lock``, held while a command writes.

A stage command holds its stage's lock exclusively and the run folder's lock shared; ``icsd run``
holds the run folder's lock exclusively (so no stage command writes beside it, and two ``icsd run``
never share a folder). A second writer fails at once with one line naming the holder (pid, host,
command, since when), which the holder writes into the lock file. The locks are ``flock`` locks:
the kernel releases them when their holder ends, however it ends, so the lock of a dead holder is
simply taken over (its stale record is replaced). Readers (``icsd report``, ``icsd compare``) take
none and never wait. Under ``torchrun`` only rank 0 takes them (the ranks of one run write
together). On NFS, ``flock`` is carried by the NFS lock protocol: see docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError

LOCK_DIR = ".locks"
RUN_LOCK = "run"


class LockHeld(UserError):
    """Another process writes there now."""

    exit_code = 75  # EX_TEMPFAIL: try again later


# locks this process holds: path -> (open file, exclusive, depth); a nested request is granted
_held: dict[Path, list[Any]] = {}


def lock_path(run_root: Path, name: str) -> Path:
    return Path(run_root) / LOCK_DIR / f"{name}.lock"


def holder_record(command: str | None = None) -> dict[str, Any]:
    argv = [Path(sys.argv[0]).name or "icsd", *sys.argv[1:]] if sys.argv else ["icsd"]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or shlex.join(argv),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def read_holder(path: Path) -> dict[str, Any] | None:
    """The record a holder wrote into a lock file (None when empty or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "pid" in data else None


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another icsd command"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} ({holder.get('command')})"


def is_held(path: Path) -> bool:
    """Whether some process holds ``path`` exclusively (probed without waiting)."""
    try:
        with open(path, "a+", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def current_holder(run_root: Path, path: Path) -> dict[str, Any] | None:
    """Who holds ``path``: its own record, else (shared holders write none) the record of a stage
    lock held beside it."""
    own = read_holder(path)
    if own is not None:
        return own
    for other in sorted((Path(run_root) / LOCK_DIR).glob("*.lock")):
        record = read_holder(other)
        if other != path and record is not None and is_held(other):
            return record
    return None


def _write_record(fh: IO[str], record: dict[str, Any]) -> None:
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(record) + "\n")
    fh.flush()
    with contextlib.suppress(OSError):
        os.fsync(fh.fileno())


@contextlib.contextmanager
def hold(run_root: Path, name: str, *, exclusive: bool = True, what: str | None = None) -> Iterator[None]:
    """Hold ``RUN/.locks/<name>.lock`` (shared or exclusive) for the body; fail at once with
    :class:`LockHeld` when another process holds it in a conflicting way."""
    path = lock_path(run_root, name).absolute()
    mine = _held.get(path)
    if mine is not None:  # this process holds it already (``icsd run`` running a stage)
        mine[2] += 1
        try:
            yield
        finally:
            mine[2] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the body; read+write for NFS's fcntl emulation
    try:
        try:
            fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = current_holder(run_root, path)
            target = what or f"{Path(run_root)} ({name})"
            raise LockHeld(f"{target} is in use by {describe(holder)}; wait for it to end or stop it") from None
        stale = read_holder(path)  # left by a holder that ended without releasing (killed): taken over
        if stale is not None and exclusive:
            print(f"note: taking over {path.name} from {describe(stale)}, which has ended", file=sys.stderr)
        if exclusive:
            _write_record(fh, holder_record())
        elif stale is not None:
            _write_record(fh, {})  # shared holders write no record; nobody holds it exclusively now
        _held[path] = [fh, exclusive, 1]
        try:
            yield
        finally:
            del _held[path]
            if exclusive:
                with contextlib.suppress(OSError):
                    fh.seek(0)
                    fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


def rank_zero() -> bool:
    """False on the other ranks of a torchrun / accelerate launch (rank 0 holds the locks)."""
    return os.environ.get("RANK", "0") in ("", "0")


@contextlib.contextmanager
def stage_writer(run_root: Path, stage: str) -> Iterator[None]:
    """A stage command writing ``stage``'s outputs: its stage lock, and the run folder shared."""
    if not rank_zero():
        yield
        return
    root = Path(run_root)
    with (
        hold(root, RUN_LOCK, exclusive=False, what=f"run folder {root}"),
        hold(root, stage, what=f"{stage} in {root}"),
    ):
        yield


@contextlib.contextmanager
def run_writer(run_root: Path) -> Iterator[None]:
    """``icsd run`` on a run folder: the folder's lock, exclusively."""
    if not rank_zero():
        yield
        return
    root = Path(run_root)
    with hold(root, RUN_LOCK, what=f"run folder {root}"):
        yield
