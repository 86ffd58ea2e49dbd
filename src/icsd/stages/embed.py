"""Stage 2, embed: every caption to an L2-normalised float32 vector, in parts with done-markers.

Parts of ``part_size`` captions are the unit of work and of resume: a part whose marker exists and
matches the captions it covers and the model is skipped; the rest are (re)computed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import EmbedConfig
from ..errors import UserError
from ..executor import Progress, ShardTask, Worker, device_for_worker, run_tasks
from ..records import embeddings_table
from ..store import RunDir, mark_done, read_parquet, remove_stale_parts, write_parquet
from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage, multi_context

if TYPE_CHECKING:
    from ..rehearse.hooks import Row, StageRehearsal


@dataclass(frozen=True)
class EmbedPayload:
    ids: list[str]
    texts: list[str]


def part_hash(ids: list[str], texts: list[str]) -> str:
    h = hashlib.sha256()
    for cid, text in zip(ids, texts, strict=True):
        h.update(cid.encode("utf-8") + b"\x00" + text.encode("utf-8") + b"\x01")
    return h.hexdigest()[:16]


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def make_tasks(ids: list[str], texts: list[str], cfg: EmbedConfig, folder: Path) -> list[ShardTask]:
    tasks = []
    for i, start in enumerate(range(0, len(ids), cfg.part_size)):
        pid, ptext = ids[start : start + cfg.part_size], texts[start : start + cfg.part_size]
        tasks.append(
            ShardTask(
                key=part_name(i),
                output=folder / part_name(i),
                size=len(pid),
                payload=EmbedPayload(pid, ptext),
                expect={"input_hash": part_hash(pid, ptext), "model": cfg.model, "kind": cfg.kind},
            )
        )
    return tasks


@dataclass(frozen=True)
class EmbedWorkerFactory:
    """Builds one embedder per worker process (picklable for the process pool and Ray)."""

    model: str
    kind: str
    device: str
    batch_size: int

    def __call__(self, index: int) -> Worker:
        from ..backends.embedders import load_embedder

        device = device_for_worker(self.device, index) if self.device in ("auto", "all") else self.device
        embedder = load_embedder(self.model, kind=self.kind, device=device, batch_size=self.batch_size)

        def work(task: ShardTask, progress: Progress) -> dict[str, Any]:
            payload: EmbedPayload = task.payload
            vectors = embedder.embed(payload.texts, progress=progress)
            write_parquet(embeddings_table(payload.ids, vectors), task.output)
            mark_done(task.output, {**task.expect, "rows": len(payload.ids), "dim": int(vectors.shape[1])})
            return {"part": task.key, "rows": len(payload.ids), "dim": int(vectors.shape[1]), **embedder.describe()}

        return work


def run(cfg: EmbedConfig, run: RunDir) -> StageResult:
    timer = Timer()
    table = read_parquet(run.captions, "captions.parquet (run `icsd ingest` first)")
    ids = table.column("caption_id").to_pylist()
    texts = table.column("text").to_pylist()
    if not ids:
        raise UserError(f"{run.captions} holds no captions")
    folder = run.embeddings
    folder.mkdir(parents=True, exist_ok=True)
    tasks = make_tasks(ids, texts, cfg, folder)
    remove_stale_parts(folder, keep={t.output.name for t in tasks}, pattern="part-*.parquet")
    factory = EmbedWorkerFactory(cfg.model, cfg.kind, cfg.device, cfg.batch_size)
    result = run_tasks(
        tasks,
        factory,
        executor=cfg.executor,
        workers=cfg.workers,
        desc="embed",
        unit="cap",
        address=cfg.address,
    )
    dims = {r["dim"] for r in result.results}
    model_info = next((r for r in result.results), {"name": cfg.model})
    counts = {
        "captions": len(ids),
        "parts": len(tasks),
        "parts_computed": result.ran,
        "parts_skipped": result.skipped,
        "captions_per_s": round(sum(r["rows"] for r in result.results) / max(result.seconds, 1e-9), 1),
    }
    if len(dims) > 1:
        raise UserError(f"embedding parts disagree on dimension {sorted(dims)}; rerun with a clean {folder}")
    return finish_stage(
        run,
        "embed",
        cfg,
        counts=counts,
        seconds=timer.seconds,
        output=folder,
        models={"embedder": {k: v for k, v in model_info.items() if k not in ("part", "rows") and k[0] != "_"}},
    )


# ----------------------------------------------------------------------------- rehearsal


def _rehearsal_models(ctx: StageRehearsal) -> None:
    ctx.need("text embedder", "model", ctx.configured.model, "embed")


def _rehearsal_project(ctx: StageRehearsal) -> Row:
    from ..rehearse.hooks import parquet_rows, per

    assert ctx.record is not None
    captions = parquet_rows(ctx.run.captions) or 1
    full = int(ctx.size("captions") or 0)
    tower = ctx.probe("text_embedding")
    spu = per(tower.seconds, tower.items) or per(ctx.record.seconds, captions)
    architecture, parameters = ctx.architecture("model")
    cfg = ctx.configured
    return ctx.row(architecture=architecture, parameters=parameters,
                   settings={"kind": cfg.kind, "batch_size": cfg.batch_size, "device": cfg.device},
                   unit="caption", units=captions, seconds_per_unit=spu, full_units=full,
                   projected_seconds=(spu or 0) * full, projection="text-tower seconds per caption x corpus captions")  # fmt: skip


SPEC = StageSpec(
    name="embed",
    wanted=multi_context,
    report_counts=(("captions", "captions embedded"),),
    rehearsal=RehearsalHooks(models=_rehearsal_models, project=_rehearsal_project),
    config=EmbedConfig,
    run=run,
    inputs=lambda cfg, run: [run.captions],
    outputs=lambda run: [run.embeddings],
    summary="Embed every caption (L2-normalised float32) into RUN/embeddings/ parts.",
    examples=(
        "icsd embed --run runs/coco",
        "icsd embed --run runs/coco --model openai/clip-vit-base-patch16 --device cuda --batch-size 1024",
        "icsd embed -c configs/icsd_coco.yaml -r runs/coco --embed.batch_size 512",
    ),
)
