"""``icsd run CONFIG --rehearse``: the whole chain of a config on a small slice, every model at its
real architecture with random weights, offline, and a plan of the full run.

1. The config is resolved as ``icsd run`` resolves it (``--rehearse.*`` options taken out first).
2. Every path it names is checked (one line per missing or unreadable one; never fatal).
3. Each model it names is built at its published architecture with random weights
   (:mod:`icsd.random_models`) into ``RUN/rehearsal-models/``, as a ``save_pretrained`` folder
   that plain transformers / diffusers load back to the same outputs.
4. The stages run through :func:`icsd.pipeline.run`, one at a time, on a rehearsal copy of the
   config: the model settings point at those folders, the corpus is cut to a slice (the bundled
   captions when the corpus is absent), the LLM step goes to the local scripted chat server,
   denoising and training steps are reduced. Everything else (K, scheduler, guidance, size,
   image size, prompt, label smoothing, beams, min/max tokens, ...) is the config's own.
5. Per stage: wall seconds, peak memory (resident set of this process and its children; CUDA
   peak on a GPU), seconds per unit, the memory extrapolated to the configured batch and the time
   of the full run projected on this hardware. Written to ``RUN/rehearsal.json`` and printed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import PipelineConfig, package_file
from .data.check import PathCheck, check_paths, exists  # the same listing as `icsd data check`
from .errors import UserError

REHEARSE_PREFIX = "rehearse."
MODELS_DIR = "rehearsal-models"
REPORT_FILE = "rehearsal.json"
# the paper's corpus (COCO Karpathy train + restval captions), assumed when the corpus is absent
ASSUMED_CORPUS = 566_747
NO_KEY_ENV = "ICSD_REHEARSAL_NO_KEY"  # the scripted server needs no key: never send a real one


@dataclass
class Options:
    """``--rehearse.KEY VALUE``: the size of the rehearsal."""

    captions: int | None = None  # corpus slice (default: 24, or 2 x K when that is more)
    prompts: int = 4  # LLM requests (candidate sets summarised)
    images: int = 2  # images rendered
    steps: int = 2  # denoising steps per image
    train_steps: int = 2  # optimizer steps
    batch: int = 4  # training pairs per step
    eval_images: int = 2  # images captioned by validation and by evaluate
    scale: str = "paper"  # paper | tiny (same classes and code path, small widths: tests)
    corpus_size: int | None = None  # captions of the full corpus, when it is not readable here

    @classmethod
    def split(cls, overrides: dict[str, Any] | None) -> tuple[Options, dict[str, Any]]:
        """(rehearsal options, the other overrides) from the dotted overrides of ``icsd run``."""
        from .registry import closest

        names = {f.name: f for f in fields(cls)}
        chosen: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            if not key.startswith(REHEARSE_PREFIX):
                rest[key] = value
                continue
            name = key[len(REHEARSE_PREFIX) :]
            if name not in names:
                raise UserError(f"unknown option --{key}{closest(key, [REHEARSE_PREFIX + n for n in names])}")
            if name == "scale":
                if value not in ("paper", "tiny"):
                    raise UserError(f"--rehearse.scale must be paper or tiny, not {value!r}")
                chosen[name] = str(value)
                continue
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise UserError(f"--{key} needs a whole number, not {value!r}") from None
            if number < 1:
                raise UserError(f"--{key} must be at least 1")
            chosen[name] = number
        return cls(**chosen), rest


# ----------------------------------------------------------------------------- measuring


def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``VmHWM``); False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_self() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak resident memory of this process plus its children (DataLoader and executor workers)
    while the block runs: ``VmHWM`` (exact, this process) and a 20 Hz sample of the sum."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.sampled = 0
        self.baseline = 0
        self.peak = 0
        self.cuda_peak: int | None = None
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def total(self) -> int:
        import psutil

        me = psutil.Process()
        size = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                size += child.memory_info().rss
        return int(size)

    def sample(self) -> None:
        while not self.stop.wait(0.05):
            with contextlib.suppress(Exception):
                self.sampled = max(self.sampled, self.total())

    def __enter__(self) -> MemoryMeter:
        trim_heap()
        self.cpu_start = cpu_seconds()
        self.baseline = rss_bytes()
        self.exact = reset_peak_rss()
        self.cuda = cuda_available()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.cpu = cpu_seconds() - self.cpu_start
        hwm = peak_rss_self() if self.exact else None
        self.peak = max(self.sampled, hwm or 0)
        if self.cuda:
            import torch

            self.cuda_peak = int(torch.cuda.max_memory_allocated())


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@dataclass
class Probe:
    seconds: float = 0.0
    calls: int = 0
    items: int = 0


class Probes:
    """Time spent inside named model calls (UNet forward, VAE decode, generate, ...), by patching
    the classes' methods for the duration of the block: the stages' own code runs unchanged."""

    def __init__(self, targets: dict[str, tuple[type, str, Callable[..., int]]]) -> None:
        self.targets = targets
        self.probes = {name: Probe() for name in targets}
        self.saved: list[tuple[type, str, Any]] = []

    def __enter__(self) -> Probes:
        for name, (cls, method, items) in self.targets.items():
            original = cls.__dict__.get(method)
            if original is None:
                continue
            self.saved.append((cls, method, original))
            setattr(cls, method, self.wrap(original, self.probes[name], items))
        return self

    @staticmethod
    def wrap(original: Any, probe: Probe, items: Callable[..., int]) -> Any:
        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                probe.seconds += time.perf_counter() - start
                probe.calls += 1
                with contextlib.suppress(Exception):
                    probe.items += items(*args, **kwargs)

        return timed

    def __exit__(self, *exc: object) -> None:
        for cls, method, original in reversed(self.saved):
            setattr(cls, method, original)


def sync() -> None:
    if cuda_available():
        import torch

        torch.cuda.synchronize()


def _batch_of(key: str, position: int) -> Callable[..., int]:
    def items(*args: Any, **kwargs: Any) -> int:
        value = kwargs.get(key, args[position] if len(args) > position else None)
        return int(value.shape[0]) if value is not None and hasattr(value, "shape") else 0

    return items


def probe_targets() -> dict[str, tuple[type, str, Callable[..., int]]]:
    """The model calls whose time the projection scales: one entry per kind of unit."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextModelWithProjection
    from transformers.generation.utils import GenerationMixin

    return {
        "text_embedding": (CLIPTextModelWithProjection, "forward", _batch_of("input_ids", 1)),
        "unet": (UNet2DConditionModel, "forward", _batch_of("sample", 1)),
        "vae_decode": (AutoencoderKL, "decode", _batch_of("z", 1)),
        "safety_checker": (StableDiffusionSafetyChecker, "forward", _batch_of("clip_input", 1)),
        "generate": (GenerationMixin, "generate", _batch_of("pixel_values", 1)),
    }


