"""The training loop of the ``train`` stage (method step 7). What it reads and writes is described
with the stage's spec in :mod:`icsd.stages.train`, which imports this module only when the stage
runs, so that the CLI starts without torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import interrupt
from ..backends.captioners import CaptionerSpec, CaptionModel, build_caption_model
from ..caption import skipped_note
from ..config import TrainConfig
from ..console import progress_bar
from ..errors import UserError
from ..executor import ShardTask, run_tasks
from ..records import Pair, from_table
from ..stages._base import StageResult, Timer, finish_stage
from ..store import (
    RunDir,
    atomic_path,
    atomic_write_json,
    hash_obj,
    is_done,
    iter_shard_samples,
    mark_done,
    read_parquet,
    sha256_file,
)
from . import checkpoint as ckpt
from .augment import center_square
from .data import PairStreams, StreamPlan, decode_image, plan_streams, processor_normalizer
from .distributed import Ranks, all_reduce_sum, barrier, gather_lists, init_ranks, shutdown
from .epochs import EpochPlan, OfficialPairs, index_shards, join_parts, micro_batches
from .validation import (
    ValSet,
    caption_scores,
    caption_valset,
    holdout_keys,
    load_holdout,
    load_user_split,
    validation_line,
)

IDENTITY_FIELDS = (
    "preset", "vision_model", "text_model", "image_size", "prompt", "label_smoothing", "lr", "dropout",
    "max_tokens", "augment", "crop_scale_min", "precompute_features", "shuffle_buffer", "weight_decay",
    "warmup_steps", "grad_accum", "max_grad_norm", "epochs", "max_steps", "seed",
)  # fmt: skip


# ----------------------------------------------------------------------------- data on disk


@dataclass
class TrainData:
    captions: dict[str, list[str]]
    shards: list[str]
    pairs: int
    holdout: dict[str, list[str]]
    holdout_shards: set[str]
    pairs_sha256: str
    shard_keys: dict[str, list[str]]


def load_train_data(run: RunDir, cfg: TrainConfig) -> TrainData:
    """Training pairs by image key, the shards that hold them, and the held-out images."""
    pairs = from_table(read_parquet(run.pairs, "pairs.parquet (run `icsd pairs` first)"), Pair)
    by_key: dict[str, list[str]] = defaultdict(list)
    shard_of: dict[str, str] = {}
    for p in pairs:
        by_key[p.image_key].append(p.caption)
        shard_of[p.image_key] = p.shard
    missing = sorted({s for s in shard_of.values() if not is_done(run.images / s)})
    if missing:
        raise UserError(f"pairs.parquet names render shards that are not finished: {missing[:3]} (rerun `icsd pairs`)")
    fraction = 0.0 if cfg.val_images else cfg.val_fraction
    held = holdout_keys(by_key, fraction, cfg.val_max_images)
    captions = {k: v for k, v in by_key.items() if k not in held}
    if not captions:
        raise UserError("no training pairs left (pairs.parquet is empty)")
    shard_keys: dict[str, list[str]] = defaultdict(list)
    for key in sorted(captions):
        shard_keys[shard_of[key]].append(key)
    return TrainData(
        captions=captions,
        shards=sorted({shard_of[k] for k in captions}),
        pairs=sum(len(v) for v in captions.values()),
        holdout={k: by_key[k] for k in held},
        holdout_shards={shard_of[k] for k in held},
        pairs_sha256=sha256_file(run.pairs),
        shard_keys=dict(shard_keys),
    )


def captioner_spec(cfg: TrainConfig) -> CaptionerSpec:
    """The captioner family's options as the config gives them, with the family's defaults."""
    spec: CaptionerSpec = cfg.options().resolved()
    return spec


def epoch_cosine(step: int, steps_per_epoch: int, total: int, warmup: int) -> float:
    """The official schedule's factor: cosine over epochs, constant within an epoch (its
    ``cosine_lr_schedule`` runs at each epoch boundary), after an optional linear warmup."""
    if step < warmup:
        return (step + 1) / warmup
    epochs = max(1, math.ceil(total / steps_per_epoch))
    return 0.5 * (1.0 + math.cos(math.pi * (step // steps_per_epoch) / epochs))


def lr_schedule(opt: Any, cfg: TrainConfig, total: int, steps_per_epoch: int) -> Any:
    """Cosine decay to 0 per step (``step``) or per epoch (``epoch``, the official recipe)."""
    if cfg.lr_schedule == "epoch":
        from functools import partial

        factor = partial(epoch_cosine, steps_per_epoch=steps_per_epoch, total=total, warmup=cfg.warmup_steps)
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, total)


def resolved_settings(cfg: TrainConfig, spec: CaptionerSpec) -> dict[str, Any]:
    values = cfg.resolved()
    values.update(
        vision_model=spec.vision_model,
        text_model=spec.text_model,
        image_size=spec.image_size,
        dropout=spec.dropout,
        lr=cfg.lr or spec.family.lr,
        augment=cfg.augment if cfg.augment is not None else spec.family.augment,
    )
    return values


# ----------------------------------------------------------------------------- precomputed image features


def feature_settings(spec: CaptionerSpec, cm: CaptionModel) -> str:
    return hash_obj({"vision_model": spec.vision_model, "image_size": cm.image_size, **cm.family.feature_identity(cm.model)})


def shard_images(path: Path, keys: dict[str, list[str]]) -> list[tuple[str, bytes]]:
    return [(x.key, x.image) for x in iter_shard_samples(path) if x.key in keys and x.image is not None]


def write_feature_shard(
    source: Path, target: Path, cm: CaptionModel, keys: dict[str, list[str]], device: str, settings: str
) -> dict[str, Any]:
    """One image shard's frozen vision features as a webdataset shard of ``<key>.npy`` (fp16)."""
    samples = shard_images(source, keys)
    normalize = processor_normalizer(cm.image_processor)
    with atomic_path(target) as tmp, tarfile.open(tmp, "w") as tar:
        for i in range(0, len(samples), 64):
            chunk = samples[i : i + 64]
            pixels = normalize([center_square(decode_image(b), cm.image_size) for _, b in chunk]).to(device)
            with torch.no_grad():
                feats = cm.image_features(pixels).float().cpu().numpy().astype(np.float16)
            for (key, _), f in zip(chunk, feats, strict=True):
                buf = io.BytesIO()
                np.save(buf, f, allow_pickle=False)
                info = tarfile.TarInfo(f"{key}.npy")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    keys_hash = hash_obj(sorted(k for k, _ in samples))
    mark_done(target, {"settings": settings, "keys": keys_hash, "count": len(samples), "source": source.name})
    return {"count": len(samples)}


