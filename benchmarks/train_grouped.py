"""Image-grouped training steps against ungrouped ones: the same pairs per step, the paper's shapes.

Each synthetic image comes with 5-10 selected captions. An ungrouped step runs the vision encoder
once per (image, caption) pair; a grouped step (``train.group_captions``) runs it once per image,
computes the decoder's cross-attention keys and values once per image, and the rest of the
decoder once per caption. Both steps here see the same pairs (``--images`` images x ``--captions``
captions), the same loss (label smoothing 0.1, summed over caption tokens) and a full AdamW step;
the model is CLIP ViT-B/32 at 384 px + a BERT-base decoder with cross-attention, random weights.

Printed and written (``--json``): pairs/s of both, their ratio, analytic training FLOPs per pair
of both (and the ratio), and FLOPs counted by ``torch.utils.flop_counter`` on one step of each.

    python benchmarks/train_grouped.py                      # paper shapes, device auto
    python benchmarks/train_grouped.py --tiny --steps 2     # tiny shapes (tests)

Imports only torch and transformers (plus icsd's captioner module).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PAPER = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "patch_size": 32},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "image_size": 384, "tokens": 30,
}  # fmt: skip
TINY = {
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "patch_size": 16},
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "image_size": 64, "tokens": 30,
}  # fmt: skip


def build_model(shapes: dict[str, Any]) -> Any:
    """The icsd captioner at the given shapes, random weights, dropout as BERT's default."""
    from bench_vocab import vocab_file  # this folder
    from transformers import BertConfig, BertLMHeadModel, BertTokenizer, CLIPVisionConfig, CLIPVisionModel

    from icsd.backends.captioners import CaptionerSpec, IcsdCaptioner, clip_image_processor

    torch.manual_seed(0)
    size = shapes["image_size"]
    tokenizer = BertTokenizer(vocab=str(vocab_file(Path(tempfile.mkdtemp(prefix="icsd-vocab-")))))
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=size, **shapes["vision"]))
    decoder = BertLMHeadModel(
        BertConfig(vocab_size=len(tokenizer), is_decoder=True, add_cross_attention=True, **shapes["text"])
    )
    spec = CaptionerSpec(preset="icsd", image_size=size)
    return IcsdCaptioner.compose(vision, decoder, tokenizer, clip_image_processor(size), spec)