def matmul_flops_per_s(seconds: float = 0.5) -> float:
    """fp32 matmul throughput of this machine (the device the rehearsal ran on), measured now."""
    import torch

    device = "cuda" if cuda_available() else "cpu"
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    sync()
    return 2.0 * n**3 * done / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- models


@dataclass
class ModelUse:
    role: str  # what the report calls it
    key: str  # the setting it comes from
    model_id: str
    use: str  # embed | vision | text | render
    source: str = "built"  # built | local (a folder given in the config) | packaged
    built: Any = None


def model_plan(cfg: PipelineConfig, stages: list[str]) -> tuple[list[ModelUse], list[str]]:
    """The models the enabled stages load, and notes on those used as they are."""
    from .backends.captioners import CaptionerSpec
    from .backends.embedders import resolve_model_path

    uses: list[ModelUse] = []
    notes: list[str] = []

    def add(role: str, key: str, model_id: str, use: str) -> None:
        local = Path(resolve_model_path(model_id)).expanduser()
        if local.exists():
            notes.append(f"{key}: {model_id} is a local model; used as it is")
            uses.append(ModelUse(role, key, str(local), use, "local"))
        else:
            uses.append(ModelUse(role, key, model_id, use))

    if "embed" in stages:
        add("text embedder", "embed.model", cfg.embed.model, "embed")
    if "render" in stages:
        if cfg.render.tiny_random or cfg.render.backend != "diffusers":
            notes.append(
                f"render: backend {'tiny-random' if cfg.render.tiny_random else cfg.render.backend} used as it is"
            )
        else:
            add("text-to-image", "render.model", cfg.render.model, "render")
    if "train" in stages:
        spec = CaptionerSpec(
            preset=cfg.train.preset, vision_model=cfg.train.vision_model, text_model=cfg.train.text_model,
            image_size=cfg.train.image_size,
        ).resolved()  # fmt: skip
        if spec.vision_model:
            add("captioner image encoder", "train.vision_model", spec.vision_model, "vision")
        if spec.text_model:
            add("captioner text decoder", "train.text_model", spec.text_model, "text")
    return uses, notes


def build_models(uses: list[ModelUse], root: Path, scale: str, echo: Callable[[str], None]) -> None:
    from .random_models import build_folder

    for u in uses:
        if u.source != "built":
            continue
        echo(f"rehearsal: building {u.model_id} ({u.use}) with random weights ...")
        u.built = build_folder(u.model_id, u.use, root, scale)  # type: ignore[arg-type]
        rt = u.built.roundtrip
        how = "reused" if u.built.reused else f"{u.built.seconds:.0f}s"
        echo(
            f"  {u.built.title}: {u.built.total_parameters / 1e6:.1f}M parameters, {how}; "
            f"reloaded with plain {rt['loads_with'].split('.')[0]}: {'same outputs' if rt['ok'] else 'DIFFERENT outputs'}"
        )


def model_path(uses: list[ModelUse], key: str) -> str | None:
    for u in uses:
        if u.key == key:
            return str(u.built.path) if u.built is not None else u.model_id
    return None


# ----------------------------------------------------------------------------- the rehearsal config


@dataclass
class Plan:
    """The rehearsal config and what differs from the configured run."""

    config: PipelineConfig
    reduced: list[str] = field(default_factory=list)
    substituted: list[str] = field(default_factory=list)


