"""Helpers of the fault-injection tests: run `icsd` as a real subprocess, SIGKILL it at a random
point of its work, and compare files byte for byte."""

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
    target: int  # finished units awaited before the kill
    delay: float  # then this many seconds more (a fraction of the last unit's time)
    alive: bool  # the process was still working when the signal was sent
    done_at_kill: int  # finished units right after it died
    returncode: int


def kill_at_random_point(
    args: list[str],
    *,
    seed: int,
    progress: Callable[[], int],
    total: int,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> Kill:
    """Start ``icsd ARGS``; wait until a random number (2 .. total-2) of its work units are
    finished, then a random fraction of the time its last unit took, then SIGKILL it (no chance
    to clean up). Successive seeds draw the number from the early, middle and late third of the
    run in turn. The wait scales with the process's own pace, so a loaded machine moves the kill
    point but never past the end of the run."""
    rng = random.Random(f"{args[0]}:{seed}")
    units = list(range(2, max(3, total - 1)))
    third = max(1, len(units) // 3)
    start = (seed % 3) * third
    target = rng.choice(units[start : start + third] or units)
    fraction = rng.random()
    proc = subprocess.Popen(
        icsd_cmd(*args), env=env or cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    delay = 0.0
    try:
        while proc.poll() is None:
            done, now = progress(), time.monotonic()
            for n in range(done + 1):
                seen.setdefault(n, now)
            if done >= target:
                delay = fraction * (seen[target] - seen[target - 1])
                time.sleep(delay)
                break
            if now > deadline:
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
    return Kill(seed, target, round(delay, 3), alive, progress(), proc.returncode)


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