def flop_parts(cm: Any, tokens: int) -> dict[str, float]:
    """Forward FLOPs: per image (vision encoder; cross-attention keys/values) and per caption (the rest)."""
    v, t = cm.model.encoder.config, cm.model.decoder.config
    nv = (v.image_size // v.patch_size) ** 2 + 1
    dv, dt, T = v.hidden_size, t.hidden_size, tokens
    vision = v.num_hidden_layers * (2 * nv * (4 * dv * dv + 2 * dv * v.intermediate_size) + 4 * nv * nv * dv)
    vision += 2 * nv * 3 * v.patch_size**2 * dv
    kv = t.num_hidden_layers * 2 * nv * 2 * dv * dt
    per_layer = (
        2 * T * (4 * dt * dt + 2 * dt * t.intermediate_size)  # self-attention projections + MLP
        + 2 * T * 2 * dt * dt  # cross-attention query and output projections
        + 4 * T * T * dt + 4 * T * nv * dt  # attention scores and weighted sums
    )
    caption = t.num_hidden_layers * per_layer + 2 * T * (dt * dt + dt * t.vocab_size)
    return {"vision": float(vision), "cross_kv": float(kv), "caption": float(caption)}


def train_flops_per_pair(parts: dict[str, float], captions_per_image: float, grouped: bool) -> float:
    """Training FLOPs (3x forward) per pair."""
    per_image = parts["vision"] + parts["cross_kv"]
    return 3.0 * (per_image / (captions_per_image if grouped else 1.0) + parts["caption"])


def make_batch(cm: Any, images: int, captions: int, tokens: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = cm.image_size
    pairs = images * captions
    ids = torch.randint(1000, 29000, (pairs, tokens), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # [CLS] + the prompt
    return {
        "pixels": torch.randn(images, 3, size, size, generator=g).to(device),
        "index": torch.arange(images).repeat_interleave(captions).to(device),
        "ids": ids.to(device),
        "mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def step(loss_fn: Any, opt: Any, batch: dict[str, torch.Tensor], grouped: bool, device: str = "cpu") -> tuple[float, float]:
    """One training step; returns the wall and CPU seconds of its optimizer update."""
    if grouped:
        loss = loss_fn(batch["pixels"], batch["ids"], batch["mask"], batch["labels"], image_index=batch["index"])
    else:
        pixels = batch["pixels"].index_select(0, batch["index"])  # the ungrouped step: one image per pair
        loss = loss_fn(pixels, batch["ids"], batch["mask"], batch["labels"])
    tokens = float((batch["labels"][:, 1:] != -100).sum())
    (loss / tokens).backward()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(cm: Any, batch: dict[str, torch.Tensor], grouped: bool, steps: int, warmup: int, device: str) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    loss_fn = cm.loss_module(0.1).to(device)
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-5, weight_decay=0.05)
    counter = FlopCounterMode(display=False)
    with counter:  # the first warm-up step, counted (not timed)
        step(loss_fn, opt, batch, grouped)
    for _ in range(max(0, warmup - 1)):
        step(loss_fn, opt, batch, grouped)
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    updates = [step(loss_fn, opt, batch, grouped, device) for _ in range(steps)]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    update, cpu_update = sum(u[0] for u in updates), sum(u[1] for u in updates)
    pairs = len(batch["ids"])
    return {
        "pairs_per_s": steps * pairs / seconds,
        "step_s": seconds / steps,
        "optimizer_s": update / steps,
        "fwd_bwd_pairs_per_s": steps * pairs / (seconds - update),
        "cpu_s_per_pair": cpu / (steps * pairs),  # this process's CPU time: robust to other jobs on the box
        "fwd_bwd_cpu_s_per_pair": (cpu - cpu_update) / (steps * pairs),
        "counted_flops_per_pair": counter.get_total_flops() / pairs,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--images", type=int, default=2, help="images per step")
    ap.add_argument("--captions", type=int, default=7, help="captions per image")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode (the first one counted)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY if args.tiny else PAPER
    cm = build_model(shapes)
    cm.model.to(device).train()
    parts = flop_parts(cm, shapes["tokens"])
    batch = make_batch(cm, args.images, args.captions, shapes["tokens"], device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = {}
    for mode, grouped in (("ungrouped", False), ("grouped", True)):
        results[mode] = measure(cm, batch, grouped, args.steps, args.warmup, device)
        results[mode]["analytic_flops_per_pair"] = train_flops_per_pair(parts, args.captions, grouped)
    u, g = results["ungrouped"], results["grouped"]
    out = {
        "device": device_name(device), "shapes": "tiny" if args.tiny else "paper", "images": args.images,
        "captions_per_image": args.captions, "pairs_per_step": args.images * args.captions, "steps": args.steps,
        "load_average_start": load, "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **results, "speedup": g["pairs_per_s"] / u["pairs_per_s"],
        "fwd_bwd_speedup": g["fwd_bwd_pairs_per_s"] / u["fwd_bwd_pairs_per_s"],
        "cpu_speedup": u["cpu_s_per_pair"] / g["cpu_s_per_pair"],
        "fwd_bwd_cpu_speedup": u["fwd_bwd_cpu_s_per_pair"] / g["fwd_bwd_cpu_s_per_pair"],
        "analytic_flop_ratio": u["analytic_flops_per_pair"] / g["analytic_flops_per_pair"],
        "counted_flop_ratio": u["counted_flops_per_pair"] / g["counted_flops_per_pair"],
    }  # fmt: skip
    shape = "tiny" if args.tiny else "paper (CLIP ViT-B/32 @384 + BERT-base decoder)"
    print(f"Grouped vs ungrouped training steps on {out['device']}: {shape}, {args.images} images x "
          f"{args.captions} captions = {args.images * args.captions} pairs per step, {args.steps} timed steps")  # fmt: skip
    print()
    print("| step | pairs/s | s/step | of which AdamW s | pairs/s, forward + backward | CPU s/pair | CPU s/pair, fwd + bwd "
          "| GFLOP/pair (analytic) | GFLOP/pair (counted) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("ungrouped", "grouped"):
        r = results[mode]
        print(f"| {mode} | {r['pairs_per_s']:.2f} | {r['step_s']:.2f} | {r['optimizer_s']:.2f} | {r['fwd_bwd_pairs_per_s']:.2f} | "
              f"{r['cpu_s_per_pair']:.2f} | {r['fwd_bwd_cpu_s_per_pair']:.2f} | "
              f"{r['analytic_flops_per_pair'] / 1e9:.1f} | {r['counted_flops_per_pair'] / 1e9:.1f} |")  # fmt: skip
    print()
    print(f"grouped/ungrouped: {out['speedup']:.2f}x pairs/s ({out['fwd_bwd_speedup']:.2f}x forward + backward), "
          f"{out['cpu_speedup']:.2f}x in CPU time per pair ({out['fwd_bwd_cpu_speedup']:.2f}x forward + backward); FLOPs per pair {out['analytic_flop_ratio']:.2f}x fewer "
          f"(analytic), {out['counted_flop_ratio']:.2f}x (counted); load average {load} -> {out['load_average_end']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
