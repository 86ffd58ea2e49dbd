"""Helpers of the fault-injection tests: run `icsd` as a real subprocess, SIGKILL it at a random
point of its work (chosen by the files it has written, never by time), and compare files byte for
byte."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "src" / "icsd" / "data" / "quickstart"
QUICKSTART_CAPTIONS = QUICKSTART / "captions.json"
QUICKSTART_IMAGES = QUICKSTART / "images"
QUICKSTART_REFERENCES = QUICKSTART / "references.json"

# Seeds of the kill points per stage; ICSD_FAULT_SEEDS=N runs N of them (default: what fits CI).
DEFAULT_SEEDS = int(os.environ.get("ICSD_FAULT_SEEDS", "0") or 0)


def seeds(default: int) -> list[int]:
    return list(range(DEFAULT_SEEDS or default))


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of an `icsd` subprocess: offline, one math thread (same numerics as the
    in-process reference runs, which also use one thread)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra)
    return env


def icsd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "icsd.cli", *args]


def run_cli(args: Iterable[str], *, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        icsd_cmd(*args), capture_output=True, text=True, env=env or cli_env(), timeout=timeout, cwd=cwd
    )


@dataclass
class Kill:
    """Where one SIGKILL landed."""

    seed: int
    target: int  # finished units (done-markers) awaited before the kill
    phase: str  # "after-marker": right after the target's marker; "mid-unit": the next unit had begun writing
    alive: bool  # the process was still working when the signal was sent
    done_at_kill: int  # finished units right after it died
    returncode: int


def kill_at_random_point(
    args: list[str],
    *,
    seed: int,
    progress: Callable[[], int],
    total: int,
    in_flight: Callable[[], bool] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> Kill:
    """Start ``icsd ARGS``; wait until a random number (2 .. total-2) of its work units are
    finished (``progress()`` counts their done-markers), then SIGKILL it (no chance to clean up).
    Successive seeds draw the number from the early, middle and late third of the run in turn.
    With ``in_flight`` (true once the next unit has visibly begun: its temp file holds data, a step
    is logged past the checkpoint, ...) odd seeds kill inside that next unit instead, or at the
    latest at its own marker, which still leaves a unit to do. Every wait is for a file to appear,
    never for a time, so a loaded machine moves nothing; ``timeout`` only ends a run that hangs."""
    rng = random.Random(f"{args[0]}:{seed}")
    units = list(range(2, max(3, total - 1)))
    third = max(1, len(units) // 3)
    start = (seed % 3) * third
    target = rng.choice(units[start : start + third] or units)
    mid_unit = in_flight is not None and seed % 2 == 1
    proc = subprocess.Popen(
        icsd_cmd(*args), env=env or cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            done = progress()
            if done >= target and not mid_unit:
                break
            if done > target or (done == target and in_flight is not None and in_flight()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"icsd {args[0]} made no progress to {target} units in {timeout}s")
            time.sleep(0.01)
        alive = proc.poll() is None
        if alive:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if not alive and proc.returncode != 0:
        raise AssertionError(f"icsd {args[0]} failed before the kill:\n{stderr[-3000:]}")
    return Kill(seed, target, "mid-unit" if mid_unit else "after-marker", alive, progress(), proc.returncode)


def temp_file_with_data(folder: Path, pattern: str) -> Callable[[], bool]:
    """``in_flight`` probe: a temp file (``.name.XXXX.tmp``) matching ``pattern`` holds data."""

    def probe() -> bool:
        for p in folder.glob(pattern):
            try:
                if p.stat().st_size > 0:
                    return True
            except FileNotFoundError:  # renamed into place meanwhile
                continue
        return False

    return probe


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path, pattern: str) -> dict[str, str]:
    """sha256 of every file matching ``pattern`` in ``folder``, by name."""
    return {p.name: digest(p) for p in sorted(folder.glob(pattern)) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files a killed writer may leave (``.name.XXXX.tmp``), anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


def record_figures(test: str, **figures: object) -> None:
    """Append a test's figures (faults injected, records checked, lost, ...) as one JSON line to
    the file named by ``ICSD_FAULT_REPORT``, when set (docs/reliability.md quotes them)."""
    import json

    target = os.environ.get("ICSD_FAULT_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": test, **figures}, default=str) + "\n")
