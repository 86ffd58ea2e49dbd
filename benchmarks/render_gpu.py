"""Render throughput: `icsd render` end to end against the reference loop of the paper's script.

Both run in this process, on the same device, on the same prompts and the same per-image seeds:

* reference loop: diffusers ``StableDiffusionPipeline``, eager, DPM-Solver multistep, CFG 7.5,
  batch 16, one ``.jpg`` saved per image with PIL (what the official ICSD script did);
* icsd: ``icsd.stages.render.run`` on a run directory (prompt encoding, denoising, VAE decode,
  safety checker, JPEG encode on a CPU thread, webdataset shard write, done-markers), with the
  GPU levers chosen by flags.

Weights are random, in the Stable Diffusion 1.5 shapes written below (no download): the compute is
the same as a real checkpoint's. Printed: images/s of both and their ratio, achieved TFLOP/s and
the fraction of the floor (device matmul peak / FLOPs per image, both measured here), and whether
the images are equal within fp16 tolerance for the same seeds.

    python benchmarks/render_gpu.py                       # GPU, SD-1.5 shapes, 512px, 20 steps
    python benchmarks/render_gpu.py --compile --channels-last
    python benchmarks/render_gpu.py --sweep               # one row per lever
    python benchmarks/render_gpu.py --tiny                # CPU, tiny shapes (CI)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# SD-1.5 component configs (runwayml/stable-diffusion-v1-5), written out so nothing is downloaded.
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
SD15_SAFETY_VISION: dict[str, Any] = {  # CLIP ViT-L/14, the SD-1.x safety checker's tower
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "quick_gelu",
}
SD15_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
# Issue anchors for SD-1.5 at 512px (H200): UNet with CFG per image per step, VAE decode per image.
ANCHOR_UNET_TFLOP = 1.61
ANCHOR_VAE_TFLOP = 2.5

NOUNS = ["dog", "cat", "bus", "kitchen", "surfer", "train", "pizza", "giraffe", "bicycle", "clock"]
PLACES = ["on a city street", "in a grassy field", "next to a table", "near the water", "in a small room"]
LIGHTS = ["morning", "evening", "bright", "soft", "overcast"]


def prompts(n: int) -> list[tuple[str, str]]:
    """(item id, summary) pairs: deterministic multi-clause scene descriptions."""
    out = []
    for i in range(n):
        noun, place, light = NOUNS[i % 10], PLACES[(i // 10) % 5], LIGHTS[(i // 50) % 5]
        text = (
            f"A {noun} {place} photographed in {light} light, with people and objects around it, number {i}."
        )
        out.append((f"b{i:06d}", text))
    return out


# ----------------------------------------------------------------------------- model building


def build_sd15_random(dest: Path, device: str, dtype: Any, safety_checker: bool) -> Path:
    """Random-weight SD-1.5-shaped pipeline (UNet, VAE, CLIP text, ViT-L/14 safety checker), saved."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from icsd.backends.t2i import write_clip_tokenizer_files

    torch.manual_seed(0)
    tok_dir = write_clip_tokenizer_files(dest.parent / "clip_bpe")
    with torch.device(device):  # initialise on the device: much faster than a CPU init of 1.3 B params
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        checker = None
        if safety_checker:
            cfg = CLIPConfig(
                text_config={k: v for k, v in SD15_TEXT.items() if k != "projection_dim"},
                vision_config=SD15_SAFETY_VISION,
                projection_dim=768,
            )
            checker = StableDiffusionSafetyChecker(cfg).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77),
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=checker,
        feature_extractor=CLIPImageProcessor() if safety_checker else None,
        requires_safety_checker=safety_checker,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def build_tiny(dest: Path, safety_checker: bool) -> Path:
    from icsd.backends.t2i import build_tiny_pipeline

    return build_tiny_pipeline(dest, safety_checker=safety_checker)


# ----------------------------------------------------------------------------- FLOPs and peak


