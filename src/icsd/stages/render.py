"""Render stage: one image per ok summary (or per corpus caption) into webdataset shards.

``main`` shape of img2dataset: read and validate the items, plan the shards (a pure function of
the sorted item list and the shard size), drop the shards already done, hand the rest to the
executor with one worker per device. A worker renders its shard batch by batch while a CPU thread
encodes the images and appends them to the tar; the tar is renamed into place when complete and
its done-marker written last, so a killed run loses at most the shard in flight.
"""

from __future__ import annotations

import io
import os
import queue
import random
import tarfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends.registry import T2I_BACKENDS
from ..backends.t2i import (
    Rendered,
    T2IOptions,
    T2IPipeline,
    cached_pipeline,
    item_seed,
)
from ..config import RenderConfig
from ..errors import UserError
from ..executor import ExecutorKind, ShardTask, count_workers, device_for_worker, run_tasks
from ..records import Caption, SampleMeta, Selection, from_table, iter_batches
from ..store import (
    RunDir,
    atomic_path,
    hash_obj,
    mark_done,
    read_marker,
    read_parquet,
    remove_stale_parts,
    safe_key,
)
from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage

if TYPE_CHECKING:
    from ..rehearse.hooks import Row, StageRehearsal

STAGE = "render"
SHARD_PATTERN = "shard-*.tar"
UNTRAINED_NOTE = (
    "note: images come from an untrained tiny random-weight model; "
    "pass --model <id or path> without --tiny-random for real images"
)


@dataclass(frozen=True)
class RenderItem:
    item_id: str
    prompt: str


@dataclass(frozen=True)
class RenderSettings:
    """Everything that fixes an item's pixels and sample JSON (batch size and devices do not)."""

    model: str
    prompt_source: str
    scheduler: str
    steps: int
    guidance: float
    width: int
    height: int
    negative_prompt: str | None
    dtype: str
    seed: int
    image_format: str
    quality: int
    safety_checker: bool
    untrained: bool

    def hash(self) -> str:
        return hash_obj(asdict(self))


# ----------------------------------------------------------------------------- items


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def summary_items(run: RunDir) -> list[RenderItem]:
    if not run.selections.exists():
        raise UserError(
            f"selections not found: {run.selections} (run `icsd summarize --run {run.root}` first)"
        )
    rows = from_table(read_parquet(run.selections, "selections"), Selection)
    items = [
        RenderItem(r.group_id, r.summary.strip())
        for r in rows
        if r.status == "ok" and r.summary and r.summary.strip()
    ]
    if not items:
        raise UserError(f"no ok summaries to render in {run.selections} ({len(rows)} rows)")
    return items


def caption_items(run: RunDir) -> list[RenderItem]:
    if not run.captions.exists():
        raise UserError(
            f"captions not found: {run.captions} (run `icsd ingest CORPUS --run {run.root}` first)"
        )
    rows = from_table(read_parquet(run.captions, "captions"), Caption)
    items = [RenderItem(r.caption_id, r.text.strip()) for r in rows if r.text and r.text.strip()]
    if not items:
        raise UserError(f"no captions to render in {run.captions}")
    return items


def choose_items(
    items: Sequence[RenderItem], *, limit: int | None, sample: int | None, seed: int
) -> list[RenderItem]:
    """Sorted by id; then the first ``limit`` or a seeded random ``sample`` of them (kept sorted)."""
    if limit is not None and sample is not None:
        raise UserError("use --limit or --sample, not both")
    ordered = sorted(items, key=lambda it: it.item_id)
    duplicates = [a.item_id for a, b in zip(ordered, ordered[1:], strict=False) if a.item_id == b.item_id]
    if duplicates:
        raise UserError(f"duplicate item ids in the input, e.g. {duplicates[0]!r}")
    if sample is not None and sample < len(ordered):
        picked = random.Random(seed).sample(range(len(ordered)), sample)
        return [ordered[i] for i in sorted(picked)]
    return ordered[:limit] if limit is not None else ordered


