"""One writer per run folder and stage, and what a command does on SIGINT / SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic_run import coco_items, make_summary_run

from icsd import interrupt, locks
from icsd.config import PairsConfig
from icsd.stages import pairs as pairs_stage

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HOLD = (
    "import sys, time\n"
    "from icsd import locks\n"
    "with getattr(locks, sys.argv[1])(sys.argv[2], *sys.argv[3:]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def holder(kind: str, run: Path, *args: str) -> subprocess.Popen[str]:
    """A process holding ``locks.<kind>(run, *args)`` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(run), *args], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def icsd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "icsd.cli", *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def test_a_second_icsd_run_on_a_folder_in_use_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stages": {"ingest": {"complete": True}}}))
    proc = holder("run_writer", run)
    try:
        start = time.monotonic()
        second = icsd("run", "--run", str(run))
        assert time.monotonic() - start < 30
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 75 and len(lines) == 1, second.stderr
        assert f"pid {proc.pid} on {socket.gethostname()} since " in lines[0] and "in use by" in lines[0], lines[0]
        # a stage command cannot write beside it either; a reader does not wait
        stage = icsd("pairs", "--run", str(run))
        assert stage.returncode == 75 and f"pid {proc.pid}" in stage.stderr
        from icsd.compare import compare_rows

        start = time.monotonic()
        compare_rows([run], None)
        assert time.monotonic() - start < 10
    finally:
        proc.kill()
        proc.wait()
    # the holder is gone (killed: its record is still in the file): the lock is taken over
    assert json.loads((run / ".locks" / "run.lock").read_text())["pid"] == proc.pid
    with locks.run_writer(run):
        assert json.loads((run / ".locks" / "run.lock").read_text())["pid"] == os.getpid()
    assert (run / ".locks" / "run.lock").read_text() == ""  # released: no record left


def test_one_writer_per_stage_other_stages_go_on(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = holder("stage_writer", run, "embed")
    try:
        with pytest.raises(locks.LockHeld, match=f"embed in {run} is in use by pid {proc.pid}"):
            with locks.stage_writer(run, "embed"):
                pass
        with locks.stage_writer(run, "render"):  # another stage's output: no conflict
            pass
        with pytest.raises(locks.LockHeld, match=f"run folder {run} is in use by pid {proc.pid}"):
            with locks.run_writer(run):  # named through the stage lock it holds
                pass
    finally:
        proc.kill()
        proc.wait()
    with locks.run_writer(run), locks.stage_writer(run, "embed"):  # `icsd run` running a stage
        pass


def test_a_second_signal_exits_at_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    interrupt.reset()
    try:
        with interrupt.deferred():
            interrupt._handle(signal.SIGTERM, None)  # deferred: recorded only
            assert interrupt.pending() and not exits
            with pytest.raises(SystemExit):
                interrupt._handle(signal.SIGINT, None)
        assert exits == [143]  # the code of the first signal
        assert "exiting now" in capsys.readouterr().err
    finally:
        interrupt.reset()


@pytest.fixture
def paired(tmp_path: Path, coco_captions: Path, coco_images: Path) -> Path:
    run = make_summary_run(tmp_path / "run", coco_items(coco_captions, coco_images, 4), shard_size=2)
    pairs_stage.run(PairsConfig(), run)
    return run.root


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_train_command_says_where_it_stopped_and_the_rerun_what_it_resumes(
    paired: Path, signum: int, code: int
) -> None:
    args = ["train", "--run", str(paired), "--preset", "tiny", "--device", "cpu", "--batch-size", "4",
            "--max-steps", "60", "--save-every", "1000", "--log-every", "1", "--num-workers", "0",
            "--val-fraction", "0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "icsd.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = paired / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(metrics.read_text().splitlines() if metrics.exists() else []) < 3:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    state = json.loads((paired / "train" / "last" / "trainer_state.json").read_text())
    name = signal.Signals(signum).name
    assert last.startswith(f"interrupted at train step {state['step']} of 60 ") and f"({name})" in last, last
    assert "run the same command to resume" in last and "Traceback" not in err
    assert (paired / ".locks" / "train.lock").read_text() == ""  # released

    again = icsd(*args)
    assert again.returncode == 0, again.stderr
    assert f"train: resuming from {paired / 'train' / 'last'} at step {state['step']}" in again.stderr