def count_flops(model_dir: Path, device: str, dtype: Any, size: int) -> tuple[float, float]:
    """FLOPs of one UNet call with CFG (batch 2) for one image, and of one VAE decode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from icsd.backends.t2i import _dtype_kwarg

    kw = {_dtype_kwarg(): dtype}
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **kw).to(device)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **kw).to(device)
    lat = size // 8
    with torch.inference_mode():
        x = torch.randn(2, 4, lat, lat, device=device, dtype=dtype)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
        with FlopCounterMode(display=False) as fc:
            unet(x, 500, encoder_hidden_states=ctx)
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.decode(x[:1])
        vae_flops = fc.get_total_flops()
    del unet, vae
    return float(unet_flops), float(vae_flops)


def matmul_peak(device: str, dtype: Any) -> float:
    """Measured dense matmul FLOP/s of this device in this dtype."""
    import torch

    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.startswith("cuda") else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the two paths


def reference_loop(
    model_dir: Path,
    items: list[tuple[str, str]],
    args: argparse.Namespace,
    device: str,
    dtype: Any,
    out: Path,
) -> tuple[float, dict[str, np.ndarray]]:
    """The paper's loop: StableDiffusionPipeline, eager, DPM-Solver, one PIL .jpg per image."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from icsd.backends.t2i import _dtype_kwarg, item_seed

    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype}
    if args.no_safety_checker:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, **kwargs).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    pixels: dict[str, np.ndarray] = {}

    def batch_call(batch: list[tuple[str, str]]) -> list[Any]:
        gens = [torch.Generator("cpu").manual_seed(item_seed(args.seed, i)) for i, _ in batch]
        return pipe(  # type: ignore[no-any-return]
            [p for _, p in batch],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=gens,
        ).images

    batch_call(items[: args.batch_size])  # warm-up, not timed
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(items), args.batch_size):
        batch = items[i : i + args.batch_size]
        for (key, _), image in zip(batch, batch_call(batch), strict=True):
            image.save(out / f"{key}.jpg")
            pixels[key] = np.asarray(image)
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, pixels


def icsd_render(
    model_dir: Path,
    items: list[tuple[str, str]],
    args: argparse.Namespace,
    device: str,
    levers: dict[str, Any],
    work: Path,
) -> tuple[float, Path]:
    """`icsd render` on a fresh run directory, after a warm-up run that loads (and compiles)."""
    from icsd.backends import t2i
    from icsd.config import RenderConfig
    from icsd.records import Selection, to_table
    from icsd.stages import render
    from icsd.store import RunDir, write_parquet

    t2i.keep_pipelines_loaded(True)

    def run_dir(name: str, subset: list[tuple[str, str]]) -> RunDir:
        run = RunDir.at(work / name)
        rows = [Selection(group_id=i, status="ok", selected_ids=[i], summary=p) for i, p in subset]
        write_parquet(to_table(rows, Selection), run.selections)
        return run

    cfg = RenderConfig(
        model=str(model_dir),
        steps=args.steps,
        guidance=args.guidance,
        size=args.size,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        seed=args.seed,
        dtype=args.dtype,
        scheduler="dpm++",
        quality=args.quality,
        safety_checker=not args.no_safety_checker,
        devices="cpu" if device == "cpu" else device.split(":")[-1] if ":" in device else "0",
        **levers,
    )
    render.run(cfg, run_dir("warmup", items[: args.batch_size]))
    run = run_dir("timed", items)
    sync(device)
    start = time.perf_counter()
    render.run(cfg, run)
    sync(device)
    seconds = time.perf_counter() - start
    t2i.keep_pipelines_loaded(False)
    return seconds, run.images


