"""The executors' one failure policy: a failed shard stops what is queued, names itself in one line,
and keeps the shards that finished. Counts come from marker files the tasks write, never from time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from icsd.errors import UserError
from icsd.executor import ShardFailed, ShardTask, run_tasks

TASKS = 10
FAILING = "t01"


@dataclass(frozen=True)
class MarkerFactory:
    """Picklable (the process pool ships it by reference). Every task writes ``started-KEY``; the
    task ``fail`` raises; with ``hold`` the others finish only once that failure's marker exists,
    so no task can complete before the failure happened."""

    folder: str
    fail: str
    hold: bool = False
    error: str = "value"

    def __call__(self, index: int) -> Any:
        return self.run

    def run(self, task: ShardTask, progress: Any) -> dict[str, Any]:
        folder = Path(self.folder)
        (folder / f"started-{task.key}").touch()
        if task.key == self.fail:
            if self.error == "user":
                raise UserError("model not found: nowhere")
            raise ValueError("boom on purpose\nsecond line")
        if self.hold:
            deadline = time.monotonic() + 120  # only a guard against hanging forever
            while not (folder / f"started-{self.fail}").exists():
                assert time.monotonic() < deadline, "the failing task never started"
                time.sleep(0.01)
        task.output.write_text("done")
        progress(task.size)
        return {"key": task.key}


def make_tasks(folder: Path) -> list[ShardTask]:
    return [ShardTask(key=f"t{i:02d}", output=folder / f"t{i:02d}.out", size=1) for i in range(TASKS)]


def started(folder: Path) -> list[str]:
    return sorted(p.name.removeprefix("started-") for p in folder.glob("started-*"))


def test_inline_stops_at_the_failed_shard_and_names_it(tmp_path: Path) -> None:
    with pytest.raises(ShardFailed) as info:
        run_tasks(make_tasks(tmp_path), MarkerFactory(str(tmp_path), FAILING), quiet=True)
    assert str(info.value) == "shard t01 failed: ValueError: boom on purpose"
    assert info.value.key == FAILING and isinstance(info.value.__cause__, ValueError)
    assert started(tmp_path) == ["t00", "t01"]
    assert (tmp_path / "t00.out").exists()


def test_a_user_error_stays_one_with_the_shard_in_front(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^shard t01: model not found: nowhere$"):
        run_tasks(make_tasks(tmp_path), MarkerFactory(str(tmp_path), FAILING, error="user"), quiet=True)


def test_process_pool_cancels_the_queued_shards_after_a_failure(tmp_path: Path) -> None:
    """Two worker processes, ten shards, the second fails. Before the failure policy every queued
    shard still ran before the error surfaced (ten started); now the shards queued behind it never
    start: only the two first ones and at most what a free worker took before the failure arrived."""
    factory = MarkerFactory(str(tmp_path), FAILING, hold=True)
    with pytest.raises(ShardFailed, match=r"^shard t01 failed: ValueError: boom on purpose$"):
        run_tasks(make_tasks(tmp_path), factory, executor="process", workers=2, quiet=True)
    ran = started(tmp_path)
    assert ran[:2] == ["t00", "t01"] and len(ran) <= 4, ran
    # what finished is kept: every started shard but the failed one wrote its output
    assert sorted(p.stem for p in tmp_path.glob("*.out")) == [k for k in ran if k != FAILING]
