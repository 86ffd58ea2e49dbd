"""Ingest + embed + group of a real caption corpus on this machine: wall time and captions/s per stage.

    python benchmarks/text_stages.py [--corpus ../shared/data/coco/captions_val2017.json] [--k 30]

Target (issue: text stages): the whole chain on the 25k COCO val captions under 3 minutes on 2 cores.
Prints each stage through the same stage functions the CLI uses, and the total against the target.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from icsd.config import EmbedConfig, GroupConfig, IngestConfig
from icsd.stages import embed, group, ingest
from icsd.store import RunDir

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 180.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared/data/coco/captions_val2017.json"))
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--model", default=EmbedConfig().model)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.at(Path(tmp) / "run")
        rows = []
        t_all = time.perf_counter()
        for name, fn, cfg in [
            ("ingest", ingest.run, IngestConfig(corpus=args.corpus, limit=args.limit)),
            ("embed", embed.run, EmbedConfig(model=args.model, batch_size=args.batch_size)),
            ("group", group.run, GroupConfig(k=args.k)),
        ]:
            t = time.perf_counter()
            res = fn(cfg, run)  # type: ignore[operator]
            rows.append((name, time.perf_counter() - t, res.counts))
        total = time.perf_counter() - t_all
    n = rows[0][2]["kept"]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"corpus: {args.corpus} ({n} captions), K={args.k}, embedder {args.model}")
    print(f"{'stage':<8} {'seconds':>8} {'captions/s':>11}")
    for name, secs, _ in rows:
        print(f"{name:<8} {secs:8.1f} {n / secs:11.0f}")
    print(f"{'total':<8} {total:8.1f} {n / total:11.0f}")
    print(f"target {TARGET_S:.0f}s: {'met' if total <= TARGET_S else 'missed'} (ratio total/target {total / TARGET_S:.2f})")
    print(f"groups: {rows[2][2]['groups']}, duplicates dropped: {rows[2][2]['duplicates_dropped']}")


if __name__ == "__main__":
    main()