def shard_pixels(images: Path, quality: int) -> dict[str, np.ndarray]:
    import tarfile

    from PIL import Image

    out: dict[str, np.ndarray] = {}
    for shard in sorted(images.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                    out[m.name[:-4]] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return out


def compare(
    reference: dict[str, np.ndarray], rendered: dict[str, np.ndarray], quality: int
) -> dict[str, float]:
    """Reference pixels through the same JPEG encoder as the shards, against the shards' images."""
    from PIL import Image

    from icsd.stages.render import encode_image

    diffs, identical, flat = [], 0, 0
    for key, ref in reference.items():
        flat += int(ref.std() < 2.0)  # black (NSFW-blanked or NaN) or uniform: equality would say little
        ref_jpg = np.asarray(Image.open(io.BytesIO(encode_image(ref, "jpg", quality))).convert("RGB"))
        d = np.abs(ref_jpg.astype(np.int16) - rendered[key].astype(np.int16))
        identical += int(not d.any())
        diffs.append(d)
    all_d = np.stack(diffs).astype(np.float64)
    mse = float((all_d**2).mean())
    return {
        "images": len(diffs),
        "identical": identical,
        "flat": flat,
        "mean_abs": float(all_d.mean()),
        "max_abs": float(all_d.max()),
        "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255**2 / mse),
    }


# ----------------------------------------------------------------------------- main


LEVER_SWEEP: list[tuple[str, dict[str, Any]]] = [
    ("eager", {}),
    ("channels_last", {"channels_last": True}),
    ("fuse_qkv", {"fuse_qkv": True}),
    ("compile", {"compile": True}),
    ("compile+channels_last", {"compile": True, "channels_last": True}),
    ("compile+channels_last+fuse_qkv", {"compile": True, "channels_last": True, "fuse_qkv": True}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random shapes on CPU (CI)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--images", type=int, default=None, help="timed images per path (default 160; tiny 8)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16; tiny 4")
    p.add_argument("--steps", type=int, default=None, help="default 20; tiny 2")
    p.add_argument("--size", type=int, default=None, help="default 512; tiny 32")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--shard-size", type=int, default=None, help="default 80; tiny 4")
    p.add_argument(
        "--dtype", default="auto", help="icsd dtype: auto (fp16 on cuda, fp32 on cpu) | fp16 | bf16"
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fuse-qkv", action="store_true")
    p.add_argument("--sweep", action="store_true", help="run icsd once per lever combination")
    p.add_argument("--no-safety-checker", action="store_true", help="drop the safety checker in both paths")
    p.add_argument("--max-mean-abs", type=float, default=2.0, help="equality tolerance: mean |diff| (0-255)")
    p.add_argument("--min-psnr", type=float, default=30.0, help="equality tolerance: PSNR in dB")
    p.add_argument("--workdir", default=None, help="where models and outputs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    defaults = {
        "images": (160, 8),
        "batch_size": (16, 4),
        "steps": (20, 2),
        "size": (512, 32),
        "shard_size": (80, 4),
    }
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from icsd.backends.t2i import resolve_dtype

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu" and not args.tiny and args.device == "auto":
        print(
            "no GPU found: SD-1.5 shapes at 512px are impractical on CPU; use --tiny (or --device cpu to insist)"
        )
        return 2
    dtype = resolve_dtype(args.dtype, device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="icsd-render-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    items = prompts(args.images)
    try:
        t0 = time.perf_counter()
        model_dir = work / "model"
        if not (model_dir / "model_index.json").is_file():
            if args.tiny:
                build_tiny(model_dir, not args.no_safety_checker)
            else:
                build_sd15_random(model_dir, device, dtype, not args.no_safety_checker)
        build_s = time.perf_counter() - t0
        unet_flops, vae_flops = count_flops(model_dir, device, dtype, args.size)
        per_image = unet_flops * args.steps + vae_flops
        peak = matmul_peak(device, dtype)
        floor = peak / per_image

        ref_s, ref_pixels = reference_loop(model_dir, items, args, device, dtype, work / "reference")
        sweep = (
            LEVER_SWEEP
            if args.sweep
            else [
                (
                    "selected",
                    {
                        "compile": args.compile,
                        "compile_mode": args.compile_mode,
                        "channels_last": args.channels_last,
                        "fuse_qkv": args.fuse_qkv,
                    },
                )
            ]
        )
        rows: list[dict[str, Any]] = []
        ref_ips = len(items) / ref_s
        rows.append({"path": "reference loop (paper script)", "seconds": ref_s, "ips": ref_ips})
        for name, levers in sweep:
            if args.sweep:
                levers = {**levers, "compile_mode": args.compile_mode}
            secs, images = icsd_render(model_dir, items, args, device, levers, work / f"icsd-{name}")
            check = compare(ref_pixels, shard_pixels(images, args.quality), args.quality)
            rows.append(
                {
                    "path": f"icsd render [{name}]",
                    "seconds": secs,
                    "ips": len(items) / secs,
                    "levers": levers,
                    "equality": check,
                }
            )
            shutil.rmtree(images.parent, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    ok = report(args, device, dtype, rows, unet_flops, vae_flops, per_image, peak, floor, build_s)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device_name(device), "rows": rows}, indent=2, default=str)
        )
    return 0 if ok else 1


def report(
    args: argparse.Namespace,
    device: str,
    dtype: Any,
    rows: list[dict[str, Any]],
    unet_flops: float,
    vae_flops: float,
    per_image: float,
    peak: float,
    floor: float,
    build_s: float,
) -> bool:
    tf = 1e12
    shapes = (
        "tiny random shapes"
        if args.tiny
        else "random weights in SD-1.5 shapes (UNet, VAE, CLIP text, safety checker)"
    )
    print(f"device: {device_name(device)}  dtype: {str(dtype).replace('torch.', '')}")
    print(f"model: {shapes}; built and saved in {build_s:.1f}s")
    print(
        f"settings: {args.size}x{args.size}, {args.steps} steps DPM-Solver++, CFG {args.guidance}, "
        f"batch {args.batch_size}, {args.images} images per path, safety checker "
        f"{'off' if args.no_safety_checker else 'on'}"
    )
    print(
        f"FLOPs per image (counted): UNet with CFG {unet_flops / tf:.4g} TFLOP/step, VAE decode "
        f"{vae_flops / tf:.4g} TFLOP, total {per_image / tf:.4g} TFLOP"
        + ("" if args.tiny else f"  (anchors: {ANCHOR_UNET_TFLOP} and {ANCHOR_VAE_TFLOP} TFLOP)")
    )
    print(f"matmul peak (measured): {peak / tf:.4g} TFLOP/s -> floor {floor:.4g} images/s")
    print()
    print("| path | images/s | TFLOP/s | % of floor | ratio vs reference | equal to reference |")
    print("|---|---:|---:|---:|---:|---|")
    ref_ips = rows[0]["ips"]
    ok = True
    for row in rows:
        eq = row.get("equality")
        if eq:
            passed = eq["mean_abs"] <= args.max_mean_abs and eq["psnr_db"] >= args.min_psnr
            ok &= passed
            eq_text = (
                f"{'yes' if passed else 'NO'}: {eq['identical']}/{eq['images']} identical, mean |d| "
                f"{eq['mean_abs']:.3f}, max |d| {eq['max_abs']:.0f}, PSNR {eq['psnr_db']:.1f} dB, "
                f"{eq['flat']} flat reference images"
            )
        else:
            eq_text = "-"
        print(
            f"| {row['path']} | {row['ips']:.3f} | {row['ips'] * per_image / tf:.4g} | "
            f"{100 * row['ips'] / floor:.1f} % | {row['ips'] / ref_ips:.2f}x | {eq_text} |"
        )
    best = max(rows[1:], key=lambda r: r["ips"])
    print()
    print(f"ratio icsd/reference: {best['ips'] / ref_ips:.2f}x ({best['path']})")
    print(f"images equal within tolerance: {'yes' if ok else 'NO'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
