"""Grouping at scale: N unit vectors of dimension 384, K = 30, exact flat vs IVF vs HNSW.

    python benchmarks/group_scale.py --n 100000 --indexes flat,ivf,hnsw
    python benchmarks/group_scale.py --n 1000000 --indexes ivf --data clustered

For each index: build + search seconds for all N queries (the whole grouping), peak RSS, and
recall@K against exact search on a sample of queries. Flat (exact) search is what the paper's
scripts do; its full time is measured, or extrapolated from a measured query sample when
``--flat-sample`` is given (printed as "extrapolated"). Every index runs in its own subprocess so
peak RSS is its own.

Data: ``random`` (i.i.d. Gaussian directions: no neighbourhood structure, the worst case for
approximate search) or ``clustered`` (a mixture around random centres, closer to how caption
embeddings sit: many paraphrases of the same scene).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def make_vectors(n: int, dim: int, data: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    if data == "clustered":
        centres = rng.standard_normal((max(1, n // 50), dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        if data == "clustered":
            block = centres[rng.integers(0, len(centres), m)] + 0.06 * rng.standard_normal((m, dim), dtype=np.float32)
        else:
            block = rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def child(args: argparse.Namespace) -> None:
    from icsd.knn import IndexSpec, build_index, exact_topk, recall_at_k, search_blocks

    x = make_vectors(args.n, args.dim, args.data)
    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(args.n, min(args.recall_queries, args.n), replace=False))
    spec = IndexSpec(kind=args.index, nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search,
                     ef_construction=args.ef_construction, nlist=args.nlist)
    t0 = time.perf_counter()
    index = build_index(x, spec)
    build_s = time.perf_counter() - t0
    extrapolated = False
    if args.index == "flat" and args.flat_sample:
        q = x[sample[: args.flat_sample]]
        t1 = time.perf_counter()
        search_blocks(index, q, args.k, args.block_size)
        search_s = (time.perf_counter() - t1) * args.n / len(q)
        extrapolated = True
        recall = 1.0
    else:
        t1 = time.perf_counter()
        _, ids = search_blocks(index, x, args.k, args.block_size)
        search_s = time.perf_counter() - t1
        recall = 1.0 if args.index == "flat" else recall_at_k(ids[sample], exact_topk(x, x[sample], args.k))
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"index": args.index, "build_s": build_s, "search_s": search_s, "total_s": build_s + search_s,
                      "recall": recall, "peak_rss_gb": rss_gb, "extrapolated": extrapolated}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--data", choices=["random", "clustered"], default="random")
    ap.add_argument("--indexes", default="flat,ivf,hnsw")
    ap.add_argument("--recall-queries", type=int, default=2000)
    ap.add_argument("--flat-sample", type=int, default=0, help="extrapolate flat from this many queries")
    ap.add_argument("--block-size", type=int, default=8192)
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.index:
        child(args)
        return
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; N={args.n} dim={args.dim} K={args.k} data={args.data}")
    results = []
    for kind in args.indexes.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--index", kind]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        r = results[-1]
        print(f"  {kind:<5} build {r['build_s']:7.1f}s  search {r['search_s']:8.1f}s  total {r['total_s']:8.1f}s"
              f"{' (extrapolated)' if r['extrapolated'] else ''}  recall@{args.k} {r['recall']:.3f}  peak RSS {r['peak_rss_gb']:.2f} GB",
              flush=True)
    flat = next((r for r in results if r["index"] == "flat"), None)
    if flat:
        for r in results:
            if r["index"] != "flat":
                print(f"  speed-up of {r['index']} over exact flat: {flat['total_s'] / r['total_s']:.1f}x"
                      f" (flat {'extrapolated' if flat['extrapolated'] else 'measured'})")


if __name__ == "__main__":
    main()
