"""Exact grouping on a GPU: top-K of N synthetic clustered unit vectors, blocked matmuls + topk in torch.

The code ``icsd group --device cuda`` runs (``icsd.knn.torch_candidate_sets``: self first,
duplicate sets dropped), timed end to end from host vectors to candidate sets, in fp32 (TF32
off) and bf16 with an fp32 re-rank. Checked: recall@K of each against exact fp64 top-K on a
sample of queries (the bf16 path must reach 1.0 apart from exact ties).

    python benchmarks/group_gpu.py                          # N = 566,747, 512-d, K = 30 (the COCO corpus)
    python benchmarks/group_gpu.py --n 3000 --dim 64 --device cpu   # tiny, on the CPU (tests)

Imports numpy and torch only (no faiss).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from group_scale import make_vectors  # noqa: E402  (this folder)


def exact_sample(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    sims = x[rows].astype(np.float64) @ x.T.astype(np.float64)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / exact.shape[1] for a, e in zip(ids, exact, strict=True)]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from icsd.knn import torch_candidate_sets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=566_747)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--block-size", type=int, default=8192)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--recall-queries", type=int, default=500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    x = make_vectors(args.n, args.dim, "clustered")
    rows = np.sort(np.random.default_rng(1).choice(args.n, min(args.recall_queries, args.n), replace=False))
    exact = exact_sample(x, rows, args.k)
    out: dict[str, Any] = {"device": name, "n": args.n, "dim": args.dim, "k": args.k, "runs": {}}
    if device.startswith("cuda"):  # warm-up: CUDA context and kernels, not counted
        torch_candidate_sets(x[:20_000], args.k, device, "fp32", args.block_size)
        torch.cuda.synchronize()
    for precision in args.precisions.split(","):
        start = time.perf_counter()
        ids, _, keep = torch_candidate_sets(x, args.k, device, precision, args.block_size)
        seconds = time.perf_counter() - start
        out["runs"][precision] = {"seconds": seconds, "groups": int(keep.sum()), "recall": recall(ids[rows], exact)}
        print(f"{name}: N={args.n} d={args.dim} K={args.k} {precision}: {seconds:.1f} s end to end, "
              f"{int(keep.sum())} sets kept, recall@{args.k} {out['runs'][precision]['recall']:.4f} "
              f"on {len(rows)} queries", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
