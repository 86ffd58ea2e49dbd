"""How shard tasks run: inline, in a local process pool (one worker per GPU), or on Ray.

A stage turns its work into :class:`ShardTask` items, each writing one output file plus its
done-marker. The executor skips tasks whose marker is present and valid, then runs the rest with a
worker built once per process by a picklable factory (so a model loads once per worker, never per
shard). Workers know nothing of executors; they get a task and a ``progress(n)`` callback.

One failure policy for every executor: a task is handed to a worker only when a worker is free, so
when a task fails nothing queued starts any more; tasks already running on other workers finish
(their shards are kept), workers and actors are ended in every case, and the error raised names the
shard and its error in one line (:class:`ShardFailed`, or a :class:`~icsd.errors.UserError` with the
shard in front for errors the user must fix), with the original error as its ``__cause__``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import interrupt
from .console import progress_bar
from .errors import UserError
from .store import is_done

ExecutorKind = Literal["inline", "process", "ray"]
Progress = Callable[[int], None]
Worker = Callable[["ShardTask", Progress], dict[str, Any]]
WorkerFactory = Callable[[int], Worker]


@dataclass
class ShardTask:
    """One unit of work, of resume and of distribution."""

    key: str
    output: Path
    size: int
    payload: Any = None
    expect: dict[str, Any] = field(default_factory=dict)

    def done(self) -> bool:
        return is_done(self.output, self.expect)


class ShardFailed(RuntimeError):
    """A shard task raised: the message names the shard and its error in one line."""

    def __init__(self, key: str, error: BaseException) -> None:
        self.key = key
        self.error = error
        super().__init__(f"shard {key} failed: {describe_error(error)}")


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def shard_failure(key: str, exc: BaseException) -> Exception:
    """The error to raise when the task ``key`` failed with ``exc``: a :class:`~icsd.errors.UserError`
    stays one (with the shard in front, same exit code), anything else becomes :class:`ShardFailed`."""
    err: Exception
    if isinstance(exc, UserError):
        err = UserError(f"shard {key}: {exc}")
        err.exit_code = exc.exit_code  # type: ignore[misc]
    else:
        err = ShardFailed(key, exc)
    err.__cause__ = exc
    return err


@dataclass
class RunResult:
    results: list[dict[str, Any]]
    skipped: int
    seconds: float

    @property
    def ran(self) -> int:
        return len(self.results)


def pending(tasks: Sequence[ShardTask]) -> tuple[list[ShardTask], int]:
    todo = [t for t in tasks if not t.done()]
    return todo, len(tasks) - len(todo)


def run_tasks(
    tasks: Sequence[ShardTask],
    factory: WorkerFactory,
    *,
    executor: ExecutorKind = "inline",
    workers: int = 1,
    desc: str = "",
    unit: str = "it",
    address: str | None = None,
    quiet: bool = False,
) -> RunResult:
    """Run every task whose output is not done yet; return the workers' results."""
    start = time.perf_counter()
    todo, skipped = pending(tasks)
    total = sum(t.size for t in tasks)
    already = total - sum(t.size for t in todo)
    if skipped and todo and not quiet:
        print(f"{desc}: resuming: {skipped} of {len(tasks)} shards already done, {len(todo)} to go", file=sys.stderr, flush=True)
    interrupt.at(f"{desc} ({skipped} of {len(tasks)} shards done)")
    bar = progress_bar(total, desc, unit, initial=already, disable=quiet)
    try:
        if not todo:
            results: list[dict[str, Any]] = []
        elif executor == "inline" or (executor == "process" and workers <= 1):
            results = _run_inline(todo, factory, bar, desc)
        elif executor == "process":
            results = _run_process_pool(todo, factory, workers, bar, desc)
        elif executor == "ray":
            from .ray_executor import run_ray

            results = run_ray(todo, factory, workers=workers, address=address, bar=bar)
        else:
            raise UserError(f"unknown executor {executor!r}: use inline, process or ray")
    finally:
        bar.close()
    return RunResult(results=results, skipped=skipped, seconds=time.perf_counter() - start)


def _run_inline(todo: Sequence[ShardTask], factory: WorkerFactory, bar: Any, desc: str = "") -> list[dict[str, Any]]:
    worker = factory(0)
    results = []
    for task in todo:
        try:
            results.append(worker(task, bar.update))
        except Exception as exc:
            raise shard_failure(task.key, exc) from exc
        finished(desc, len(results), todo)
    return results


def finished(desc: str, count: int, todo: Sequence[ShardTask]) -> None:
    """Record how far the run got, for the line an interrupt prints."""
    interrupt.at(f"{desc} ({count} of the {len(todo)} shards to do finished)")


# ----------------------------------------------------------------------------- process pool

_worker: Worker | None = None
_progress_q: Any = None


def _init_process(factory: WorkerFactory, index_q: Any, progress_q: Any) -> None:
    global _worker, _progress_q
    # Ctrl-C reaches the whole process group: the parent decides (its pool finishes the shards in flight)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _progress_q = progress_q
    _worker = factory(index_q.get())


def _process_progress(n: int) -> None:
    if _progress_q is not None:
        _progress_q.put(n)


def _run_in_process(task: ShardTask) -> dict[str, Any]:
    assert _worker is not None, "worker not initialised"
    return _worker(task, _process_progress)


def _run_process_pool(
    todo: Sequence[ShardTask], factory: WorkerFactory, workers: int, bar: Any, desc: str = ""
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    index_q = manager.Queue()
    progress_q = manager.Queue()
    n = min(workers, len(todo))
    for i in range(n):
        index_q.put(i)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Empty, EOFError, OSError):
                bar.update(progress_q.get(timeout=0.2))

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    results: list[dict[str, Any]] = []
    queued = deque(todo)
    running: dict[Future[dict[str, Any]], ShardTask] = {}
    failure: tuple[ShardTask, BaseException] | None = None
    pool = ProcessPoolExecutor(
        max_workers=n, mp_context=ctx, initializer=_init_process, initargs=(factory, index_q, progress_q)
    )
    try:
        # a task goes to the pool only when a worker is free: after a failure nothing queued starts
        while queued and len(running) < n:
            task = queued.popleft()
            running[pool.submit(_run_in_process, task)] = task
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                task = running.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    failure = failure or (task, exc)
                    queued.clear()
                    continue
                results.append(fut.result())
                finished(desc, len(results), todo)
                if queued:
                    nxt = queued.popleft()
                    running[pool.submit(_run_in_process, nxt)] = nxt
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        stop.set()
        drainer.join(timeout=2)
        manager.shutdown()
    if failure is not None:
        task, exc = failure
        raise shard_failure(task.key, exc) from exc
    return results


def resolve_device(device: str = "auto") -> str:
    """``auto`` picks ``cuda`` when a GPU is present, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_for_worker(devices: str, index: int) -> str:
    """The device of worker ``index`` given ``--devices`` (``auto``, ``all``, ``cpu`` or ``0,1,...``)."""
    if devices in ("cpu", "mps"):
        return devices
    import torch

    if devices in ("auto", "all"):
        count = torch.cuda.device_count()
        return f"cuda:{index % count}" if count else "cpu"
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids:
        return "cpu"
    chosen = ids[index % len(ids)]
    return chosen if chosen.startswith(("cuda", "cpu")) else f"cuda:{chosen}"


def count_workers(devices: str) -> int:
    """How many worker processes ``--devices`` asks for (one per GPU)."""
    if devices in ("cpu", "mps"):
        return 1
    if devices in ("auto", "all"):
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, len([d for d in devices.split(",") if d.strip()]))