def rehearsal_config(
    cfg: PipelineConfig, opts: Options, checks: list[PathCheck], uses: list[ModelUse], server_url: str
) -> Plan:
    r = cfg.model_copy(deep=True)
    plan = Plan(r)
    on_gpu = cuda_available()
    quick = "data/quickstart"

    def reduce(what: str) -> None:
        plan.reduced.append(what)

    # ingest: a slice of the corpus, or of the bundled captions
    if not exists(checks, "ingest.corpus"):
        r.ingest.corpus = str(package_file(f"{quick}/captions.json"))
        r.ingest.format = "coco"
        plan.substituted.append(
            "ingest.corpus: the bundled COCO captions (the configured corpus is not here)"
        )
    wanted = opts.captions or max(24, 2 * cfg.group.k)  # more than K, so candidate sets differ
    r.ingest.limit = min(cfg.ingest.limit or wanted, wanted)
    reduce(f"ingest: the first {r.ingest.limit} captions")

    for stage in ("embed", "summarize", "render"):
        block = getattr(r, stage)
        if block.executor == "ray":
            block.executor = "inline"
            reduce(f"{stage}: inline executor instead of Ray (no cluster here)")

    if (p := model_path(uses, "embed.model")) is not None:
        r.embed.model = p

    # summarize: the scripted local chat server, whatever the configured backend
    r.summarize.backend = "openai"
    r.summarize.base_url = [server_url]
    r.summarize.api_key_env = NO_KEY_ENV
    r.summarize.gguf_file = None
    r.summarize.sample = None
    r.summarize.limit = min(cfg.summarize.limit or opts.prompts, opts.prompts)
    reduce(
        f"summarize: {r.summarize.limit} candidate sets through the local scripted chat server "
        f"(configured: {cfg.summarize.backend} {', '.join(cfg.summarize.base_url) or cfg.summarize.model}); "
        "its answers pick the first captions, so the LLM's own time is not measured"
    )

    # render
    if (p := model_path(uses, "render.model")) is not None:
        r.render.model = p
    r.render.limit = min(cfg.render.limit or opts.images, opts.images)
    r.render.sample = None
    r.render.steps = min(cfg.render.steps, opts.steps)
    r.render.batch_size = min(cfg.render.batch_size, r.render.limit)
    reduce(f"render: {r.render.limit} images, {r.render.steps} denoising steps (configured {cfg.render.steps}), "
           f"batch {r.render.batch_size} (configured {cfg.render.batch_size})")  # fmt: skip
    if not on_gpu:
        if cfg.render.dtype in ("fp16", "bf16"):
            r.render.dtype = "fp32"
            reduce(f"render: fp32 on this CPU (configured {cfg.render.dtype}, for a GPU)")
        r.render.compile = False
    if cfg.score.model and not Path(cfg.score.model).expanduser().exists():
        r.score.model = None
        reduce("score: not rehearsed (no random CLIP scorer is built); the stage is skipped")

    # train
    if (p := model_path(uses, "train.vision_model")) is not None:
        r.train.vision_model = p
    if (p := model_path(uses, "train.text_model")) is not None:
        r.train.text_model = p
    r.train.max_steps = opts.train_steps
    r.train.batch_size = min(cfg.train.batch_size, opts.batch)
    r.train.grad_accum = 1
    r.train.eval_every = opts.train_steps
    r.train.save_every = opts.train_steps
    r.train.log_every = 1
    r.train.val_max_images = min(cfg.train.val_max_images or opts.eval_images, opts.eval_images)
    r.train.restart = True
    r.train.tensorboard = False
    r.train.data_streams = None
    if not on_gpu:
        r.train.compile = False
    reduce(f"train: {opts.train_steps} steps at batch {r.train.batch_size} (configured batch "
           f"{cfg.train.batch_size} x grad_accum {cfg.train.grad_accum}), validation once on "
           f"{r.train.val_max_images} images")  # fmt: skip
    if cfg.train.val_images or cfg.train.val_captions:
        if not (exists(checks, "train.val_images") and exists(checks, "train.val_captions")):
            r.train.val_images = str(package_file(f"{quick}/images"))
            r.train.val_captions = str(package_file(f"{quick}/references.json"))
            plan.substituted.append("train.val_images/val_captions: the bundled COCO images and references")

    # evaluate
    if cfg.evaluate.annotations or cfg.evaluate.predictions:
        if not (exists(checks, "evaluate.annotations") and exists(checks, "evaluate.images")):
            r.evaluate.annotations = str(package_file(f"{quick}/references.json"))
            r.evaluate.images = str(package_file(f"{quick}/images"))
            r.evaluate.benchmark = "coco-captions"
            r.evaluate.split = "test"
            plan.substituted.append(
                f"evaluate: the bundled COCO images and references instead of {cfg.evaluate.benchmark or 'the benchmark'}"
            )
        r.evaluate.predictions = None
        r.evaluate.model = None
        r.evaluate.limit = opts.eval_images
        r.evaluate.batch_size = min(cfg.evaluate.batch_size, opts.eval_images)
        r.evaluate.spice_jars = None
        r.evaluate.metrics = [m for m in cfg.evaluate.metrics if m.lower() != "spice"] or ["BLEU"]
        reduce(f"evaluate: the first {opts.eval_images} images (SPICE left out)")
    return plan


# ----------------------------------------------------------------------------- the chain


@dataclass
class StageRecord:
    stage: str
    seconds: float
    peak_rss: int
    baseline_rss: int
    cuda_peak: int | None
    probes: dict[str, Probe]
    summary: str
    counts: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0


def run_stages(
    cfg: PipelineConfig, run_dir: Path, echo: Callable[[str], None]
) -> tuple[list[StageRecord], list[str]]:
    from . import pipeline

    stages = pipeline.enabled_stages(cfg)
    records = []
    for stage in stages:
        with MemoryMeter() as mem, Probes(probe_targets()) as probes:
            t0 = time.perf_counter()
            result = pipeline.run(cfg, run_dir, start=stage, stop=stage, force=[stage], echo=echo)
            seconds = time.perf_counter() - t0
        stage_result = result.results.get(stage)
        records.append(
            StageRecord(
                stage, seconds, mem.peak, mem.baseline, mem.cuda_peak, probes.probes,
                stage_result.summary() if stage_result is not None else "",
                dict(stage_result.counts) if stage_result is not None else {},
                mem.cpu,
            )
        )  # fmt: skip
        echo(f"rehearsal: {stage} {seconds:.1f}s, peak memory {gib(mem.peak)}")
    return records, stages


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- units and projections


