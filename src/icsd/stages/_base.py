"""What every stage shares: its result type and how a finished stage is recorded."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import StageConfig
from ..store import RunDir, input_hashes, manifest_entry


@dataclass
class StageResult:
    """What a stage did: counts for the closing line and the manifest, and where output went."""

    stage: str
    counts: dict[str, Any]
    seconds: float
    output: Path | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        where = f" -> {self.output}" if self.output else ""
        return f"{self.stage}: {counts} in {self.seconds:.1f}s{where}"


@dataclass(frozen=True)
class RehearsalHooks:
    """How ``icsd run CONFIG --rehearse`` treats a stage; each hook takes the stage's
    :class:`icsd.rehearse.hooks.StageRehearsal`. ``models`` names the models the stage loads (built
    with random weights), ``reduce`` cuts the stage's block of the rehearsal config to a slice,
    ``project`` returns its row of the plan (``ctx.row(...)``) and fills in the full run's sizes
    that later stages read. A stage without them runs as configured and is projected as measured."""

    models: Callable[[Any], None] | None = None
    reduce: Callable[[Any], None] | None = None
    project: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class StageSpec:
    """Everything the rest of icsd knows about a stage, declared once in the stage's module.

    ``inputs(cfg, run)`` are the files whose hashes decide whether ``icsd run`` must rerun it (and
    that its manifest entry records); ``outputs(run)`` are what it writes: ``icsd run`` skips the
    stage only while all of them exist, and ``--force`` removes them first. ``prepare(cfg, run,
    changed)`` fills in what only the chain knows (a fresh start for training whose inputs changed,
    the checkpoint to evaluate). ``summary`` and ``examples`` are the command's ``--help``;
    ``arguments`` names config fields taken as positional arguments (``icsd ingest CORPUS``).
    ``wanted(pipeline_cfg)`` says whether ``icsd run`` runs the stage under a whole-chain config
    (default: always). A command that may run without a run directory sets ``run_optional``, its
    own extra file options in ``file_options`` (``(name, help)``: ``--name PATH``) and ``main(cfg,
    run_dir_or_None, {name: path})``, which it calls instead of ``run``; a result with a ``table``
    attribute has it printed before the closing line. ``rehearsal`` holds the stage's
    :class:`RehearsalHooks`; ``report_counts`` the manifest counts the report's table shows, as
    ``(count, label)``.
    """

    name: str
    config: type[StageConfig]
    run: Callable[[Any, RunDir], StageResult]
    inputs: Callable[[Any, RunDir], list[Path]]
    outputs: Callable[[RunDir], list[Path]]
    summary: str
    examples: tuple[str, ...] = ()
    prepare: Callable[[Any, RunDir, bool], Any] | None = None
    arguments: tuple[str, ...] = ()
    always_rerun: bool = False
    wanted: Callable[[Any], bool] | None = None
    run_optional: bool = False
    file_options: tuple[tuple[str, str], ...] = ()
    main: Callable[[Any, Path | None, dict[str, Any]], StageResult] | None = None
    rehearsal: RehearsalHooks = RehearsalHooks()
    report_counts: tuple[tuple[str, str], ...] = ()


def multi_context(pipeline_cfg: Any) -> bool:
    """False for the uni-context baseline (one image per original caption, paired only with it),
    which needs no embedding, grouping or LLM."""
    uni = pipeline_cfg.render.prompts == "captions" and set(pipeline_cfg.pairs.kinds) == {"uni"}
    return not uni


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def finish_stage(
    run: RunDir,
    stage: str,
    cfg: StageConfig,
    *,
    counts: dict[str, Any],
    seconds: float,
    output: Path | None,
    models: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> StageResult:
    """Save the stage's resolved config and its manifest entry (with the inputs its spec names);
    return its result."""
    from . import stage_spec

    inputs = stage_spec(stage).inputs(cfg, run)
    resolved = cfg.resolved()
    run.save_stage_config(stage, resolved)
    run.update_manifest(
        stage,
        manifest_entry(
            config=resolved,
            inputs=input_hashes(*inputs),
            counts=counts,
            seconds=seconds,
            models=models,
            extra=extra,
        ),
    )
    return StageResult(stage=stage, counts=counts, seconds=seconds, output=output, notes=notes or [])
