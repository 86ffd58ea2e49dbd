"""How close the sandbox world's caption corpus comes to COCO's (docs/sandbox.md, "Calibration").

    python benchmarks/sandbox_calibrate.py                       # the default world vs COCO (3,000 captions each)
    python benchmarks/sandbox_calibrate.py --world-seed 7        # another world of the same preset
    python benchmarks/sandbox_calibrate.py --coco ../shared/data/coco/captions_val2017.json --large 25000
    python benchmarks/sandbox_calibrate.py --world-dir worlds/big --out runs/calibration.json

The world's train corpus (its hidden scene ids read for measurement only) and real COCO captions at
the same number of captions (600 random images with 5 captions each, from the COCO file given;
by default the subset shipped under tests/data), embedded with the same packaged all-MiniLM-L6-v2
and searched exactly (top-29 neighbours). With ``--large N`` a world of N captions is measured
against N COCO captions too (neighbourhoods thin out as a corpus grows). Prints one markdown table
(world, COCO, tolerance, within) per size, and exits 1 when a statistic is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COCO = REPO / "tests/data/coco/captions_val2017_subset.json"


def embed(captions: list[str]) -> Any:
    from icsd.backends.embedders import load_embedder

    return load_embedder("sentence-transformers/all-MiniLM-L6-v2", batch_size=256).embed(captions)


def measure(world_dir: Path, coco_file: Path, sample_seed: int = 0) -> dict[str, dict[str, float]]:
    from icsd.sandbox.calibrate import (
        coco_corpus,
        coco_objects,
        corpus_statistics,
        world_corpus,
        world_objects,
    )

    world = world_corpus(world_dir)
    per_image = 5
    coco = coco_corpus(coco_file).sample_images(len(set(world.image_ids)), per_image, seed=sample_seed)
    return {
        "world": corpus_statistics(world, embed(world.captions), world_objects),
        "coco": corpus_statistics(coco, embed(coco.captions), coco_objects),
    }


def world_folder(seed: int, train_scenes: int | None, root: Path) -> Path:
    from icsd.sandbox.make import custom_spec, write_world

    spec = custom_spec("default", seed=seed, train_scenes=train_scenes, val_scenes=1, test_scenes=1)
    folder = root / f"calibration-{spec.digest()}"
    if not (folder / "world.json").exists():
        write_world(spec, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the default world to measure")
    parser.add_argument("--world-dir", type=Path, help="measure this world folder instead")
    parser.add_argument("--coco", type=Path, default=DEFAULT_COCO, help="a COCO captions file")
    parser.add_argument("--large", type=int, default=0, help="also measure at this many captions")
    parser.add_argument("--root", type=Path, default=Path("runs/calibration"), help="where worlds are written")
    parser.add_argument("--out", type=Path, help="write the statistics as JSON here")
    args = parser.parse_args()

    from icsd.sandbox.calibrate import comparison_rows, markdown_table

    start = time.perf_counter()
    sizes = [None] + ([args.large // 5] if args.large else [])
    report: dict[str, Any] = {}
    failed = False
    for scenes in sizes:
        folder = args.world_dir if args.world_dir and scenes is None else world_folder(
            args.world_seed, scenes, args.root
        )
        stats = measure(folder, args.coco)
        n = int(stats["world"]["captions"])
        rows = comparison_rows(stats["world"], stats["coco"])
        failed |= not all(r["ok"] for r in rows)
        report[str(n)] = {"world": stats["world"], "coco": stats["coco"], "rows": rows, "world_dir": str(folder)}
        print(f"\n{n:,} captions ({int(stats['world']['images'])} scenes; COCO {int(stats['coco']['images'])} images "
              f"from {args.coco.name}); world {folder.name}\n")
        print(markdown_table([("world", stats["world"]), ("COCO", stats["coco"])]))
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