def precompute_features(run: RunDir, data: TrainData, cm: CaptionModel, spec: CaptionerSpec, ranks: Ranks) -> list[str]:
    """Feature shards for a family that trains on frozen features (each rank computes a share; done shards are kept)."""
    folder = run.train / "features"
    settings = feature_settings(spec, cm)
    tasks = [
        ShardTask(
            key=name,
            output=folder / name,
            size=1,
            payload=name,
            expect={"settings": settings, "keys": hash_obj(data.shard_keys[name])},
        )
        for name in data.shards
    ]

    def factory(_: int) -> Any:
        def work(task: ShardTask, progress: Any) -> dict[str, Any]:
            result = write_feature_shard(run.images / task.payload, task.output, cm, data.captions, ranks.device, settings)
            progress(1)
            return result

        return work

    cm.model.eval()
    run_tasks(tasks[ranks.rank :: ranks.world], factory, desc="image features", unit="shard", quiet=not ranks.main)
    cm.model.train()
    barrier(ranks)
    return [str(folder / name) for name in data.shards]


# ----------------------------------------------------------------------------- the logged window


def restored_window(saved: dict[str, Any] | None, device: str) -> dict[str, Any]:
    """The running sums of the next ``metrics.jsonl`` record (those of a checkpoint, when resumed),
    so a record logged after a resume averages the same steps as an uninterrupted run's."""
    saved = saved or {}
    return {
        "loss": torch.tensor(float(saved.get("loss", 0.0)), dtype=torch.float32, device=device),
        "tokens": float(saved.get("tokens", 0.0)),
        "samples": int(saved.get("samples", 0)),
        "wait": 0.0,
        "t": time.perf_counter(),
    }


