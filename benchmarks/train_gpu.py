"""Training throughput: the icsd trainer end to end against an eager fp32 reference loop.

Both run in this process, on the same device, with the paper's shapes (CLIP ViT-B/32 vision
encoder at 384 px with interpolated position embeddings + BERT-base decoder with cross-attention,
random init, batch 64, captions of 30 tokens):

* reference loop: the model in fp32, eager, PyTorch's default AdamW, the label-smoothed loss,
  fed tensors already on the device (no data loading at all), TF32 off (what the paper's code did);
* icsd trainer: ``icsd.stages.train.run`` on a run directory of 512x512 JPEG webdataset shards on
  local disk (the real data path: tar reading, JPEG decode, RandomResizedCrop + flip, normalise in
  DataLoader workers), bf16 autocast, fused AdamW, TF32, optionally ``torch.compile``.

Printed: samples/s of both and their ratio, achieved TFLOP/s (analytic FLOPs per training sample
from the model's shapes, about 105 GFLOP for the paper's), the share of step time spent waiting
for data and, on a GPU with NVML, how busy the GPU was while the trainer ran.

    python benchmarks/train_gpu.py                    # GPU, paper shapes
    python benchmarks/train_gpu.py --compile          # trainer with torch.compile
    python benchmarks/train_gpu.py --tiny             # CPU, tiny shapes (CI)
    python benchmarks/train_gpu.py --device cpu --batch-size 4 --steps 2 --warmup 1   # paper shapes on a CPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# the COCO photos and captions that ship with the tests (ICSD_SHARED_DATA=DIR: DIR/coco instead)
_OTHER_DATA = os.environ.get("ICSD_SHARED_DATA")
SHARED = Path(_OTHER_DATA) / "coco" if _OTHER_DATA else REPO / "tests" / "data" / "coco"

PAPER = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "patch_size": 32, "image_size": 224},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "image_size": 384, "render_size": 512, "batch": 64, "tokens": 30,
}  # fmt: skip
TINY = {
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "patch_size": 16, "image_size": 32},
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "image_size": 64, "render_size": 128, "batch": 8, "tokens": 30,
}  # fmt: skip


# ----------------------------------------------------------------------------- setup


def save_random_components(root: Path, shapes: dict[str, Any]) -> tuple[Path, Path]:
    """Random-init CLIP vision and BERT folders in the given shapes (nothing downloaded)."""
    from bench_vocab import vocab_file  # this folder: the MiniLM vocabulary, or a stand-in without it
    from transformers import BertConfig, BertModel, BertTokenizer, CLIPVisionConfig, CLIPVisionModel

    from icsd.backends.captioners import clip_image_processor

    torch.manual_seed(0)
    clip, bert = root / "clip", root / "bert"
    CLIPVisionModel(CLIPVisionConfig(**shapes["vision"])).save_pretrained(clip)
    clip_image_processor(shapes["vision"]["image_size"]).save_pretrained(clip)
    tokenizer = BertTokenizer(vocab=str(vocab_file(root / "vocab")))
    BertModel(BertConfig(vocab_size=len(tokenizer), **shapes["text"])).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    return clip, bert


def long_captions(n: int) -> list[str]:
    """Real COCO captions joined until each is longer than the 30-token cap."""
    full = SHARED / "captions_val2017.json"
    data = json.loads((full if full.is_file() else SHARED / "captions_val2017_subset.json").read_text())
    texts = [a["caption"].strip() for a in data["annotations"]]
    rng = random.Random(0)
    return [" ".join(rng.sample(texts, 4)) for _ in range(n)]


def write_shards(run_root: Path, images: int, render_size: int, shard_size: int = 256, per_image: int = 5) -> int:
    """Render-contract shards of ``images`` 512x512 JPEGs (the COCO test photos, cropped and
    re-encoded under distinct keys), ``per_image`` long captions per image, plus pairs.parquet."""
    from PIL import Image

    from icsd.records import Pair, SampleMeta, to_table
    from icsd.store import RunDir, atomic_path, mark_done, write_parquet

    run = RunDir.at(run_root)
    photos = sorted(SHARED.glob("val2017/*.jpg"))
    if not photos:
        raise SystemExit(f"COCO photos not found under {SHARED}")
    encoded = []
    for p in photos:
        with Image.open(p) as im:
            im = im.convert("RGB")
            side = min(im.size)
            box = ((im.width - side) // 2, (im.height - side) // 2, (im.width + side) // 2, (im.height + side) // 2)
            buf = io.BytesIO()
            im.resize((render_size, render_size), Image.Resampling.BICUBIC, box=box).save(buf, "JPEG", quality=95)
            encoded.append(buf.getvalue())
    captions = long_captions(images * per_image)
    pairs = []
    import tarfile

    for start in range(0, images, shard_size):
        name = f"shard-{start // shard_size:05d}.tar"
        with atomic_path(run.images / name) as tmp, tarfile.open(tmp, "w") as tar:
            for i in range(start, min(images, start + shard_size)):
                key = f"img{i:07d}"
                meta = SampleMeta(id=key, summary=captions[per_image * i], seed=0, model="real-photo", steps=0, guidance=0.0,
                                  width=render_size, height=render_size, nsfw=False)  # fmt: skip
                for member, data in ((f"{key}.jpg", encoded[i % len(encoded)]), (f"{key}.json", meta.to_json())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                pairs += [Pair(key, name, captions[per_image * i + j], "selected") for j in range(per_image)]
        mark_done(run.images / name, {"count": min(shard_size, images - start)})
    write_parquet(to_table(pairs, Pair), run.pairs)
    return len(pairs)


# ----------------------------------------------------------------------------- FLOPs


def flops_per_sample(cm: Any, text_tokens: int) -> float:
    """Analytic training FLOPs of one sample (3x forward: matmuls + attention scores)."""
    v, t = cm.model.encoder.config, cm.model.decoder.config
    nv = (v.image_size // v.patch_size) ** 2 + 1
    dv, dt, T = v.hidden_size, t.hidden_size, text_tokens
    vision = v.num_hidden_layers * (2 * nv * (4 * dv * dv + 2 * dv * v.intermediate_size) + 4 * nv * nv * dv)
    vision += 2 * nv * 3 * v.patch_size**2 * dv
    per_layer = (
        2 * T * (4 * dt * dt + 2 * dt * t.intermediate_size)  # self-attention projections + MLP
        + 2 * T * 2 * dt * dt + 2 * nv * 2 * dv * dt  # cross-attention q,o on text; k,v on image tokens
        + 4 * T * T * dt + 4 * T * nv * dt  # attention scores and weighted sums
    )
    head = 2 * T * (dt * dt + dt * t.vocab_size)
    return 3.0 * (vision + t.num_hidden_layers * per_layer + head)


# ----------------------------------------------------------------------------- the two loops


def reference_loop(cm: Any, device: str, batch: int, tokens: int, steps: int, warmup: int) -> float:
    """Eager fp32 training on device-resident tensors; returns samples/s."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = cm.model.to(device).train()
    loss_fn = cm.loss_module(0.1).to(device)
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-5, weight_decay=0.05)
    size = cm.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    ids = torch.randint(1000, 29000, (batch, tokens), device=device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100
    n_tokens = float((labels[:, 1:] != -100).sum())
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        loss = loss_fn(pixels, ids, mask, labels) / n_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    del model, opt
    return steps * batch / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class GpuBusy:
    """Samples NVML utilisation while the trainer runs (None when NVML is not available)."""

    def __init__(self, device: str) -> None:
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.ok = device.startswith("cuda")
        if self.ok:
            try:
                torch.cuda.utilization()
            except Exception:  # NVML missing: pynvml not installed or no driver access
                self.ok = False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.samples.append(float(torch.cuda.utilization()))

    def __enter__(self) -> GpuBusy:
        if self.ok:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.ok:
            self.thread.join()

    def busy(self, skip_first: int) -> float | None:
        tail = self.samples[skip_first:]
        return sum(tail) / len(tail) / 100 if tail else None


def trainer_run(run_root: Path, clip: Path, bert: Path, args: argparse.Namespace, device: str) -> dict[str, Any]:
    from icsd.config import TrainConfig
    from icsd.stages import train as train_stage
    from icsd.store import RunDir

    cfg = TrainConfig(
        preset="icsd", vision_model=str(clip), text_model=str(bert), image_size=args.shapes["image_size"],
        batch_size=args.batch, max_steps=args.warmup + args.steps, log_every=args.log_every, device=device,
        num_workers=args.workers, val_fraction=0, eval_every=10**9, save_every=10**9, compile=args.compile,
        max_tokens=args.shapes["tokens"], lr=1e-5, seed=0,
        **({"data_order": "official", "group_captions": True} if args.group_captions else {}),
    )  # fmt: skip
    busy = GpuBusy(device)
    with busy:
        started = time.perf_counter()
        train_stage.run(cfg, RunDir.at(run_root))
        wall = time.perf_counter() - started
    records = [json.loads(x) for x in (run_root / "train" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "samples_per_s" in r and r["step"] > args.warmup]
    per_step = pairs_per_step(args)
    samples = sum(per_step * args.log_every for _ in measured)
    seconds = sum(per_step * args.log_every / r["samples_per_s"] for r in measured)
    wait = sum(r["data_wait_frac"] * per_step * args.log_every / r["samples_per_s"] for r in measured)
    warm_samples = int((wall - seconds) / 0.1)  # NVML samples during warm-up, roughly
    return {
        "samples_per_s": samples / seconds,
        "data_wait_frac": wait / seconds,
        "gpu_busy": busy.busy(max(0, warm_samples)),
        "wall_s": wall,
    }


def pairs_per_step(args: argparse.Namespace) -> int:
    """Pairs in one trainer step: the batch, or with grouped steps whole images of equal caption counts."""
    if not args.group_captions:
        return int(args.batch)
    return max(1, round(args.batch / args.captions_per_image)) * args.captions_per_image


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (what CI runs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--batch-size", type=int, default=None,
        help="pairs per step (default 64; tiny 8): lower it to run the paper shapes on a CPU",
    )  # fmt: skip
    ap.add_argument("--steps", type=int, default=None, help="measured steps per loop")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--images", type=int, default=None, help="synthetic images in the shards")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers of the trainer")
    ap.add_argument("--compile", action="store_true", help="trainer with torch.compile")
    ap.add_argument("--group-captions", action="store_true",
                    help="trainer with image-grouped steps (official data order); the reference stays ungrouped")
    ap.add_argument("--captions-per-image", type=int, default=5, help="captions per synthetic image in the shards")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--keep", type=Path, default=None, help="build the run directory here and keep it")
    args = ap.parse_args()

    from icsd.executor import resolve_device

    device = "cpu" if args.tiny and args.device == "auto" else resolve_device(args.device)
    args.shapes = TINY if args.tiny else PAPER
    args.batch = args.batch_size or args.shapes["batch"]
    if args.batch < 1:
        ap.error("--batch-size must be at least 1")
    args.steps = args.steps or (8 if args.tiny else 60)
    args.warmup = args.warmup or (4 if args.tiny else 20)
    args.log_every = 4 if args.tiny else 10
    args.images = args.images or (32 if args.tiny else 2048)
    args.workers = args.workers if args.workers is not None else (1 if args.tiny else max(1, (os.cpu_count() or 2) - 2))
    while args.batch % args.workers:
        args.workers -= 1

    from icsd.backends.captioners import CaptionerSpec, build_caption_model

    root = args.keep or Path(tempfile.mkdtemp(prefix="icsd-train-bench-"))
    try:
        clip, bert = save_random_components(root / "models", args.shapes)
        spec = CaptionerSpec(preset="icsd", vision_model=str(clip), text_model=str(bert), image_size=args.shapes["image_size"])
        cm = build_caption_model(spec)
        flops = flops_per_sample(cm, args.shapes["tokens"])
        from train_grouped import flop_parts, train_flops_per_pair  # this folder

        parts = flop_parts(cm, args.shapes["tokens"])
        icsd_flops = train_flops_per_pair(parts, args.captions_per_image, args.group_captions)
        params = sum(p.numel() for p in cm.model.parameters())
        reference = reference_loop(cm, device, args.batch, args.shapes["tokens"], args.steps, args.warmup)
        del cm
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        pairs = write_shards(root / "run", args.images, args.shapes["render_size"], per_image=args.captions_per_image)
        ours = trainer_run(root / "run", clip, bert, args, device)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    ratio = ours["samples_per_s"] / reference
    lever = "bf16 autocast, fused AdamW, TF32" + (", torch.compile" if args.compile else "") if device.startswith("cuda") else "fp32 (CPU)"
    if args.group_captions:
        lever += f", image-grouped steps ({args.captions_per_image} captions per image)"
    shape = "tiny" if args.tiny else "paper (CLIP ViT-B/32 @384 + BERT-base decoder)"
    print(f"Training throughput on {device_name(device)}: {shape}, {params / 1e6:.1f}M params, batch {args.batch}, "
          f"{args.shapes['tokens']} tokens, {flops / 1e9:.2f} GFLOP/sample")  # fmt: skip
    print()
    print("| loop | samples/s | TFLOP/s | data wait | GPU busy |")
    print("|---|---|---|---|---|")
    print(f"| reference (eager fp32, tensors on device) | {reference:.1f} | {reference * flops / 1e12:.3f} | - | - |")
    busy = f"{ours['gpu_busy']:.0%}" if ours["gpu_busy"] is not None else "n/a (no NVML)"
    print(f"| icsd trainer ({lever}; {args.workers} data workers, {pairs} pairs in shards) | "
          f"{ours['samples_per_s']:.1f} | {ours['samples_per_s'] * icsd_flops / 1e12:.3f} | {ours['data_wait_frac']:.1%} | {busy} |")  # fmt: skip
    print()
    print(f"ratio icsd/reference: {ratio:.2f}x")
    result = {
        "device": device_name(device), "shapes": "tiny" if args.tiny else "paper", "batch": args.batch,
        "gflop_per_sample": flops / 1e9, "reference_samples_per_s": reference, "icsd": ours, "ratio": ratio,
        "workers": args.workers, "compile": args.compile, "steps": args.steps, "warmup": args.warmup,
        "group_captions": args.group_captions, "captions_per_image": args.captions_per_image,
        "gflop_per_pair_icsd": icsd_flops / 1e9, "pairs_per_step": pairs_per_step(args),
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
