"""The trainer learns, resumes exactly after a kill, and trains the same on two ranks as on one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from synthetic_run import coco_items, make_summary_run
from tiny_models import caption_corpus, save_tiny_clip, save_tiny_gpt2

from icsd.backends.captioners import load_captioner
from icsd.config import PairsConfig, TrainConfig
from icsd.errors import UserError
from icsd.stages import pairs as pairs_stage
from icsd.stages import train as train_stage
from icsd.training.validation import caption_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}




@pytest.fixture(scope="module")
def items(coco_captions, coco_images):
    return coco_items(coco_captions, coco_images, 8)


def paired_run(root: Path, items, shard_size: int = 4):
    run = make_summary_run(root, items, shard_size=shard_size)
    pairs_stage.run(PairsConfig(), run)
    return run


def user_val_split(folder: Path, items) -> tuple[str, str]:
    """The training photos as a validation split (image folder + JSON-lines captions)."""
    images = folder / "images"
    images.mkdir(parents=True)
    lines = []
    for path, _, texts in items:
        (images / path.name).write_bytes(path.read_bytes())
        lines.append(json.dumps({"image": path.name, "captions": texts}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return str(images), str(folder / "captions.jsonl")


def training_bleu4(checkpoint: Path, items) -> tuple[float, list[str]]:
    captioner = load_captioner(str(checkpoint), "cpu")
    preds = captioner.caption([Image.open(p) for p, _, _ in items])
    return caption_scores(preds, [texts for _, _, texts in items])["BLEU-4"], preds


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run.train / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_preset_reproduces_its_training_captions(tmp_path, items):
    run = paired_run(tmp_path / "run", items)
    val_images, val_captions = user_val_split(tmp_path / "val", items)
    cfg = TrainConfig(
        preset="tiny", batch_size=8, max_steps=160, lr=5e-3, warmup_steps=5, augment=False, num_workers=0,
        val_images=val_images, val_captions=val_captions, eval_every=80, save_every=80, log_every=10,
    )  # fmt: skip
    result = train_stage.run(cfg, run)
    bleu4, preds = training_bleu4(run.train / "best", items)
    assert bleu4 >= 0.5, preds
    metrics = read_metrics(run)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] / 2
    vals = [m for m in metrics if "val_CIDEr" in m]
    assert [v["step"] for v in vals] == [80, 160]
    best = json.loads((run.train / "best" / "captioner.json").read_text())
    assert best["val"]["score"] == max(v["val_score"] for v in vals)
    assert best["val"]["score"] == best["val"]["CIDEr"] + best["val"]["BLEU-4"]
    assert result.counts["pairs"] == sum(len(t) for _, _, t in items) and result.counts["best_step"] in (80, 160)
    assert run.stage_entry("train")["counts"]["steps"] == 160
    assert (run.train / "last" / "optimizer.safetensors").exists()


def test_a_validation_score_of_zero_selects_nothing(tmp_path, items, monkeypatch):
    """When no check scores above 0, ``best/`` is the final weights, said so in a note; a checkpoint
    is never "best" on a score of zero."""
    from icsd.training import trainer

    zero = {"score": 0.0, "CIDEr": 0.0, "BLEU-4": 0.0}
    monkeypatch.setattr(trainer.Trainer, "validate", lambda self, cm, valset: dict(zero))
    run = paired_run(tmp_path / "run", items)
    val_images, val_captions = user_val_split(tmp_path / "val", items)
    cfg = TrainConfig(
        preset="tiny", batch_size=4, max_steps=4, warmup_steps=1, augment=False, num_workers=0,
        val_images=val_images, val_captions=val_captions, eval_every=2, save_every=2, log_every=2,
    )  # fmt: skip
    result = train_stage.run(cfg, run)
    assert "best_score" not in result.counts and "best_step" not in result.counts
    assert any("validation score was 0 at every check" in n and "not a selection" in n for n in result.notes)
    best = json.loads((run.train / "best" / "captioner.json").read_text())
    assert best["step"] == 4 and best["selection"] == "none"
    last = load_file(run.train / "last" / "model.safetensors")
    kept = load_file(run.train / "best" / "model.safetensors")
    assert last.keys() == kept.keys() and all(torch.equal(last[k], kept[k]) for k in last)
    assert [m["best"] for m in read_metrics(run) if "val_score" in m] == [False, False]


def test_prefix_preset_with_tiny_gpt2_reproduces_its_training_captions(tmp_path, items, coco_captions):
    parts = tmp_path / "parts"
    clip = save_tiny_clip(parts / "clip", image_size=64, patch=16)
    gpt2 = save_tiny_gpt2(parts / "gpt2", caption_corpus(coco_captions))
    run = paired_run(tmp_path / "run", items)
    cfg = TrainConfig(
        preset="prefix", vision_model=str(clip), text_model=str(gpt2), batch_size=8, max_steps=200, lr=5e-3,
        warmup_steps=5, num_workers=0, val_fraction=0, save_every=1000, log_every=25,
    )  # fmt: skip
    result = train_stage.run(cfg, run)
    feature_shards = sorted((run.train / "features").glob("shard-*.tar"))
    assert len(feature_shards) == 2 and all((f.with_suffix("").with_suffix(".done.json")).exists() for f in feature_shards)
    bleu4, preds = training_bleu4(run.train / "best", items)
    assert bleu4 >= 0.5, preds
    assert any("no validation split" in n for n in result.notes)


def train_args(run_root: Path, steps: int) -> list[str]:
    return ["train", "--run", str(run_root), "--preset", "tiny", "--device", "cpu", "--batch-size", "4",
            "--max-steps", str(steps), "--save-every", "4", "--log-every", "1", "--num-workers", "0",
            "--val-fraction", "0", "--lr", "2e-3", "--seed", "3"]  # fmt: skip


def config_from_args(args: list[str]) -> TrainConfig:
    opts = dict(zip(args[1::2], args[2::2], strict=False))
    return TrainConfig(
        preset="tiny", device="cpu", batch_size=4, max_steps=int(opts["--max-steps"]), save_every=4,
        log_every=1, num_workers=0, val_fraction=0, lr=2e-3, seed=3,
    )  # fmt: skip


def kill_after_checkpoint(args: list[str], state_file: Path, min_step: int) -> int:
    """Run `icsd train` in a subprocess and SIGKILL it once a checkpoint at ``min_step`` or later exists."""
    proc = subprocess.Popen([sys.executable, "-m", "icsd.cli", *args], env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state_file.read_text())["step"] >= min_step:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    return int(json.loads(state_file.read_text())["step"])


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, items):
    steps = 16
    args_b = train_args(tmp_path / "b", steps)
    paired_run(tmp_path / "b", items[:4], shard_size=2)
    killed_at = kill_after_checkpoint(args_b, tmp_path / "b" / "train" / "last" / "trainer_state.json", 4)
    assert 4 <= killed_at < steps

    run_a = paired_run(tmp_path / "a", items[:4], shard_size=2)
    train_stage.run(config_from_args(train_args(tmp_path / "a", steps)), run_a)
    from icsd.store import RunDir

    run_b = RunDir.at(tmp_path / "b")
    result = train_stage.run(config_from_args(args_b), run_b)
    assert any(f"at step {killed_at}" in n for n in result.notes)

    a = load_file(str(run_a.train / "last" / "model.safetensors"))
    b = load_file(str(run_b.train / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_file(str(run_a.train / "last" / "optimizer.safetensors"))
    opt_b = load_file(str(run_b.train / "last" / "optimizer.safetensors"))
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    ma, mb = read_metrics(run_a), read_metrics(run_b)
    assert [m["step"] for m in mb] == list(range(1, steps + 1))
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]

    # finished runs say so; other settings do not silently resume
    again = train_stage.run(config_from_args(args_b), run_b)
    assert any("already complete" in n for n in again.notes)
    with pytest.raises(UserError, match="other settings"):
        train_stage.run(config_from_args(args_b).model_copy(update={"lr": 1e-3}), run_b)


@pytest.mark.slow
def test_two_gloo_ranks_and_accumulation_follow_the_single_process_loss_curve(tmp_path, items):
    common = ["--preset", "tiny", "--device", "cpu", "--max-steps", "6", "--log-every", "1", "--save-every", "6",
              "--num-workers", "0", "--val-fraction", "0.25", "--eval-every", "6", "--data-streams", "2",
              "--lr", "2e-3"]  # fmt: skip
    run_one = paired_run(tmp_path / "one", items[:4], shard_size=2)
    paired_run(tmp_path / "two", items[:4], shard_size=2)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "icsd.cli", "train", "-r", str(tmp_path / "two"), "--batch-size", "2", *common]  # fmt: skip
    proc = subprocess.run(launch, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranks 2" in proc.stdout

    cfg = TrainConfig(preset="tiny", device="cpu", max_steps=6, log_every=1, save_every=6, num_workers=0,
                      val_fraction=0.25, eval_every=6, data_streams=2, lr=2e-3, batch_size=4)  # fmt: skip
    train_stage.run(cfg, run_one)
    from icsd.store import RunDir

    one = [m["loss"] for m in read_metrics(run_one) if "loss" in m]
    two = [m["loss"] for m in read_metrics(RunDir.at(tmp_path / "two")) if "loss" in m]
    val_one, val_two = ([m for m in read_metrics(r) if "val_CIDEr" in m] for r in (run_one, RunDir.at(tmp_path / "two")))
    assert [m["step"] for m in val_one] == [m["step"] for m in val_two] == [6]
    assert len(one) == len(two) == 6
    assert one[0] != one[-1]
    assert torch.allclose(torch.tensor(one), torch.tensor(two), rtol=1e-4, atol=1e-5), (one, two)
    w1 = load_file(str(run_one.train / "last" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "train" / "last" / "model.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)

    # two micro-batches of 2 accumulated into one step are the same global batch of 4
    run_accum = paired_run(tmp_path / "accum", items[:4], shard_size=2)
    train_stage.run(cfg.model_copy(update={"batch_size": 2, "grad_accum": 2}), run_accum)
    accum = [m["loss"] for m in read_metrics(run_accum) if "loss" in m]
    assert torch.allclose(torch.tensor(one), torch.tensor(accum), rtol=1e-4, atol=1e-5), (one, accum)