def parquet_rows(path: Path) -> int:
    if not path.exists():
        return 0
    import pyarrow.parquet as pq

    if path.is_dir():
        return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(path.glob("*.parquet")))
    return int(pq.ParquetFile(path).metadata.num_rows)


def corpus_size(cfg: PipelineConfig, checks: list[PathCheck], opts: Options) -> tuple[int, str, float | None]:
    """(captions of the full corpus, where the number comes from, seconds to read it all)."""
    if opts.corpus_size:
        return opts.corpus_size, "--rehearse.corpus_size", None
    if exists(checks, "ingest.corpus"):
        from .stages.ingest import read_corpus

        t0 = time.perf_counter()
        kept, _, _ = read_corpus(Path(cfg.ingest.corpus or "").expanduser(), cfg.ingest)
        return len(kept), "counted in the configured corpus", time.perf_counter() - t0
    return ASSUMED_CORPUS, "assumed: COCO Karpathy train + restval (set --rehearse.corpus_size N)", None


def benchmark_images(cfg: PipelineConfig, checks: list[PathCheck]) -> tuple[int | None, str]:
    from .eval_sets import EVAL_SETS

    if exists(checks, "evaluate.annotations"):
        from .eval_sets import load_references

        with contextlib.suppress(Exception):
            refs = load_references(cfg.evaluate.annotations or "", benchmark=cfg.evaluate.benchmark,
                                   split=cfg.evaluate.split)  # fmt: skip
            return sum(1 for im in refs.images if im.captions), "counted in the annotations"
    spec = EVAL_SETS.get(cfg.evaluate.benchmark or "")
    if spec is not None and spec.expected_images:
        return spec.expected_images, f"the size of {cfg.evaluate.benchmark}"
    return None, "unknown"


def validation_images(cfg: PipelineConfig) -> int:
    """Images per validation: the configured cap, else the COCO Karpathy val split's 5,000."""
    return cfg.train.val_max_images or 5000


def per(seconds: float, units: float) -> float | None:
    return seconds / units if units else None


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 10 * 86400:
        return f"{s / 86400:,.0f} d"
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s" if s >= 0.1 else f"{s * 1000:.0f} ms"


@dataclass
class Row:
    """One stage of the table."""

    stage: str
    architecture: str
    parameters: int | None
    settings: dict[str, Any]
    unit: str
    units: int
    seconds: float
    cpu_seconds: float
    seconds_per_unit: float | None
    peak_rss: int
    peak_rss_configured: int | None
    cuda_peak: int | None
    full_units: int | None
    projected_seconds: float | None
    projection: str

    def cells(self) -> list[str]:
        params = f"{self.parameters / 1e6:.1f}M" if self.parameters else "-"
        spu = fmt_seconds(self.seconds_per_unit) if self.seconds_per_unit is not None else "-"
        full = f"{self.full_units:,}" if self.full_units is not None else "-"
        conf = gib(self.peak_rss_configured) if self.peak_rss_configured else "-"
        return [self.stage, self.architecture, params, f"{self.units} {self.unit}", fmt_seconds(self.seconds),
                fmt_seconds(self.cpu_seconds),
                f"{spu}/{self.unit}", gib(self.peak_rss), conf, full, fmt_seconds(self.projected_seconds)]  # fmt: skip


def extrapolate_memory(rec: StageRecord, fixed_bytes: int, rehearsal_batch: int, batch: int) -> int:
    """Peak memory at the configured batch: what the stage added over its start, split into a
    part that does not grow with the batch (weights, gradients, optimizer state) and the rest
    (activations), which grows linearly."""
    added = max(0, rec.peak_rss - rec.baseline_rss)
    per_item = max(0, added - fixed_bytes) / max(1, rehearsal_batch)
    return int(rec.baseline_rss + fixed_bytes + per_item * batch)


def trim_heap() -> None:
    """Give freed heap back to the OS, so that the next peak measures only new allocations."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def activation_bytes_per_pair(cfg: PipelineConfig) -> tuple[int | None, str]:
    """Memory one more training pair costs, from forward+backward passes of the rehearsal's
    captioner (batch 1 to warm up, then 1 and 3) at the configured image size and caption length:
    the part of the training peak that grows with the batch."""
    import torch

    from .backends.captioners import CaptionerSpec, build_caption_model

    t = cfg.train
    spec = CaptionerSpec(preset=t.preset, vision_model=t.vision_model, text_model=t.text_model,
                         image_size=t.image_size, dropout=t.dropout)  # fmt: skip
    device = "cuda" if cuda_available() else "cpu"
    try:
        cm = build_caption_model(spec)
    except Exception as exc:  # noqa: BLE001 - the plan goes on without this figure
        return None, f"not measured ({type(exc).__name__})"
    model = cm.model.to(device).train()
    loss_fn = cm.loss_module(t.label_smoothing).to(device)
    size = cm.image_size
    vocab = int(getattr(cm.tokenizer, "vocab_size", 1000))
    peaks: dict[int, int] = {}
    for batch in (1, 1, 3):  # the first pass also pays one-time allocations (kernel caches, grads)
        model.zero_grad(set_to_none=True)
        trim_heap()
        pixels = torch.randn(batch, 3, size, size, device=device)
        ids = torch.randint(min(1000, vocab - 1), vocab, (batch, t.max_tokens), device=device)
        mask = torch.ones_like(ids)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            before = rss_bytes()
        loss_fn(pixels, ids, mask, ids.clone()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peaks[batch] = int(torch.cuda.max_memory_allocated() - before)
        else:
            peaks[batch] = int((peak_rss_self() or 0) - before)
    del model, loss_fn, cm
    trim_heap()
    slope = (peaks[3] - peaks[1]) // 2
    where = "GPU memory" if device == "cuda" else "resident memory"
    return (
        slope if slope > 0 else None
    ), f"{where}: forward+backward at batch 1 and 3, {size} px, {t.max_tokens} tokens"


def train_samples_per_s(run_dir: Path) -> float | None:
    path = run_dir / "train" / "metrics.jsonl"
    if not path.exists():
        return None
    rates = [json.loads(x).get("samples_per_s") for x in path.read_text().splitlines() if x.strip()]
    rates = [r for r in rates if r]
    return float(rates[-1]) if rates else None  # the last step: past the first-step warm-up


# ----------------------------------------------------------------------------- GPU cost hook


def gpu_cost_model(rows: list[Row], cfg: PipelineConfig) -> dict[str, Any]:
    """GPU figures for this config's sizes: ``icsd.cost.project(rows, config)`` where such a module
    is installed (the hook), else the project's cost model ``benchmarks/cost_model.py`` (docs/cost.md)
    of a source checkout, fed this rehearsal's full-run counts; else a line saying neither is here."""
    try:
        from . import cost  # type: ignore[attr-defined]
    except ImportError:
        return checkout_cost_model(rows, cfg)
    project = getattr(cost, "project", None)
    if project is None:
        return {"status": "icsd.cost has no project(rows, config) function"}
    try:
        return dict(project([asdict(r) for r in rows], cfg))
    except Exception as exc:  # noqa: BLE001 - the plan must not fail on the cost model
        return {"status": f"cost model failed: {type(exc).__name__}: {exc}"}


