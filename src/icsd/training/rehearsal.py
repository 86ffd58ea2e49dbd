"""The training stage's part of ``icsd run CONFIG --rehearse`` (its ``RehearsalHooks``): the
captioner's models, a few steps at a small batch, and the projection of the full training with
its validations; the memory one more pair costs, and the trained checkpoint loaded with plain
transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrainConfig, package_file

if TYPE_CHECKING:
    from ..rehearse.hooks import Row, StageRehearsal


def models(ctx: StageRehearsal) -> None:
    from .trainer import captioner_spec

    spec = captioner_spec(ctx.configured)
    for role, setting, use in spec.family.components(spec):
        ctx.need(role, setting, getattr(spec, setting), use)
    if not spec.family.components(spec):
        ctx.note(f"the {spec.preset} captioner's components are used as they are")


def reduce(ctx: StageRehearsal) -> None:
    cfg, r, opts = ctx.configured, ctx.config, ctx.options
    r.max_steps = opts.train_steps
    r.batch_size = min(cfg.batch_size, opts.batch)
    r.grad_accum = 1
    r.eval_every = opts.train_steps
    r.save_every = opts.train_steps
    r.log_every = 1
    r.val_max_images = min(cfg.val_max_images or opts.eval_images, opts.eval_images)
    r.restart = True
    r.tensorboard = False
    r.data_streams = None
    if not ctx.on_gpu:
        r.compile = False
    ctx.reduced(f"{opts.train_steps} steps at batch {r.batch_size} (configured batch {cfg.batch_size} x "
                f"grad_accum {cfg.grad_accum}), validation once on {r.val_max_images} images")  # fmt: skip
    if (cfg.val_images or cfg.val_captions) and not (ctx.exists("val_images") and ctx.exists("val_captions")):
        r.val_images = str(package_file("data/quickstart/images"))
        r.val_captions = str(package_file("data/quickstart/references.json"))
        ctx.substituted("train.val_images/val_captions: the bundled COCO images and references")


def validation_images(cfg: TrainConfig) -> int:
    """Images per validation: the configured cap, else the COCO Karpathy val split's 5,000."""
    return cfg.val_max_images or 5000


def project(ctx: StageRehearsal) -> Row:
    """Steps of the full run at the last step's rate, plus its validations at the rehearsal's
    seconds per image; the memory at the configured batch from the cost of one more pair."""
    from ..rehearse.hooks import Size, extrapolate_memory, fmt_seconds, per

    rec = ctx.record
    assert rec is not None and ctx.run_dir is not None
    cfg, r = ctx.configured, ctx.config
    architecture, parameters = ctx.architecture("vision_model", "text_model")
    rate = train_samples_per_s(ctx.run_dir)
    spu = 1.0 / rate if rate else per(rec.seconds, r.max_steps or 1)
    full_pairs = int(ctx.size("pairs") or 0)
    global_batch = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(full_pairs / global_batch) if full_pairs else 0
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    trained = total_steps * global_batch
    ctx.sizes["epochs"] = Size(cfg.epochs, "train.epochs")
    ctx.sizes["val_images"] = Size(validation_images(cfg), "train.val_max_images" if cfg.val_max_images
                                   else "the whole val split: COCO Karpathy val, 5,000 images")  # fmt: skip
    gen = ctx.probe("generate")
    per_val_image = per(gen.seconds, gen.items)
    validations = math.ceil(total_steps / cfg.eval_every) if total_steps else 0
    val_seconds = validations * validation_images(cfg) * (per_val_image or 0.0)
    trainable = model_parameters(ctx.run_dir)
    built = f"{architecture} + cross-attention " if architecture != "-" else ""
    row = ctx.row(architecture=f"{built}({cfg.preset} preset, {image_size(ctx.run_dir)} px)",
                  parameters=trainable or parameters,
                  settings={"preset": cfg.preset, "image_size": cfg.image_size, "prompt": cfg.prompt,
                            "label_smoothing": cfg.label_smoothing, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                            "batch_size": cfg.batch_size, "epochs": cfg.epochs, "beams": cfg.beams,
                            "min_new_tokens": cfg.min_new_tokens, "max_new_tokens": cfg.max_new_tokens},
                  unit="pair", units=(r.max_steps or 0) * r.batch_size, seconds_per_unit=spu, full_units=trained,
                  projected_seconds=(spu or 0) * trained + val_seconds,
                  projection=f"{total_steps:,} steps x batch {cfg.batch_size} at the last step's rate, plus "
                             f"{validations} validations of {validation_images(cfg)} images at "
                             f"{fmt_seconds(per_val_image)}/image")  # fmt: skip
    slope, how = activation_bytes_per_pair(r, ctx.on_gpu)
    row.settings["memory_per_pair"] = {"bytes": slope, "how": how}
    if slope is not None:
        row.peak_rss_configured = int(rec.peak_rss + slope * (cfg.batch_size - r.batch_size))
    else:
        row.peak_rss_configured = extrapolate_memory(rec, (trainable or 0) * 16, r.batch_size, cfg.batch_size)
    roundtrip = captioner_roundtrip(ctx.run_dir, r)
    ctx.document["captioner_checkpoint_roundtrip"] = roundtrip
    if roundtrip:
        ctx.findings.append("Trained captioner checkpoint: plain VisionEncoderDecoderModel gives "
                            f"{'the same' if roundtrip['ok'] else 'a DIFFERENT'} caption.")  # fmt: skip
    return row