def plan_shards(items: Sequence[RenderItem], shard_size: int) -> list[list[RenderItem]]:
    """Consecutive slices of the sorted items: the same input always gives the same shards."""
    return [list(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


def items_hash(items: Sequence[RenderItem]) -> str:
    return hash_obj([[it.item_id, it.prompt] for it in items])


# ----------------------------------------------------------------------------- samples and tar writing


def sample_meta(item: RenderItem, settings: RenderSettings, nsfw: bool | None, checker_on: bool) -> SampleMeta:
    """The sample's ``.json`` record (see :class:`icsd.records.SampleMeta`)."""
    return SampleMeta(
        id=item.item_id,
        prompt_source=settings.prompt_source,
        summary=item.prompt,
        seed=item_seed(settings.seed, item.item_id),
        model=settings.model,
        scheduler=settings.scheduler,
        steps=settings.steps,
        guidance=settings.guidance,
        width=settings.width,
        height=settings.height,
        negative_prompt=settings.negative_prompt,
        nsfw=bool(nsfw) if checker_on and nsfw is not None else None,
        safety_checker=checker_on,
        untrained=settings.untrained,
    )


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if image_format == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


_DONE = object()
# Members carry a fixed time, so the same items and settings always give the same shard bytes.
SHARD_MTIME = 0


class TarSink:
    """Encodes images and appends samples to one tar on a background thread, so that the device
    renders the next batch meanwhile. ``put`` blocks when two batches are already waiting."""

    def __init__(self, path: Path, image_format: str, quality: int) -> None:
        self.path = path
        self.image_format = image_format
        self.quality = quality
        self.count = 0
        self.nsfw = 0
        self._mtime = SHARD_MTIME
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)
        self._thread = threading.Thread(target=self._drain, name="render-tar-writer", daemon=True)
        self._thread.start()

    def put(self, samples: list[tuple[str, np.ndarray, SampleMeta]]) -> None:
        self._raise_if_failed()
        self._queue.put(samples)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self.path.name} failed: {self._error}") from self._error

    def _drain(self) -> None:
        while True:
            samples = self._queue.get()
            if samples is _DONE:
                return
            if self._error is not None:
                continue
            try:
                for key, pixels, meta in samples:
                    _add_member(
                        self._tar,
                        f"{key}.{self.image_format}",
                        encode_image(pixels, self.image_format, self.quality),
                        self._mtime,
                    )
                    _add_member(
                        self._tar,
                        f"{key}.json",
                        meta.to_json(),
                        self._mtime,
                    )
                    self.count += 1
                    self.nsfw += bool(meta.nsfw)
            except BaseException as exc:  # reported to the rendering thread on its next put/close
                self._error = exc

    def close(self) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        self._tar.close()
        self._raise_if_failed()

    def __enter__(self) -> TarSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        self._error = self._error or exc
        self._queue.put(_DONE)
        self._thread.join()
        self._tar.close()


# ----------------------------------------------------------------------------- the worker


def render_shard(
    pipeline: T2IPipeline, settings: RenderSettings, batch_size: int, task: ShardTask, progress: Any
) -> dict[str, Any]:
    """Render one shard: tar to a temp name, rename when complete, then the done-marker."""
    items: list[RenderItem] = task.payload
    start = time.perf_counter()
    checker_on = pipeline.has_safety_checker
    with atomic_path(task.output) as tmp, TarSink(tmp, settings.image_format, settings.quality) as sink:
        for batch in iter_batches(items, batch_size):
            rendered: Rendered = pipeline.generate(
                [it.prompt for it in batch],
                [item_seed(settings.seed, it.item_id) for it in batch],
                steps=settings.steps,
                guidance=settings.guidance,
                width=settings.width,
                height=settings.height,
                negative_prompt=settings.negative_prompt,
            )
            sink.put(
                [
                    (
                        safe_key(it.item_id),
                        rendered.pixels[i],
                        sample_meta(it, settings, rendered.nsfw[i], checker_on),
                    )
                    for i, it in enumerate(batch)
                ]
            )
            progress(len(batch))
    seconds = time.perf_counter() - start
    marker = mark_done(
        task.output,
        {
            **task.expect,
            "seconds": round(seconds, 3),
            "images_per_s": round(sink.count / seconds, 3) if seconds > 0 else None,
            "nsfw": sink.nsfw,
            "model": settings.model,
            "settings": asdict(settings),
            "pipeline": pipeline.pipeline_class,
            "scheduler_class": pipeline.scheduler_name,
            "safety_checker": checker_on,
            "device": pipeline.device,
            "first_id": items[0].item_id,
            "last_id": items[-1].item_id,
        },
    )
    return {"shard": task.output.name, "count": sink.count, "nsfw": sink.nsfw, "seconds": marker["seconds"]}


