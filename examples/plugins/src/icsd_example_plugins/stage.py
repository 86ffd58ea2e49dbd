"""``icsd wordstats``: word statistics of the ingested corpus, in ``RUN/wordstats.json``.

It reads only what the ingest stage wrote (``RUN/captions.parquet``) and writes one file, so
``icsd run`` skips it while the corpus and its settings are unchanged.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field

from icsd.config import StageConfig
from icsd.records import Caption, from_table
from icsd.stages import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage
from icsd.store import RunDir, atomic_write_json, read_parquet

OUTPUT = "wordstats.json"


class CaptionStatsConfig(StageConfig):
    top: int = Field(default=10, ge=1, description="Most frequent words listed.")
    min_length: int = Field(default=1, ge=1, description="Shortest word counted, in letters.")


def run(cfg: CaptionStatsConfig, run: RunDir) -> StageResult:
    timer = Timer()
    captions = from_table(read_parquet(run.captions, "captions"), Caption)
    words = Counter(
        w for c in captions for w in re.findall(r"[a-z]+", c.text.lower()) if len(w) >= cfg.min_length
    )
    lengths = [len(c.text.split()) for c in captions]
    stats = {
        "captions": len(captions),
        "vocabulary": len(words),
        "mean_words": round(sum(lengths) / max(1, len(lengths)), 3),
        "top": words.most_common(cfg.top),
    }
    atomic_write_json(run.root / OUTPUT, stats)
    counts = {"captions": len(captions), "vocabulary": len(words)}
    return finish_stage(run, "wordstats", cfg, counts=counts, seconds=timer.seconds, output=run.root / OUTPUT)


def _inputs(cfg: CaptionStatsConfig, run: RunDir) -> list[Path]:
    return [run.captions]


def _project(ctx: Any) -> Any:
    """Its row of ``icsd run CONFIG --rehearse`` (``ctx``: ``icsd.rehearse.hooks.StageRehearsal``):
    the full corpus, whose size the ingest stage's hook filled in, at the slice's speed."""
    counted = int(ctx.record.counts.get("captions", 0))
    full = int(ctx.size("captions") or 0)
    seconds = ctx.record.seconds / counted if counted else None
    return ctx.row(unit="caption", units=counted, seconds_per_unit=seconds, full_units=full,
                   projected_seconds=(seconds or 0.0) * full, projection="seconds per caption x corpus captions")  # fmt: skip


SPEC = StageSpec(
    name="wordstats",
    config=CaptionStatsConfig,
    run=run,
    inputs=_inputs,
    outputs=lambda run: [run.root / OUTPUT],
    summary="Word statistics of the ingested captions into RUN/wordstats.json.",
    examples=("icsd wordstats --run runs/demo --top 5",),
    report_counts=(("captions", "captions counted"), ("vocabulary", "distinct words")),
    rehearsal=RehearsalHooks(project=_project),
)