def activation_bytes_per_pair(t: TrainConfig, on_gpu: bool) -> tuple[int | None, str]:
    """Memory one more training pair costs, from forward+backward passes of the rehearsal's
    captioner (batch 1 to warm up, then 1 and 3) at the configured image size and caption length:
    the part of the training peak that grows with the batch."""
    import torch

    from ..backends.captioners import build_caption_model
    from ..rehearse.measure import peak_rss_self, reset_peak_rss, rss_bytes, trim_heap
    from .trainer import captioner_spec

    spec = captioner_spec(t)
    device = "cuda" if on_gpu else "cpu"
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


def captioner_roundtrip(run_dir: Path, t: TrainConfig) -> dict[str, Any] | None:
    """The trained checkpoint loaded with plain transformers gives the captions icsd gives."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    from ..backends.captioners import load_captioner

    folder = next(
        (run_dir / "train" / n for n in ("best", "last") if (run_dir / "train" / n / "config.json").exists()),
        None,
    )
    if folder is None or t.preset not in ("icsd", "tiny"):
        return None
    image = Image.open(sorted(package_file("data/quickstart/images").glob("*.jpg"))[0]).convert("RGB")
    settings = {
        "beams": t.beams,
        "min_new_tokens": t.min_new_tokens,
        "max_new_tokens": t.max_new_tokens,
    }
    ours = load_captioner(str(folder), device="cpu").caption(
        [image], beams=settings["beams"], min_new_tokens=settings["min_new_tokens"],
        max_new_tokens=settings["max_new_tokens"],
    )[0]  # fmt: skip
    model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    proc = AutoImageProcessor.from_pretrained(folder)
    pixels = proc(image, return_tensors="pt").pixel_values
    prompt = tok(t.prompt.strip(), return_tensors="pt").input_ids[:, :-1]
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, decoder_input_ids=prompt, num_beams=settings["beams"],
                             min_new_tokens=settings["min_new_tokens"], max_new_tokens=settings["max_new_tokens"])  # fmt: skip
    plain = str(tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)).strip()
    return {"checkpoint": str(folder), "loads_with": "transformers.VisionEncoderDecoderModel",
            "icsd": ours, "plain_transformers": plain, "ok": ours.strip() == plain}  # fmt: skip


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
