"""Train a captioner on the synthetic pairs only (method step 7).

Reads ``RUN/pairs.parquet`` and the render shards; writes ``RUN/train/``:

- ``last/``: the newest checkpoint (``save_pretrained`` model folder + optimizer, scheduler, RNG
  states and data position), from which a rerun of the same command resumes;
- ``best/``: the weights with the best CIDEr + BLEU-4 on the validation split (or the final
  weights when there is no validation split, or no check scored above 0);
- ``metrics.jsonl`` (and ``tensorboard/`` when asked).

Runs as one process, or as one process per GPU under ``torchrun`` / ``accelerate launch`` (the
ranks split the data streams; see :mod:`icsd.training.data`). The loop itself lives in
:mod:`icsd.training.trainer`, imported only when the stage runs: declaring the stage (for the
CLI's options and ``--help``) costs no torch import.
"""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..store import RunDir
from ._base import RehearsalHooks, StageResult, StageSpec


def run(cfg: TrainConfig, run: RunDir) -> StageResult:
    import os

    from ..data.cards import write_model_cards
    from ..training import trainer

    result = trainer.run(cfg, run)
    if os.environ.get("RANK", "0") == "0":
        write_model_cards(run.root)  # README.md beside train/best and train/last
    return result


def _prepare(cfg: TrainConfig, run: RunDir, changed: bool) -> TrainConfig:
    """Under ``icsd run``: a training whose settings or data changed since it finished starts over."""
    return cfg.model_copy(update={"restart": True}) if changed else cfg


def _rehearsal(hook: str) -> Any:
    """A hook of :mod:`icsd.training.rehearsal`, imported when the rehearsal calls it."""

    def call(ctx: Any) -> Any:
        from ..training import rehearsal

        return getattr(rehearsal, hook)(ctx)

    return call


SPEC = StageSpec(
    name="train",
    report_counts=(("steps", "steps"), ("pairs", "pairs")),
    config=TrainConfig,
    rehearsal=RehearsalHooks(
        models=_rehearsal("models"), reduce=_rehearsal("reduce"), project=_rehearsal("project")
    ),
    run=run,
    inputs=lambda cfg, run: [run.pairs, run.images],
    outputs=lambda run: [run.train],
    prepare=_prepare,
    summary="Train a captioner on RUN/pairs.parquet; checkpoints in RUN/train/ (resumes from RUN/train/last).",
    examples=(
        "icsd train --run runs/coco --val-images coco/val2014 --val-captions dataset_coco.json",
        "icsd train --run runs/demo --preset tiny --max-steps 200 --device cpu",
        "icsd train --run runs/coco --preset prefix --text-model gpt2 --batch-size 128",
        "icsd train --run runs/coco --data-order official --group-captions --bf16   # vision encoder once per image",
        "One process per GPU (the same command resumes after a stop; --restart starts over). Under "
        "torchrun/accelerate write -r RUN and -c FILE: their parsers take --run/--config as their own. "
        "The run's own RUN/config.yaml (written by `icsd run CONFIG`) is read first, so -c is only "
        "needed for a run made stage by stage.",
        "torchrun --nproc_per_node 8 -m icsd.cli train -r runs/coco",
        "accelerate launch --multi_gpu --num_processes 8 -m icsd.cli train -r runs/coco",
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 "
        "-m icsd.cli train -r /shared/runs/coco -c configs/icsd_coco.yaml",
    ),
)
