"""Embed on Ray with 1 and 2 workers against the inline executor, same corpus, same machine.

    python benchmarks/ray_embed.py [--corpus ../shared/data/coco/captions_val2017.json] [--limit N]

Prints wall time of each, the scaling efficiency of 2 Ray workers over 1 (ideal 1.0 on 2 free
cores), and the executor's overhead per shard: Ray with 1 worker against inline, divided by the
number of shards. Outputs are checked to be identical to the inline run's, byte for byte.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from icsd.config import EmbedConfig, IngestConfig
from icsd.stages import embed, ingest
from icsd.store import RunDir, sha256_file

REPO = Path(__file__).resolve().parents[1]


def timed_embed(root: Path, corpus: str, limit: int | None, cfg: EmbedConfig) -> tuple[float, list[str]]:
    run = RunDir.at(root)
    ingest.run(IngestConfig(corpus=corpus, limit=limit), run)
    t = time.perf_counter()
    embed.run(cfg, run)
    secs = time.perf_counter() - t
    return secs, [sha256_file(p) for p in sorted(run.embeddings.glob("part-*.parquet"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared/data/coco/captions_val2017.json"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--part-size", type=int, default=2000)
    ap.add_argument("--model", default=EmbedConfig().model)
    args = ap.parse_args()
    import ray

    base = EmbedConfig(model=args.model, part_size=args.part_size, device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["inline"] = timed_embed(Path(tmp) / "inline", args.corpus, args.limit, base)
        for workers in (1, 2):
            cfg = base.model_copy(update={"executor": "ray", "workers": workers})
            results[f"ray x{workers}"] = timed_embed(Path(tmp) / f"ray{workers}", args.corpus, args.limit, cfg)
    ray.shutdown()
    shards = len(results["inline"][1])
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; {shards} shards of {args.part_size} captions")
    for name, (secs, _) in results.items():
        print(f"  {name:<8} {secs:7.1f}s")
    same = all(h == results["inline"][1] for _, h in results.values())
    eff = results["ray x1"][0] / (2 * results["ray x2"][0])
    overhead = (results["ray x1"][0] - results["inline"][0]) / shards
    print(f"  outputs identical to inline: {same}")
    print(f"  scaling efficiency 2 workers vs 1: {eff:.2f} (speed-up {results['ray x1'][0] / results['ray x2'][0]:.2f}x)")
    print(f"  Ray overhead per shard (1 worker vs inline, incl. actor start): {overhead:.2f}s")


if __name__ == "__main__":
    main()
