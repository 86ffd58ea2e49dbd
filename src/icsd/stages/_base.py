"""What every stage shares: its result type and how a finished stage is recorded."""

from __future__ import annotations

import time
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
    inputs: list[Path],
    counts: dict[str, Any],
    seconds: float,
    output: Path | None,
    models: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> StageResult:
    """Save the stage's resolved config and its manifest entry; return its result."""
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