@dataclass(frozen=True)
class RenderWorkerFactory:
    """Picklable: builds, once per worker process, a pipeline on that worker's device."""

    spec: T2IOptions
    settings: RenderSettings
    batch_size: int
    devices: str
    workers: int

    @property
    def ray_resources(self) -> dict[str, float]:
        """One GPU per Ray actor unless rendering on the CPU."""
        return {"num_cpus": 1} if self.devices in ("cpu", "mps") else {"num_cpus": 1, "num_gpus": 1}

    def __call__(self, index: int) -> Any:
        device = device_for_worker(self.devices, index)
        if device == "cpu" and self.workers > 1:
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))
        pipeline = cached_pipeline(self.spec, device)
        return partial(render_shard, pipeline, self.settings, self.batch_size)


# ----------------------------------------------------------------------------- the stage


def _validate(cfg: RenderConfig) -> T2IOptions:
    """The chosen backend's validated options (a diffusers backend checks its scheduler and dtype)."""
    options: T2IOptions = cfg.options()
    if cfg.size % 8:
        raise UserError(f"--size must be a multiple of 8, got {cfg.size}")
    if cfg.limit is not None and cfg.sample is not None:
        raise UserError("use --limit or --sample, not both")
    return options


def _backend(cfg: RenderConfig) -> Any:
    return T2I_BACKENDS.get(cfg.chosen_backend())


def _model_path(cfg: RenderConfig, run: RunDir) -> str:
    return str(_backend(cfg).prepare(cfg.model, run.cache))


def _settings(cfg: RenderConfig) -> RenderSettings:
    backend = _backend(cfg)
    return RenderSettings(
        model=backend.model_label(cfg.model),
        prompt_source="caption" if cfg.prompts == "captions" else "summary",
        scheduler=cfg.scheduler,
        steps=cfg.steps,
        guidance=cfg.guidance,
        width=cfg.size,
        height=cfg.size,
        negative_prompt=cfg.negative_prompt or None,
        dtype=cfg.dtype,
        seed=cfg.seed,
        image_format=cfg.image_format,
        quality=cfg.quality,
        safety_checker=cfg.safety_checker,
        untrained=bool(backend.untrained),
    )


def _executor(cfg: RenderConfig, workers: int) -> ExecutorKind:
    return "process" if cfg.executor == "inline" and workers > 1 else cfg.executor


def _totals(tasks: Sequence[ShardTask]) -> tuple[int, int | None]:
    """Images in all done shards, and how many a safety checker flagged (None when none ran)."""
    images = nsfw = 0
    checked = False
    for task in tasks:
        marker = read_marker(task.output) or {}
        images += int(marker.get("count", 0))
        nsfw += int(marker.get("nsfw", 0))
        checked |= bool(marker.get("safety_checker"))
    return images, nsfw if checked else None


def run(cfg: RenderConfig, run: RunDir) -> StageResult:
    """Render every chosen item into ``RUN/images/shard-XXXXX.tar``; finished shards are kept."""
    timer = Timer()
    options = _validate(cfg)
    loaded = caption_items(run) if cfg.prompts == "captions" else summary_items(run)
    items = choose_items(loaded, limit=cfg.limit, sample=cfg.sample, seed=cfg.seed)
    model_path = _model_path(cfg, run)
    settings = _settings(cfg)
    spec = options.model_copy(update={"model": model_path})  # what the workers load
    shards = plan_shards(items, cfg.shard_size)
    tasks = [
        ShardTask(
            key=shard_name(i),
            output=run.images / shard_name(i),
            size=len(shard),
            payload=shard,
            expect={"count": len(shard), "settings_hash": settings.hash(), "items_hash": items_hash(shard)},
        )
        for i, shard in enumerate(shards)
    ]
    run.images.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(run.images, {t.output.name for t in tasks}, SHARD_PATTERN)
    workers = max(1, min(cfg.workers or count_workers(cfg.devices), len(tasks)))
    result = run_tasks(
        tasks,
        RenderWorkerFactory(spec, settings, cfg.batch_size, cfg.devices, workers),
        executor=_executor(cfg, workers),
        workers=workers,
        desc="render",
        unit="img",
        address=cfg.address,
    )
    images, nsfw = _totals(tasks)
    rendered = sum(r["count"] for r in result.results)
    # aggregate rate of the workers while rendering (model loading excluded)
    render_seconds = sum(r["seconds"] for r in result.results) / max(1, workers)
    counts: dict[str, Any] = {
        "images": images,
        "rendered": rendered,
        "shards": len(tasks),
        "skipped_shards": result.skipped,
    }
    if nsfw is not None:
        counts["nsfw"] = nsfw
    if rendered and render_seconds > 0:
        counts["img_per_s"] = round(rendered / render_seconds, 2)
    notes = [UNTRAINED_NOTE] if settings.untrained else []
    return finish_stage(
        run,
        STAGE,
        cfg,
        counts=counts,
        seconds=timer.seconds,
        output=run.images,
        models={"text_to_image": settings.model, "path": model_path, "untrained": settings.untrained},
        extra={"settings_hash": settings.hash(), "workers": workers},
        notes=notes,
    )