def checkout_cost_model(rows: list[Row], cfg: PipelineConfig) -> dict[str, Any]:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cost_model.py"
    inputs_file = script.with_name("cost_inputs.json")
    if not (script.is_file() and inputs_file.is_file()):
        return {
            "status": "no GPU cost model here (neither icsd.cost nor benchmarks/cost_model.py): this device's projection only"
        }
    try:
        spec = importlib.util.spec_from_file_location("icsd_cost_model", script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        inputs = json.loads(inputs_file.read_text())
        units = {r.stage: r.full_units for r in rows if r.full_units}
        sizes = {"captions": units.get("embed") or units.get("ingest"), "prompts": units.get("summarize"),
                 "images": units.get("render"), "pairs": units.get("pairs"), "epochs": cfg.train.epochs,
                 "val_images": cfg.train.val_max_images}  # fmt: skip
        for key, value in sizes.items():
            if value and key in inputs.get("recipe", {}):
                inputs["recipe"][key] = {**inputs["recipe"][key], "value": value, "source": "this rehearsal"}
        lines = module.lines(inputs)
        _, total = module.totals(lines, grouped=False)
        return {
            "status": f"GPU-hours from benchmarks/cost_model.py (docs/cost.md) at this config's sizes: {total:,.1f} GPU-h "
                      "(icsd, ungrouped training, LLM included; its rates say which are measured and which estimated)",
            "gpu_hours": round(total, 2),
            "stages": [{"stage": x.stage, "gpu_hours": round(x.icsd_h, 3), "basis": x.icsd_basis} for x in lines],
        }  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the plan must not fail on the cost model
        return {"status": f"cost model failed: {type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- the whole rehearsal


@dataclass
class Rehearsal:
    document: dict[str, Any]
    path: Path
    table: str


def rehearse(
    config_file: Path | None,
    overrides: dict[str, Any] | None,
    run_dir: Path | None,
    echo: Callable[[str], None] = print,
) -> Rehearsal:
    from . import pipeline
    from .testing.chat_server import ChatServer, echo_responder

    started = time.perf_counter()
    cpu_start = cpu_seconds()
    opts, rest = Options.split(overrides)
    cfg = pipeline.load_config(config_file, rest, None)
    run_path = Path(run_dir) if run_dir is not None else pipeline.default_run_dir(cfg).with_name(
        pipeline.default_run_dir(cfg).name + "-rehearsal"
    )  # fmt: skip
    run_path.mkdir(parents=True, exist_ok=True)
    echo(f"rehearsal of {config_file or 'the quickstart'} in {run_path} (random weights, reduced steps)")

    checks = check_paths(cfg)
    for c in checks:
        if not c.ok:
            echo(f"path {c.line()}")
    stages = pipeline.enabled_stages(cfg)
    uses, model_notes = model_plan(cfg, stages)
    unknown = [u for u in uses if u.source == "built" and _arch(u.model_id) is None]
    if unknown:
        names = ", ".join(f"{u.key}={u.model_id}" for u in unknown)
        raise UserError(f"no known architecture to rehearse {names}; give a local model folder instead")
    t_build = time.perf_counter()
    with MemoryMeter() as build_mem:
        build_models(uses, run_path / MODELS_DIR, opts.scale, echo)
    build_seconds = time.perf_counter() - t_build

    server = ChatServer(echo_responder(pick=cfg.summarize.min_select), model=cfg.summarize.model).start()
    try:
        plan = rehearsal_config(cfg, opts, checks, uses, server.url)
        os.environ.pop(NO_KEY_ENV, None)
        records, ran = run_stages(plan.config, run_path, echo)
        requests = list(server.requests)
    finally:
        server.stop()

    roundtrip = captioner_roundtrip(run_path, plan.config) if "train" in ran else None
    full_captions, captions_source, read_seconds = corpus_size(cfg, checks, opts)
    rows = table_rows(cfg, plan, records, uses, run_path, full_captions, checks, requests, read_seconds)
    projected = sum(r.projected_seconds or 0.0 for r in rows)
    doc = {
        "config": str(config_file) if config_file else "quickstart",
        "run": str(run_path),
        "hardware": hardware(),
        "scale": opts.scale,
        "options": asdict(opts),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(cpu_seconds() - cpu_start, 1),
        "build_seconds": round(build_seconds, 1),
        "build_peak_rss": build_mem.peak,
        "peak_rss": max([build_mem.peak] + [r.peak_rss for r in records]),
        "paths": [asdict(c) for c in checks],
        "missing_paths": [c.line() for c in checks if not c.ok],
        "models": [
            u.built.describe()
            if u.built is not None
            else {"key": u.key, "model": u.model_id, "source": u.source}
            for u in uses
        ],  # fmt: skip
        "model_notes": model_notes,
        "captioner_checkpoint_roundtrip": roundtrip,
        "reduced": plan.reduced,
        "substituted": plan.substituted,
        "corpus_captions": {"count": full_captions, "source": captions_source},
        "stages": [asdict(r) for r in rows],
        "projected_seconds": round(projected, 1),
        "projection_note": (
            "this hardware, the configured settings and data sizes; seconds per unit measured on the "
            "rehearsal's slice with random weights (decoding runs to max_new_tokens: an upper bound); "
            "the LLM step is not included (scripted server)"
        ),
        "gpu_cost_model": None,
    }
    doc["gpu_cost_model"] = gpu_cost_model(rows, cfg)
    table = render_table(doc, rows)
    path = run_path / REPORT_FILE
    from .store import atomic_write_json

    atomic_write_json(path, doc)
    return Rehearsal(doc, path, table)


def _arch(model_id: str) -> Any:
    from .random_models import architecture_of

    return architecture_of(model_id)


def hardware() -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
    if cuda_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def captioner_roundtrip(run_dir: Path, cfg: PipelineConfig) -> dict[str, Any] | None:
    """The trained checkpoint loaded with plain transformers gives the captions icsd gives."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    from .backends.captioners import load_captioner

    folder = next(
        (run_dir / "train" / n for n in ("best", "last") if (run_dir / "train" / n / "config.json").exists()),
        None,
    )
    if folder is None or cfg.train.preset not in ("icsd", "tiny"):
        return None
    image = Image.open(sorted(package_file("data/quickstart/images").glob("*.jpg"))[0]).convert("RGB")
    settings = {
        "beams": cfg.train.beams,
        "min_new_tokens": cfg.train.min_new_tokens,
        "max_new_tokens": cfg.train.max_new_tokens,
    }
    ours = load_captioner(str(folder), device="cpu").caption(
        [image], beams=settings["beams"], min_new_tokens=settings["min_new_tokens"],
        max_new_tokens=settings["max_new_tokens"],
    )[0]  # fmt: skip
    model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    proc = AutoImageProcessor.from_pretrained(folder)
    pixels = proc(image, return_tensors="pt").pixel_values
    prompt = tok(cfg.train.prompt.strip(), return_tensors="pt").input_ids[:, :-1]
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, decoder_input_ids=prompt, num_beams=settings["beams"],
                             min_new_tokens=settings["min_new_tokens"], max_new_tokens=settings["max_new_tokens"])  # fmt: skip
    plain = str(tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)).strip()
    return {"checkpoint": str(folder), "loads_with": "transformers.VisionEncoderDecoderModel",
            "icsd": ours, "plain_transformers": plain, "ok": ours.strip() == plain}  # fmt: skip


def table_rows(
    cfg: PipelineConfig,
    plan: Plan,
    records: list[StageRecord],
    uses: list[ModelUse],
    run_dir: Path,
    full_captions: int,
    checks: list[PathCheck],
    requests: list[dict[str, Any]],
    read_seconds: float | None,
) -> list[Row]:
    from .store import RunDir

    run = RunDir.at(run_dir)
    r = plan.config
    by_key = {u.key: u for u in uses}

    def arch(*keys: str) -> tuple[str, int | None]:
        parts = [by_key[k] for k in keys if k in by_key]
        titles = [u.built.title if u.built is not None else f"{u.model_id} ({u.source})" for u in parts]
        params = [u.built.total_parameters for u in parts if u.built is not None]
        return " + ".join(titles) or "-", (sum(params) if params else None)

    captions = parquet_rows(run.captions) or 1
    full_groups = full_captions  # every caption heads a set; identical sets are rare at full size
    full_prompts = min(full_groups, cfg.summarize.limit or full_groups)
    if cfg.summarize.sample:
        full_prompts = min(full_prompts, cfg.summarize.sample)
    images = next((int(rec.counts.get("images", 0)) for rec in records if rec.stage == "render"), 0)
    full_images = full_prompts if cfg.render.prompts == "summaries" else full_captions
    if cfg.render.limit:
        full_images = min(full_images, cfg.render.limit)
    if cfg.render.sample:
        full_images = min(full_images, cfg.render.sample)
    pairs = parquet_rows(run.pairs)
    pairs_per_image = pairs / images if images else 0.0
    full_pairs = int(full_images * pairs_per_image)
    bench, _ = benchmark_images(cfg, checks)
    flops = matmul_flops_per_s()

    rows = []
    for rec in records:
        s = rec.stage
        p = rec.probes
        base: dict[str, Any] = dict(stage=s, seconds=round(rec.seconds, 2), cpu_seconds=round(rec.cpu_seconds, 1), peak_rss=rec.peak_rss, cuda_peak=rec.cuda_peak,
                    peak_rss_configured=None, parameters=None, architecture="-")  # fmt: skip
        if s == "ingest":
            row = Row(**base, settings={"format": r.ingest.format, "splits": cfg.ingest.splits}, unit="caption",
                      units=captions, seconds_per_unit=per(rec.seconds, captions), full_units=full_captions,
                      projected_seconds=read_seconds if read_seconds is not None else None,
                      projection="the full corpus read once now" if read_seconds is not None
                      else "not projected (corpus not here; reading is minor)")  # fmt: skip
        elif s == "embed":
            a, n = arch("embed.model")
            spu = per(p["text_embedding"].seconds, p["text_embedding"].items) or per(rec.seconds, captions)
            row = Row(**{**base, "architecture": a, "parameters": n},
                      settings={"kind": cfg.embed.kind, "batch_size": cfg.embed.batch_size, "device": cfg.embed.device},
                      unit="caption", units=captions, seconds_per_unit=spu, full_units=full_captions,
                      projected_seconds=(spu or 0) * full_captions,
                      projection="text-tower seconds per caption x corpus captions")  # fmt: skip
        elif s == "group":
            dim = embedding_dim(run_dir)
            work = 2.0 * full_captions * full_captions * dim if cfg.group.index == "flat" else None
            row = Row(**base, settings={"k": cfg.group.k, "index": cfg.group.index}, unit="caption", units=captions,
                      seconds_per_unit=per(rec.seconds, captions), full_units=full_captions,
                      projected_seconds=(work / flops) if work else None,
                      projection=f"exact search: 2 N^2 x {dim} FLOP at this machine's matmul rate "
                                 f"({flops / 1e9:.0f} GFLOP/s)" if work else "approximate index: not projected")  # fmt: skip
        elif s == "summarize":
            words = [len(str(m.get("content", "")).split()) for q in requests for m in q.get("messages", [])]
            row = Row(**{**base, "architecture": f"{cfg.summarize.backend}: {cfg.summarize.model} (not run: scripted server)"},
                      settings={"mode": cfg.summarize.mode, "min_select": cfg.summarize.min_select,
                                "max_select": cfg.summarize.max_select, "max_words": cfg.summarize.max_words,
                                "max_new_tokens": cfg.summarize.max_new_tokens, "temperature": cfg.summarize.temperature,
                                "concurrency": cfg.summarize.concurrency,
                                "prompt_words_per_request": round(sum(words) / max(1, len(requests)), 1)},
                      unit="prompt", units=len(requests), seconds_per_unit=per(rec.seconds, len(requests)),
                      full_units=full_prompts, projected_seconds=None,
                      projection=f"{full_prompts:,} requests of ~{sum(words) // max(1, len(requests))} words, up to "
                                 f"{cfg.summarize.max_new_tokens} new tokens each: time depends on the LLM server")  # fmt: skip
        elif s == "render":
            a, n = arch("render.model")
            unet = p["unet"]
            steps_r = r.render.steps
            per_step = per(unet.seconds, steps_r * images) if images else None
            other = per(p["vae_decode"].seconds + p["safety_checker"].seconds, images) or 0.0
            spu = (
                (per_step or 0) * cfg.render.steps + other
                if per_step is not None
                else per(rec.seconds, images)
            )
            fixed = max(
                0.0, rec.seconds - unet.seconds - p["vae_decode"].seconds - p["safety_checker"].seconds
            )
            weights = sum(u.built.total_parameters for u in uses if u.key == "render.model" and u.built) * 4
            row = Row(**{**base, "architecture": a, "parameters": n},
                      settings={"scheduler": cfg.render.scheduler, "steps": cfg.render.steps, "guidance": cfg.render.guidance,
                                "size": cfg.render.size, "dtype": cfg.render.dtype, "batch_size": cfg.render.batch_size,
                                "safety_checker": cfg.render.safety_checker},
                      unit="image", units=images, seconds_per_unit=spu, full_units=full_images,
                      projected_seconds=fixed + (spu or 0) * full_images,
                      projection=f"UNet {fmt_seconds(per_step)}/step/image x {cfg.render.steps} steps + VAE decode "
                                 f"and safety checker {fmt_seconds(other)}/image, x images (one device)")  # fmt: skip
            row.peak_rss_configured = extrapolate_memory(
                rec, weights, r.render.batch_size, cfg.render.batch_size
            )
        elif s == "pairs":
            row = Row(**base, settings={"kinds": cfg.pairs.kinds}, unit="pair", units=pairs,
                      seconds_per_unit=per(rec.seconds, pairs), full_units=full_pairs, projected_seconds=None,
                      projection="minor (table work)")  # fmt: skip
        elif s == "train":
            a, n = arch("train.vision_model", "train.text_model")
            rate = train_samples_per_s(run_dir)
            spu = 1.0 / rate if rate else per(rec.seconds, r.train.max_steps or 1)
            steps_per_epoch = (
                math.ceil(full_pairs / (cfg.train.batch_size * cfg.train.grad_accum)) if full_pairs else 0
            )
            total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
            trained = total_steps * cfg.train.batch_size * cfg.train.grad_accum
            gen = p["generate"]
            per_val_image = per(gen.seconds, gen.items)
            validations = math.ceil(total_steps / cfg.train.eval_every) if total_steps else 0
            val_seconds = validations * validation_images(cfg) * (per_val_image or 0.0)
            trainable = model_parameters(run_dir)
            row = Row(**{**base, "architecture": f"{a} + cross-attention ({cfg.train.preset} preset, {image_size(run_dir)} px)",
                         "parameters": trainable or n},
                      settings={"preset": cfg.train.preset, "image_size": cfg.train.image_size, "prompt": cfg.train.prompt,
                                "label_smoothing": cfg.train.label_smoothing, "lr": cfg.train.lr,
                                "weight_decay": cfg.train.weight_decay, "batch_size": cfg.train.batch_size,
                                "epochs": cfg.train.epochs, "beams": cfg.train.beams,
                                "min_new_tokens": cfg.train.min_new_tokens, "max_new_tokens": cfg.train.max_new_tokens},
                      unit="pair", units=(r.train.max_steps or 0) * r.train.batch_size, seconds_per_unit=spu,
                      full_units=trained, projected_seconds=(spu or 0) * trained + val_seconds,
                      projection=f"{total_steps:,} steps x batch {cfg.train.batch_size} at the last step's rate, plus "
                                 f"{validations} validations of {validation_images(cfg)} images at "
                                 f"{fmt_seconds(per_val_image)}/image")  # fmt: skip
            slope, how = activation_bytes_per_pair(r)
            row.settings["memory_per_pair"] = {"bytes": slope, "how": how}
            if slope is not None:
                row.peak_rss_configured = int(
                    rec.peak_rss + slope * (cfg.train.batch_size - r.train.batch_size)
                )
            else:
                row.peak_rss_configured = extrapolate_memory(
                    rec, (trainable or 0) * 16, r.train.batch_size, cfg.train.batch_size
                )
        elif s == "evaluate":
            gen = p["generate"]
            spu = per(gen.seconds, gen.items) or per(rec.seconds, r.evaluate.limit or 1)
            row = Row(**{**base, "architecture": "the trained captioner"},
                      settings={"benchmark": cfg.evaluate.benchmark, "beams": cfg.evaluate.beams,
                                "min_new_tokens": cfg.evaluate.min_new_tokens, "max_new_tokens": cfg.evaluate.max_new_tokens,
                                "batch_size": cfg.evaluate.batch_size},
                      unit="image", units=gen.items or (r.evaluate.limit or 0), seconds_per_unit=spu,
                      full_units=bench, projected_seconds=(spu or 0) * bench if bench else None,
                      projection="beam search seconds per image x benchmark images")  # fmt: skip
        else:
            row = Row(**base, settings={}, unit="run", units=1, seconds_per_unit=rec.seconds, full_units=1,
                      projected_seconds=rec.seconds, projection="as measured")  # fmt: skip
        rows.append(row)
    return rows


def embedding_dim(run_dir: Path) -> int:
    from .store import RunDir, read_embeddings

    with contextlib.suppress(Exception):
        _, vectors = read_embeddings(RunDir.at(run_dir).embeddings)
        return int(vectors.shape[1])
    return 512


def _train_config(run_dir: Path) -> dict[str, Any]:
    for name in ("best", "last"):
        path = run_dir / "train" / name / "config.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
    return {}


def model_parameters(run_dir: Path) -> int | None:
    """Parameters of the trained captioner checkpoint (safetensors headers: nothing is loaded)."""
    from safetensors import safe_open

    for name in ("best", "last"):
        files = sorted((run_dir / "train" / name).glob("*.safetensors"))
        if files:
            total = 0
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                        shape = st.get_slice(key).get_shape()
                        total += math.prod(shape) if shape else 1
            return total
    return None


def image_size(run_dir: Path) -> Any:
    return _train_config(run_dir).get("encoder", {}).get("image_size", "?")


def render_table(doc: dict[str, Any], rows: list[Row]) -> str:
    head = ["stage", "architecture", "params", "rehearsed", "seconds", "CPU time", "per unit", "peak memory",
            "at configured batch", "full run units", "projected"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    hw = doc["hardware"]
    where = hw.get("gpu") or f"{hw['cores']} CPU cores"
    out = [
        f"Rehearsal of {doc['config']} ({doc['scale']} architectures, random weights) on {where}, "
        f"load average {hw['load_average'][0]}: {fmt_seconds(doc['wall_seconds'])} "
        f"(CPU time {fmt_seconds(doc['cpu_seconds'])}, models built in {fmt_seconds(doc['build_seconds'])}), "
        f"peak memory {gib(doc['peak_rss'])}",
        "",
        *lines,
        "",
        f"Projected full run on this hardware: {fmt_seconds(doc['projected_seconds'])} "
        f"(without the LLM step; corpus {doc['corpus_captions']['count']:,} captions, "
        f"{doc['corpus_captions']['source']}).",
        f"GPU cost model: {doc['gpu_cost_model'].get('status', 'see rehearsal.json')}",
    ]
    bad_models = [m for m in doc["models"] if m.get("roundtrip") and not m["roundtrip"].get("ok")]
    out.append(
        "Checkpoints: every built model reloads with plain transformers/diffusers to the same outputs."
        if not bad_models
        else f"Checkpoints: {len(bad_models)} model(s) reload to DIFFERENT outputs: "
        + ", ".join(m["model_id"] for m in bad_models)
    )
    rt = doc.get("captioner_checkpoint_roundtrip")
    if rt:
        out.append(
            f"Trained captioner checkpoint: plain VisionEncoderDecoderModel gives {'the same' if rt['ok'] else 'a DIFFERENT'} caption."
        )
    if doc["missing_paths"]:
        out.append("Missing data paths (the full run needs them):")
        out += [f"  {line}" for line in doc["missing_paths"]]
    out.append("Reduced for the rehearsal:")
    out += [f"  {line}" for line in doc["reduced"] + doc["substituted"]]
    return "\n".join(out)
