"""A training interrupted anywhere resumes to exactly the run it would have been.

Each case trains a preset (the sandbox captioner, the tiny BERT captioner) for a few steps with
validations, checkpoints and logged windows that do not line up, and compares, bit for bit, an
uninterrupted run with one stopped by a real SIGINT or SIGTERM (raised in this process, at a point
drawn at random: inside a step, inside a validation, right after a checkpoint) and run again: final
weights, optimizer moments, ``best/`` weights and its record, every logged loss and validation
score.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from synthetic_run import coco_items, make_summary_run

from icsd import interrupt
from icsd.config import PairsConfig, TrainConfig
from icsd.stages import pairs as pairs_stage
from icsd.stages import train as train_stage
from icsd.store import RunDir
from icsd.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 9
SEED = 20261201


def settings(preset: str, root: Path) -> TrainConfig:
    # validations at 3, 6, 9; checkpoints at 4, 8, 9; records at 2, 4, 6, 8, 9: none line up
    return TrainConfig(
        preset=preset, device="cpu", batch_size=4, max_steps=STEPS, eval_every=3, save_every=4, log_every=2,
        num_workers=0, val_images=str(root / "val" / "images"), val_captions=str(root / "val" / "captions.jsonl"),
        beams=1, max_new_tokens=8, min_new_tokens=1, seed=5, lr=3e-3, warmup_steps=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, coco_captions: Path, coco_images: Path) -> Path:
    """A paired run (8 COCO photos as rendered images, 2 shards) and a validation split beside it."""
    root = tmp_path_factory.mktemp("resume")
    items = coco_items(coco_captions, coco_images, 8)
    run = make_summary_run(root / "run", items, shard_size=4)
    pairs_stage.run(PairsConfig(), run)
    images = root / "val" / "images"
    images.mkdir(parents=True)
    lines = []
    for path, _, texts in items[:4]:
        shutil.copy(path, images / path.name)
        lines.append(json.dumps({"image": path.name, "captions": texts}))
    (root / "val" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def outcome(run: RunDir) -> dict[str, Any]:
    train = run.train
    best_info = json.loads((train / "best" / "captioner.json").read_text())
    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    timeless = [{k: v for k, v in m.items() if k not in ("samples_per_s", "data_wait_frac")} for m in metrics]
    return {
        "last": load_file(str(train / "last" / "model.safetensors")),
        "optimizer": load_file(str(train / "last" / "optimizer.safetensors")),
        "best": load_file(str(train / "best" / "model.safetensors")),
        "best_info": {k: best_info.get(k) for k in ("step", "val")},
        "metrics": timeless,
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for part in ("last", "optimizer", "best"):
        assert a[part].keys() == b[part].keys()
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part}: {differ[:3]}"
    assert a["best_info"] == b["best_info"]
    assert a["metrics"] == b["metrics"]


@pytest.fixture(scope="module")
def uninterrupted(base: Path) -> Callable[[str], dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}

    def get(preset: str) -> dict[str, Any]:
        if preset not in done:
            run = RunDir.at(shutil.copytree(base / "run", base / f"whole-{preset}"))
            train_stage.run(settings(preset, base), run)
            done[preset] = outcome(run)
        return done[preset]

    return get


@pytest.fixture
def signal_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, int, int], None]]:
    """``signal_at(where, step, signum)``: raise a real signal in this process inside step ``step``
    (while its batch is read), inside the validation of ``step`` or right after the checkpoint of ``step``."""

    def arm(where: str, step: int, signum: int) -> None:
        fired = {"done": False}

        def fire() -> None:
            if not fired["done"]:
                fired["done"] = True
                signal.raise_signal(signum)

        if where == "step":
            original_next = Trainer.next_micro
            calls = {"n": 0}

            def next_micro(self: Trainer, *args: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == step:  # batch size 1 micro-batch per step: call n is step n
                    fire()
                return original_next(self, *args)

            monkeypatch.setattr(Trainer, "next_micro", next_micro)
        elif where == "validation":
            original_validate = Trainer.validate

            def validate(self: Trainer, cm: Any, valset: Any) -> Any:
                scores = original_validate(self, cm, valset)
                if self.current == step:
                    fire()  # the captions are done: the scores are dropped with the rest
                return scores

            def evaluate_and_keep(self: Trainer, cm: Any, valset: Any, at: int, best: Any) -> Any:
                self.current = at
                return original_keep(self, cm, valset, at, best)

            original_keep = Trainer.evaluate_and_keep
            monkeypatch.setattr(Trainer, "validate", validate)
            monkeypatch.setattr(Trainer, "evaluate_and_keep", evaluate_and_keep)
        else:
            original_save = Trainer.save_last

            def save_last(self: Trainer, at: int, *args: Any) -> None:
                original_save(self, at, *args)
                if at == step:
                    fire()

            monkeypatch.setattr(Trainer, "save_last", save_last)

    yield arm
    interrupt.reset()


CASES = [
    ("sandbox", "step", signal.SIGINT),
    ("sandbox", "validation", signal.SIGTERM),
    ("sandbox", "checkpoint", signal.SIGINT),
    ("tiny", "step", signal.SIGTERM),
    ("tiny", "validation", signal.SIGINT),
    ("tiny", "checkpoint", signal.SIGTERM),
]
POINTS = {"step": [s for s in range(1, STEPS) if s % 4], "validation": [3, 6, 9], "checkpoint": [4, 8]}


@pytest.mark.parametrize(("preset", "where", "signum"), CASES, ids=[f"{p}-{w}" for p, w, _ in CASES])
def test_a_training_interrupted_anywhere_resumes_to_the_uninterrupted_run(
    base: Path,
    tmp_path: Path,
    uninterrupted: Callable[[str], dict[str, Any]],
    signal_at: Callable[[str, int, int], None],
    monkeypatch: pytest.MonkeyPatch,
    preset: str,
    where: str,
    signum: int,
) -> None:
    step = random.Random(f"{SEED}-{preset}-{where}").choice(POINTS[where])
    run = RunDir.at(shutil.copytree(base / "run", tmp_path / "run"))
    cfg = settings(preset, base)
    signal_at(where, step, signum)
    with pytest.raises(interrupt.Interrupted) as stopped:
        train_stage.run(cfg, run)
    assert stopped.value.signum == signum
    state = json.loads((run.train / "last" / "trainer_state.json").read_text())
    assert state["step"] == step, (where, step)  # stopped where it was, the step in flight finished
    assert state.get("validation_pending", False) == (where == "validation")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back

    monkeypatch.undo()
    resumed = train_stage.run(cfg, run)
    assert any(f"at step {step}" in note for note in resumed.notes)
    assert_same(outcome(run), uninterrupted(preset))