def saved_window(window: dict[str, Any]) -> dict[str, Any]:
    return {"loss": float(window["loss"]), "tokens": window["tokens"], "samples": window["samples"]}


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, run: RunDir, ranks: Ranks) -> None:
        self.cfg, self.run, self.ranks = cfg, run, ranks
        self.out = run.train
        self.spec = captioner_spec(cfg)
        self.settings = resolved_settings(cfg, self.spec)
        self.cuda = ranks.device.startswith("cuda")
        self.notes: list[str] = []
        self.metrics_file = self.out / "metrics.jsonl"
        self.tb: Any = None

    # -- setup -------------------------------------------------------------------------------

    def identity(self, data: TrainData, streams: int) -> dict[str, Any]:
        """What must not change for a resumed run to continue the same training. The number of
        ranks may: the same data streams and global batch give the same batches on any count."""
        ident = {k: self.settings[k] for k in IDENTITY_FIELDS}
        ident.update(global_batch=self.cfg.batch_size * self.ranks.world, streams=streams)
        if self.cfg.data_order != "streams":  # absent for streams: checkpoints made before the setting still match
            ident.update(data_order=self.cfg.data_order, group_captions=self.cfg.group_captions, streams=None)
        ident.update(pairs_sha256=data.pairs_sha256, holdout=hash_obj(sorted(data.holdout)))
        return ident

    def validation_set(self, data: TrainData) -> ValSet | None:
        cfg = self.cfg
        if bool(cfg.val_images) != bool(cfg.val_captions):
            raise UserError("--val-images and --val-captions go together (an image folder and its captions file)")
        if cfg.val_images and cfg.val_captions:
            valset = load_user_split(cfg.val_images, cfg.val_captions, cfg.val_max_images)
        elif data.holdout:
            valset = load_holdout(self.run.images, set(data.holdout), data.holdout, data.holdout_shards)
        else:
            self.notes.append("note: no validation split (give --val-images/--val-captions or --val-fraction > 0): best/ holds the final weights")
            return None
        return valset if len(valset) else None

    def resume_point(self, identity: dict[str, Any]) -> tuple[Path | None, dict[str, Any] | None]:
        if self.cfg.restart:
            if self.ranks.main:
                for name in ("last", ".last.old", ".last.partial", "best", ".best.partial", "tensorboard"):
                    ckpt.clear_dir(self.out / name)
                self.metrics_file.unlink(missing_ok=True)
            barrier(self.ranks)
            return None, None
        folder = ckpt.complete_checkpoint(self.out / "last")
        if folder is None:
            return None, None
        state = ckpt.read_state(folder) or {}
        saved = state.get("identity", {})
        diffs = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        if diffs:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in diffs[:4])
            raise UserError(
                f"{self.out / 'last'} was trained with other settings ({shown}); use the same settings "
                "(on another number of GPUs: the same --data-streams and global batch) or --restart"
            )
        return folder, state

    # -- logging -----------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if not self.ranks.main:
            return
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                    tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                    self.tb.add_scalar(tag, value, step)

    def trim_metrics(self, step: int, redo_validation: bool = False) -> None:
        """Drop records past the checkpoint a run resumes from (they will be redone), and the
        validation record of its own step when that validation is redone."""
        if not self.ranks.main or not self.metrics_file.exists():
            return

        def keep(record: dict[str, Any]) -> bool:
            at = record.get("step", 0)
            return bool(at < step or (at == step and not (redo_validation and "val_score" in record)))

        kept = [
            line
            for line in self.metrics_file.read_text(encoding="utf-8").splitlines()
            if line.strip() and keep(json.loads(line))
        ]
        with atomic_path(self.metrics_file) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def open_tensorboard(self) -> None:
        if not (self.cfg.tensorboard and self.ranks.main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'icsd[tensorboard]'") from None
        self.tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))

    # -- checkpoints -------------------------------------------------------------------------

    def save_last(self, step: int, state: dict[str, Any], cm: CaptionModel, opt: Any, sched: Any) -> None:
        final = self.out / "last"
        staged = ckpt.staging_dir(final)
        if self.ranks.main:
            ckpt.clear_dir(staged)
            staged.mkdir(parents=True)
        barrier(self.ranks)
        ckpt.save_rng(staged, self.ranks.rank)
        barrier(self.ranks)
        if self.ranks.main:
            cm.save(staged)
            ckpt.save_optimizer(staged, opt)
            ckpt.save_scheduler(staged, sched)
            atomic_write_json(staged / ckpt.STATE_FILE, {**state, "step": step})
            ckpt.publish(staged, final)
        barrier(self.ranks)

    def save_best(self, cm: CaptionModel, info: dict[str, Any]) -> None:
        if not self.ranks.main:
            return
        final = self.out / "best"
        staged = ckpt.staging_dir(final)
        ckpt.clear_dir(staged)
        cm.extra = info
        cm.save(staged)
        cm.extra = {}
        ckpt.publish(staged, final)

    # -- validation --------------------------------------------------------------------------

    def validate(self, cm: CaptionModel, valset: ValSet) -> dict[str, float]:
        cfg, ranks = self.cfg, self.ranks
        captioner = cm.captioner(ranks.device)
        mine = list(range(ranks.rank, len(valset), ranks.world))
        done = caption_valset(
            captioner, valset, mine, beams=cfg.beams, min_new_tokens=cfg.min_new_tokens,
            max_new_tokens=cfg.max_new_tokens, lengths=cfg.decode_lengths,
        )  # fmt: skip
        ordered = sorted(gather_lists([[j, t] for j, t in done.captions], ranks))
        skipped = sorted(gather_lists([[valset.ids[j], why] for j, why in done.skipped], ranks))
        note = skipped_note(len(skipped), len(valset), skipped, "validation images")
        if note and note not in self.notes:
            self.notes.append(note)
        if not ordered:
            raise UserError(f"none of the {len(valset)} validation images could be read ({valset.source})")
        scores = caption_scores([t for _, t in ordered], [valset.refs[j] for j, _ in ordered], cfg.val_tokenizer)
        return {**scores, "images": len(ordered), "unreadable": len(skipped)}

    # -- the loop ----------------------------------------------------------------------------

    def train(self, timer: Timer) -> StageResult:
        cfg, ranks = self.cfg, self.ranks
        data = load_train_data(self.run, cfg)
        if cfg.group_captions and cfg.data_order != "official":
            raise UserError("train.group_captions needs train.data_order official (--data-order official)")
        try:
            streams, stream_batch, workers = plan_streams(cfg.data_streams, ranks.world, cfg.num_workers, cfg.batch_size)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if cfg.data_order == "official":
            streams, workers = 0, cfg.num_workers
        identity = self.identity(data, streams)
        valset = self.validation_set(data)
        if ranks.main:
            self.out.mkdir(parents=True, exist_ok=True)
        folder, state = self.resume_point(identity)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        cm = build_caption_model(self.spec)
        if folder is not None:
            ckpt.load_model_weights(cm.model, folder)
        cm.model.to(ranks.device).train()

        dataset: PairStreams | OfficialPairs
        if cfg.data_order == "official":
            order = self.epoch_plan(data, cm)
            dataset = OfficialPairs(order, ranks.rank, processor_normalizer(cm.image_processor))
            steps_per_epoch, _ = micro_batches(len(dataset.units), order.unit_batch, ranks.world, cfg.grad_accum)
        else:
            plan = self.stream_plan(data, cm, streams, stream_batch)
            dataset = PairStreams(plan, ranks.rank, processor_normalizer(cm.image_processor))
            steps_per_epoch = max(1, math.ceil(data.pairs / (cfg.batch_size * ranks.world * cfg.grad_accum)))
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.cuda,
            generator=torch.Generator().manual_seed(cfg.seed),
            prefetch_factor=4 if workers else None,
        )
        total = cfg.max_steps or cfg.epochs * steps_per_epoch
        params = cm.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=self.settings["lr"], weight_decay=cfg.weight_decay, fused=self.cuda)
        sched = lr_schedule(opt, cfg, total, steps_per_epoch)
        start, best = self.restore(folder, state, opt, sched)
        self.open_tensorboard()

        run_state = {"identity": identity, "total_steps": total, "steps_per_epoch": steps_per_epoch}
        run_state.update(best_score=best["score"], best_step=best["step"])
        saved = state or {}
        if saved.get("validation_pending") and valset is not None and folder is not None:
            with interrupt.deferred():
                interrupt.at(f"train step {start} of {total} (its validation)")
                resumed = {k: v for k, v in saved.items() if k not in ("validation_pending", "step")}
                best = self.validate_or_checkpoint(cm, valset, start, best, run_state, resumed, opt, sched)
        if start >= total:
            self.notes.append(f"note: training already complete at step {start} (use --restart to train again)")
        else:
            with interrupt.deferred():
                best = self.loop(
                    cm, self.wrap(cm), loader, dataset, opt, sched, params,
                    start=start, total=total, steps_per_epoch=steps_per_epoch, workers=workers,
                    valset=valset, best=best, run_state=run_state, window_state=saved.get("window"),
                )  # fmt: skip
        if valset is None:
            self.save_best(cm, {"step": total, "val": None})
        elif best["score"] is None:
            # no check scored above 0: there is nothing to select on, so best/ is the final weights
            self.save_best(cm, {"step": total, "val": None, "val_source": valset.source, "selection": "none"})
            self.notes.append(
                f"note: the validation score was 0 at every check: {self.out / 'best'} holds the final "
                f"weights (step {total}), not a selection"
            )
        if self.tb is not None:
            self.tb.close()
        barrier(ranks)
        return self.result(data, valset, total, start, best, timer)

    def sources(self, data: TrainData, cm: CaptionModel) -> tuple[bool, bool, list[str]]:
        """(augment, train on precomputed features, the shard urls): feature shards for a family that
        trains on frozen features without augmentation, else the image shards."""
        augment = bool(self.settings["augment"])
        use_features = bool(cm.family.trains_on_features and self.cfg.precompute_features and not augment)
        urls = (
            precompute_features(self.run, data, cm, self.spec, self.ranks)
            if use_features
            else [str(self.run.images / s) for s in data.shards]
        )
        return augment, use_features, urls

    def stream_plan(self, data: TrainData, cm: CaptionModel, streams: int, stream_batch: int) -> StreamPlan:
        """Where the batches come from: image shards, or feature shards for a family that trains on them."""
        cfg = self.cfg
        augment, use_features, urls = self.sources(data, cm)
        return StreamPlan(
            urls=tuple(urls),
            captions=data.captions,
            seed=cfg.seed,
            streams=streams,
            world=self.ranks.world,
            stream_batch=stream_batch,
            shuffle_buffer=cfg.shuffle_buffer,
            image_size=cm.image_size,
            augment=augment,
            crop_scale_min=cfg.crop_scale_min,
            features=use_features,
        )

    def epoch_plan(self, data: TrainData, cm: CaptionModel) -> EpochPlan:
        """The official order's plan: image shards (or feature shards) indexed for random reads."""
        cfg = self.cfg
        augment, use_features, urls = self.sources(data, cm)
        members = index_shards(urls, set(data.captions), use_features)
        keys = tuple(k for k in sorted(data.captions) if k in members)
        if len(keys) < len(data.captions):
            missing = sorted(set(data.captions) - set(keys))
            self.notes.append(f"note: {len(missing)} training images not found in their shards (e.g. {missing[0]}); left out")
        unit_batch = cfg.batch_size
        if cfg.group_captions:  # images per rank micro-batch: batch_size pairs on average
            unit_batch = max(1, round(cfg.batch_size * len(data.captions) / data.pairs))
        return EpochPlan(
            keys=keys,
            captions={k: data.captions[k] for k in keys},
            members=members,
            seed=cfg.seed,
            world=self.ranks.world,
            unit_batch=unit_batch,
            grouped=cfg.group_captions,
            image_size=cm.image_size,
            augment=augment,
            crop_scale_min=cfg.crop_scale_min,
            features=use_features,
        )

    def restore(self, folder: Path | None, state: dict[str, Any] | None, opt: Any, sched: Any) -> tuple[int, dict[str, Any]]:
        """Optimizer, schedule and generators from a checkpoint; the step to continue from and the best so far."""
        best: dict[str, Any] = {"score": None, "step": None}
        if folder is None or state is None:
            if self.ranks.main:
                self.metrics_file.unlink(missing_ok=True)
            return 0, best
        start = int(state["step"])
        ckpt.load_optimizer(folder, opt)
        ckpt.load_scheduler(folder, sched)
        if not ckpt.load_rng(folder, self.ranks.rank):
            torch.manual_seed(self.cfg.seed + 1_000_003 * (self.ranks.rank + 1) + start)
            self.notes.append(f"note: rank {self.ranks.rank} had no saved random state; reseeded")
        self.trim_metrics(start, bool(state.get("validation_pending")))
        self.notes.append(f"note: resumed from {folder} at step {start}")
        if self.ranks.main:
            tqdm.write(f"train: resuming from {folder} at step {start}", file=sys.stderr)
        return start, {"score": state.get("best_score"), "step": state.get("best_step")}

    def wrap(self, cm: CaptionModel) -> Any:
        """The loss module as the step runs it: compiled if asked, DDP across ranks."""
        module: Any = cm.loss_module(self.cfg.label_smoothing).to(self.ranks.device)
        if self.cfg.compile:
            module = torch.compile(module)
        if self.ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(module, device_ids=[self.ranks.local_rank] if self.cuda else None)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return module

    def result(
        self, data: TrainData, valset: ValSet | None, total: int, start: int, best: dict[str, Any], timer: Timer
    ) -> StageResult:
        counts: dict[str, Any] = {"steps": total, "pairs": data.pairs, "images": len(data.captions), "ranks": self.ranks.world}
        if best["score"] is not None:
            counts["best_score"] = round(float(best["score"]), 4)
            counts["best_step"] = best["step"]
        if not self.ranks.main:
            return StageResult("train", counts, timer.seconds, self.out, self.notes)
        return finish_stage(
            self.run,
            "train",
            self.cfg,
            counts=counts,
            seconds=timer.seconds,
            output=self.out,
            models={"vision": self.spec.vision_model, "text": self.spec.text_model, "preset": self.spec.preset},
            extra={"resumed_from": start, "validation": valset.source if valset else None, "settings": self.settings},
            notes=self.notes,
        )

    def next_micro(self, it: Any, workers: int, cm: CaptionModel) -> tuple[torch.Tensor, Any, int, torch.Tensor | None]:
        """(images, text, real pairs, image index or None) of this rank's next micro-batch; pad
        rows (official order, a rank with no share of the epoch's last batch) have no labels."""
        batch = join_parts([next(it) for _ in range(max(1, workers))])
        captions = batch["captions"]
        text = cm.text_batch(captions, self.cfg.max_tokens, fixed=self.cfg.compile)
        pad = batch.get("pad")
        if pad is not None and any(pad):
            text.labels[torch.tensor(pad, dtype=torch.bool)] = -100
        real = len(captions) - sum(pad or [])
        return batch["images"], text, real, batch.get("image_index")

    def loop(
        self,
        cm: CaptionModel,
        loss_module: Any,
        loader: DataLoader[Any],
        dataset: PairStreams | OfficialPairs,
        opt: Any,
        sched: Any,
        params: list[torch.nn.Parameter],
        *,
        start: int,
        total: int,
        steps_per_epoch: int,
        workers: int,
        valset: ValSet | None,
        best: dict[str, Any],
        run_state: dict[str, Any],
        window_state: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Steps ``start .. total-1``. A signal is acted on only between steps: the step in flight
        finishes, a checkpoint of everything the next step depends on is written, and
        :class:`~icsd.interrupt.Interrupted` is raised; a validation in flight is dropped and redone
        on resume."""
        cfg, ranks, device = self.cfg, self.ranks, self.ranks.device
        accum = cfg.grad_accum
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and cfg.bf16)
        bar = progress_bar(total, "train", "step", initial=start, disable=not ranks.main)
        window = restored_window(window_state, device)
        it: Any = None
        try:
            for step in range(start, total):
                epoch, in_epoch = divmod(step, steps_per_epoch)
                if it is None or in_epoch == 0:
                    dataset.set_epoch(epoch, steps_per_epoch * accum, in_epoch * accum)
                    it = iter(loader)
                t0 = time.perf_counter()
                micro = [self.next_micro(it, workers, cm) for _ in range(accum)]
                window["wait"] += time.perf_counter() - t0
                tokens = all_reduce_sum(
                    torch.tensor(float(sum(t.tokens() for _, t, _, _ in micro)), device=device), ranks
                )
                for j, (images, text, n, image_index) in enumerate(micro):
                    sync = j == accum - 1 or not ranks.distributed
                    with (contextlib.nullcontext() if sync else loss_module.no_sync()), autocast:
                        loss_sum = loss_module(
                            images.to(device, non_blocking=True),
                            text.input_ids.to(device, non_blocking=True),
                            text.attention_mask.to(device, non_blocking=True),
                            text.labels.to(device, non_blocking=True),
                            **({} if image_index is None else {"image_index": image_index.to(device, non_blocking=True)}),
                        )
                    (loss_sum * (ranks.world / tokens)).backward()
                    window["loss"] += loss_sum.detach().float()
                    window["samples"] += n * ranks.world
                window["tokens"] += float(tokens)
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                )
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                done = step + 1
                bar.update(1)
                interrupt.at(f"train step {done} of {total} (checkpoint {self.out / 'last'})")
                if done % cfg.log_every == 0 or done == total:
                    self.log_window(done, epoch, window, grad_norm, sched, bar)
                state = {**run_state, "epoch": epoch, "window": saved_window(window)}
                if valset is not None and (done % cfg.eval_every == 0 or done == total):
                    best = self.validate_or_checkpoint(cm, valset, done, best, run_state, state, opt, sched)
                    state.update(best_score=best["score"], best_step=best["step"])
                saved = done % cfg.save_every == 0 or done == total
                if saved:
                    self.save_last(done, state, cm, opt, sched)
                if self.stop_requested():
                    if not saved:
                        self.save_last(done, state, cm, opt, sched)
                    interrupt.check()
        finally:
            bar.close()
        return best

    def stop_requested(self) -> bool:
        """Whether a signal came in (on any rank: every rank stops at the same step)."""
        flag = torch.tensor(float(interrupt.pending()), device=self.ranks.device)
        return bool(all_reduce_sum(flag, self.ranks) > 0) if self.ranks.distributed else bool(flag)

    def validate_or_checkpoint(
        self,
        cm: CaptionModel,
        valset: ValSet,
        step: int,
        best: dict[str, Any],
        run_state: dict[str, Any],
        state: dict[str, Any],
        opt: Any,
        sched: Any,
    ) -> dict[str, Any]:
        """The validation of ``step``; a signal cuts it short: the checkpoint of ``step`` is written
        with the validation marked as pending (a resumed run does it first), and the signal raised."""
        try:
            with interrupt.immediate(), ckpt.preserved_rng():
                best = self.evaluate_and_keep(cm, valset, step, best)
        except KeyboardInterrupt:
            if not self.ranks.distributed:
                self.save_last(step, {**state, "validation_pending": True}, cm, opt, sched)
            raise
        run_state.update(best_score=best["score"], best_step=best["step"])
        return best

    def log_window(self, step: int, epoch: int, window: dict[str, Any], grad_norm: Any, sched: Any, bar: Any) -> None:
        loss = all_reduce_sum(window["loss"].clone(), self.ranks)
        seconds = time.perf_counter() - window["t"]
        record = {
            "step": step,
            "epoch": epoch,
            "loss": float(loss) / max(window["tokens"], 1.0),
            "lr": float(sched.get_last_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": window["samples"] / seconds if seconds > 0 else None,
            "data_wait_frac": window["wait"] / seconds if seconds > 0 else None,
        }
        self.log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        window.update(loss=torch.zeros_like(window["loss"]), tokens=0.0, samples=0, wait=0.0, t=time.perf_counter())

    def evaluate_and_keep(self, cm: CaptionModel, valset: ValSet, step: int, best: dict[str, Any]) -> dict[str, Any]:
        scores = self.validate(cm, valset)
        # a checkpoint is kept only on a score above 0: a "best" chosen on no signal would be a guess
        improved = scores["score"] > 0 and (best["score"] is None or scores["score"] > best["score"])
        if improved:
            best = {"score": scores["score"], "step": step}
            self.save_best(cm, {"step": step, "val": scores, "val_source": valset.source})
        barrier(self.ranks)
        self.log({"step": step, **{f"val_{k}": v for k, v in scores.items()}, "best": improved})
        if self.ranks.main:
            tqdm.write(validation_line(step, scores), file=sys.stderr)
        return best


def run(cfg: TrainConfig, run: RunDir) -> StageResult:
    timer = Timer()
    ranks = init_ranks(cfg.device)
    try:
        return Trainer(cfg, run, ranks).train(timer)
    finally:
        shutdown(ranks)