def _inputs(cfg: RenderConfig, run: RunDir) -> list[Path]:
    return [run.captions if cfg.prompts == "captions" else run.selections]


# ----------------------------------------------------------------------------- rehearsal


def _rehearsal_models(ctx: StageRehearsal) -> None:
    cfg = ctx.configured
    if cfg.tiny_random or cfg.backend != "diffusers":
        ctx.note(f"backend {'tiny-random' if cfg.tiny_random else cfg.backend} used as it is")
    else:
        ctx.need("text-to-image", "model", cfg.model, "render")


def _rehearsal_reduce(ctx: StageRehearsal) -> None:
    cfg, r, opts = ctx.configured, ctx.config, ctx.options
    r.limit = min(cfg.limit or opts.images, opts.images)
    r.sample = None
    r.steps = min(cfg.steps, opts.steps)
    r.batch_size = min(cfg.batch_size, r.limit)
    ctx.reduced(f"{r.limit} images, {r.steps} denoising steps (configured {cfg.steps}), "
                f"batch {r.batch_size} (configured {cfg.batch_size})")  # fmt: skip
    if not ctx.on_gpu:
        if cfg.dtype in ("fp16", "bf16"):
            r.dtype = "fp32"
            ctx.reduced(f"fp32 on this CPU (configured {cfg.dtype}, for a GPU)")
        r.compile = False


def _rehearsal_project(ctx: StageRehearsal) -> Row:
    """UNet seconds per step and image x the configured steps, plus decode and safety checker."""
    from ..rehearse.hooks import Size, extrapolate_memory, fmt_seconds, per

    rec = ctx.record
    assert rec is not None
    cfg, r = ctx.configured, ctx.config
    images = int(rec.counts.get("images", 0))
    if cfg.prompts == "summaries" and "prompts" in ctx.sizes:
        full, source = int(ctx.size("prompts") or 0), "one image per prompt"
    else:
        full, source = int(ctx.size("captions") or 0), "one image per caption"
    for key in ("limit", "sample"):
        if getattr(cfg, key) and getattr(cfg, key) < full:
            full, source = getattr(cfg, key), f"render.{key}"
    ctx.sizes["images"] = Size(full, source)
    unet, vae, checker = ctx.probe("unet"), ctx.probe("vae_decode"), ctx.probe("safety_checker")
    per_step = per(unet.seconds, r.steps * images) if images else None
    other = per(vae.seconds + checker.seconds, images) or 0.0
    spu = (per_step or 0) * cfg.steps + other if per_step is not None else per(rec.seconds, images)
    fixed = max(0.0, rec.seconds - unet.seconds - vae.seconds - checker.seconds)
    architecture, parameters = ctx.architecture("model")
    row = ctx.row(architecture=architecture, parameters=parameters,
                  settings={"scheduler": cfg.scheduler, "steps": cfg.steps, "guidance": cfg.guidance, "size": cfg.size,
                            "dtype": cfg.dtype, "batch_size": cfg.batch_size, "safety_checker": cfg.safety_checker},
                  unit="image", units=images, seconds_per_unit=spu, full_units=full,
                  projected_seconds=fixed + (spu or 0) * full,
                  projection=f"UNet {fmt_seconds(per_step)}/step/image x {cfg.steps} steps + VAE decode "
                             f"and safety checker {fmt_seconds(other)}/image, x images (one device)")  # fmt: skip
    row.peak_rss_configured = extrapolate_memory(rec, (parameters or 0) * 4, r.batch_size, cfg.batch_size)
    return row


SPEC = StageSpec(
    name="render",
    report_counts=(("images", "images"),),
    rehearsal=RehearsalHooks(models=_rehearsal_models, reduce=_rehearsal_reduce, project=_rehearsal_project),
    config=RenderConfig,
    run=run,
    inputs=_inputs,
    outputs=lambda run: [run.images],
    summary="Render one image per ok summary (or per caption) into RUN/images/ webdataset shards.",
    examples=(
        "icsd render --run runs/coco",
        "icsd render --run runs/coco --model ./sd-folder --devices 0,1 --batch-size 32",
        "icsd render --run runs/coco --compile --channels-last",
        "icsd render --run runs/uni --prompts captions --sample 10000",
        "icsd render --run runs/demo --tiny-random --size 64 --steps 4",
        "icsd render --run runs/coco --no-safety-checker --format webp",
    ),
)
