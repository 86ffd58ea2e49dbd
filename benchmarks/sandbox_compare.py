"""The sandbox comparison of docs/sandbox.md: ICSD vs the uni-context baseline (and, with --all, no
selection, summary pairs and the oracle) over several seeds, plus the best-fixed-caption bound.

    python benchmarks/sandbox_compare.py                    # ICSD + uni-context + bounds, seeds 0 1 2
    python benchmarks/sandbox_compare.py --all --out runs/sandbox
    python benchmarks/sandbox_compare.py --methods icsd --seeds 0
    python benchmarks/sandbox_compare.py --methods icsd uni_context oracle --seeds 0 \
        --set train.max_steps=1800 --out runs/sandbox-long      # the same runs, trained 3x longer
    python benchmarks/sandbox_compare.py --methods icsd_kind_true --out runs/sandbox
        # a diagnostic: each icsd-s<seed> run of OUT retrained without its pairs that name a kind
        # the image does not show (the renderer draws five kinds at most)

Each (method, seed) is one ordinary `icsd run configs/sandbox_<method>.yaml` with `--train.seed`,
`--summarize.seed` and `--render.seed` set to the seed (the world itself stays the same). The
fixed-caption bound is the corpus caption (among the 40 most frequent) with the best validation
CIDEr, scored on the test split with `icsd evaluate --predictions`. It prints each seed's test
scores, mean and spread per method, and `icsd compare` over all runs, and writes OUT/summary.json
and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = "sandbox-test"
METHODS = {
    "icsd": "sandbox_icsd.yaml",
    "uni_context": "sandbox_uni_context.yaml",
    "no_selection": "sandbox_no_selection.yaml",
    "summary_pairs": "sandbox_summary_pairs.yaml",
    "oracle": "sandbox_oracle.yaml",
    # a diagnostic: the ICSD run of the same seed, less its pairs that name a kind the image lacks
    "icsd_kind_true": "sandbox_icsd.yaml",
}
TEXT_STAGES = ("captions.parquet", "embeddings", "candidates.parquet")
REFERENCE = "reference_scores.json"  # what every sandbox run's report shows beside its own scores


def icsd(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "icsd.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def seed_text_stages(source: Path, dest: Path) -> None:
    """Start ``dest`` with the ingest/embed/group outputs of ``source`` (they do not depend on the
    seed), so the pipeline skips them as unchanged."""
    if dest.exists() or not (source / "manifest.json").exists():
        return
    dest.mkdir(parents=True)
    for name in TEXT_STAGES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.exists():
            shutil.copy2(src, dest / name)
    keep_stages(source, dest, {"ingest", "embed", "group"})


def keep_stages(source: Path, dest: Path, keep: set[str]) -> None:
    """``dest``'s manifest: ``source``'s, with only the ``keep`` stages recorded as done (the
    pipeline runs the others again)."""
    manifest = json.loads((source / "manifest.json").read_text())
    for section in ("stages", "pipeline"):
        manifest[section] = {k: v for k, v in manifest.get(section, {}).items() if k in keep}
    (dest / "manifest.json").write_text(json.dumps(manifest))


def rendered_pairs(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    """(pairs, the scene each image key's picture shows, the prompt of each prompt key) of a run whose
    images the sandbox renderer drew (it is deterministic per item seed, so each image's scene is
    recomputed from its prompt); empty when another backend drew them."""
    import pyarrow.parquet as pq

    from icsd.backends.t2i import item_seed
    from icsd.sandbox.renderer import SceneRenderer, parse_model
    from icsd.store import safe_key

    config = json.loads((run / "manifest.json").read_text())["stages"]["render"]["config"]
    if config["backend"] != "sandbox":
        return [], {}, {}
    renderer = SceneRenderer(parse_model(config["model"]))
    pairs = pq.read_table(run / "pairs.parquet").to_pylist()
    if config["prompts"] == "captions":
        rows = pq.read_table(run / "captions.parquet").to_pylist()
        prompts = {r["caption_id"]: r["text"] for r in rows}
    else:
        rows = pq.read_table(run / "selections.parquet").to_pylist()
        prompts = {r["group_id"]: r["summary"] for r in rows if r["status"] == "ok"}
    keys = {p["image_key"] for p in pairs}
    scenes = {
        safe_key(k): renderer.scene_for(v, item_seed(config["seed"], k))
        for k, v in prompts.items()
        if safe_key(k) in keys
    }
    return pairs, scenes, {k: v for k, v in prompts.items() if safe_key(k) in keys}


def names_only_kinds_shown(caption: str, scene: Any) -> bool:
    from icsd.sandbox.lexicon import parse

    return set(parse(caption).objects) <= {o.kind for o in scene.objects}


def pair_statistics(run: Path) -> dict[str, float]:
    """What the renderer drew for a run: objects per image, the share of (image, caption) pairs
    whose caption is all true of its image, and the share whose every named kind is in it."""
    from icsd.sandbox.lexicon import parse
    from icsd.sandbox.world import agrees

    pairs, scenes, prompts = rendered_pairs(run)
    if not scenes:
        return {}
    said = [(p["caption"], scenes[p["image_key"]]) for p in pairs if p["image_key"] in scenes]
    true = [not agrees(parse(caption), scene) for caption, scene in said]
    kinds_shown = [names_only_kinds_shown(caption, scene) for caption, scene in said]
    return {
        "objects_per_image": round(statistics.mean(len(s.objects) for s in scenes.values()), 2),
        "pairs_all_true": round(sum(true) / max(1, len(true)), 3),
        "pairs_naming_only_kinds_shown": round(sum(kinds_shown) / max(1, len(kinds_shown)), 3),
        "prompts_over_five_kinds": round(
            sum(len(parse(text).objects) > 5 for text in prompts.values()) / max(1, len(scenes)), 3
        ),
    }


def kind_true_copy(source: Path, dest: Path) -> int | None:
    """``dest``: the ICSD run ``source`` up to its pairs, less the pairs that name a kind their image
    does not show (the renderer dropped it); training and evaluation are left to run again.
    Returns the number of pairs dropped (None when ``dest`` is there already)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (source / "pairs.parquet").exists():
        sys.exit(f"icsd_kind_true needs the ICSD run {source} first (add icsd before it to --methods)")
    if dest.exists():
        return None
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("train", "eval", "report.html"))
    pairs, scenes, _ = rendered_pairs(dest)
    kept = [
        p
        for p in pairs
        if p["image_key"] in scenes and names_only_kinds_shown(p["caption"], scenes[p["image_key"]])
    ]
    schema = pq.read_schema(dest / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist(kept, schema=schema), dest / "pairs.parquet")
    keep_stages(source, dest, {"ingest", "embed", "group", "summarize", "render", "score", "pairs"})
    return len(pairs) - len(kept)


def caption_statistics(run: Path) -> dict[str, float]:
    """Does the model see the objects? Of its test captions that name a kind, the share whose every
    named kind is in the image's hidden scene, beside the share a kind drawn at random would reach
    (kinds in the scene / kinds in the world), and the share of named backgrounds that are right."""
    from icsd.sandbox.lexicon import KINDS, parse

    preds_file = run / "eval" / BENCH / "predictions.json"
    if not preds_file.exists():
        return {}
    scenes = {
        s["image_id"]: s["scene"]
        for s in json.loads(world_file("test_scenes.json").read_text(encoding="utf-8"))["scenes"]
    }
    naming, right, chance, bg_named, bg_right = 0, 0, 0.0, 0, 0
    for p in json.loads(preds_file.read_text(encoding="utf-8")):
        scene = scenes[int(p["image_id"])]
        present = {o["kind"] for o in scene["objects"]}
        said = parse(p["caption"])
        if said.objects:
            naming += 1
            right += all(kind in present for kind in said.objects)
            chance += len(present) / len(KINDS)
        if said.background:
            bg_named += 1
            bg_right += said.background == scene["background"]
    return {
        "captions_naming_only_present_kinds": round(right / max(1, naming), 3),
        "same_by_chance": round(chance / max(1, naming), 3),
        "named_backgrounds_right": round(bg_right / max(1, bg_named), 3),
    }


def test_scores(run: Path) -> dict[str, float]:
    data = json.loads((run / "eval" / BENCH / "scores.json").read_text())
    return {k: float(v) for k, v in data.get("scores", data).items() if isinstance(v, int | float)}


def world_file(name: str) -> Path:
    from icsd.sandbox.make import resolve_path

    return Path(resolve_path(f"sandbox:default/{name}"))


def fixed_caption_bound(out: Path) -> tuple[str, dict[str, float]]:
    """The corpus caption with the best validation CIDEr among the most frequent ones, on test."""
    from icsd.formats import load_coco_captions
    from icsd.metrics import score_captions

    corpus = world_file("train.txt").read_text(encoding="utf-8").splitlines()
    frequent = [c for c, _ in collections.Counter(corpus).most_common(40)]
    val = {im.image_id: im.captions for im in load_coco_captions(world_file("val.json"))}
    best, best_cider = frequent[0], -1.0
    for caption in frequent:
        cider = score_captions(val, {i: caption for i in val}, metrics="cider").overall.scores["CIDEr"]
        if cider > best_cider:
            best, best_cider = caption, cider
    test = load_coco_captions(world_file("test.json"))
    preds = [{"image_id": int(im.image_id), "caption": best} for im in test]
    run = out / "fixed_caption"
    run.mkdir(parents=True, exist_ok=True)
    (run / "predictions.json").write_text(json.dumps(preds))
    icsd("evaluate", "--predictions", str(run / "predictions.json"), "--annotations", str(world_file("test.json")),
         "--benchmark", BENCH, "--run", str(run), "--out", str(run / "eval" / BENCH / "scores.json"))  # fmt: skip
    return best, test_scores(run)


def publish(
    results: dict[str, dict[int, dict[str, float]]], caption: str, fixed: dict[str, float], seeds: list[int]
) -> None:
    methods: dict[str, dict[str, object]] = {}
    for method, by_seed in results.items():
        cider = [s["CIDEr"] for s in by_seed.values()]
        methods[method] = {
            "CIDEr_mean": round(statistics.mean(cider), 4),
            "CIDEr_sd": round(statistics.stdev(cider), 4) if len(cider) > 1 else 0.0,
            "Bleu_4_mean": round(statistics.mean(s.get("Bleu_4", 0.0) for s in by_seed.values()), 4),
            "note": f"{len(cider)} seeds",
        }
    methods["fixed caption (bound)"] = {"CIDEr_mean": round(fixed["CIDEr"], 4), "CIDEr_sd": 0.0,
                                        "Bleu_4_mean": round(fixed.get("Bleu_4", 0.0), 4), "note": caption}  # fmt: skip
    doc = {
        "note": f"test CIDEr mean ± sd over seeds {seeds} (benchmarks/sandbox_compare.py; docs/sandbox.md)",
        "methods": methods,
    }
    (REPO / "src" / "icsd" / "sandbox" / REFERENCE).write_text(
        json.dumps(doc, indent=1) + "\n", encoding="utf-8"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/sandbox"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["icsd", "uni_context"], choices=list(METHODS))
    ap.add_argument(
        "--all",
        action="store_true",
        help="every method, the ablations and the oracle included (not the diagnostic)",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
        help="an override given to every run (repeatable), e.g. train.max_steps=1800",
    )  # fmt: skip
    ap.add_argument(
        "--publish", action="store_true", help=f"also write the means to src/icsd/sandbox/{REFERENCE}"
    )
    ap.add_argument(
        "--collect", type=Path, nargs="+", metavar="DIR",
        help="run nothing: gather the finished <method>-s<seed> runs (and fixed_caption) found in these folders",
    )  # fmt: skip
    args = ap.parse_args()
    methods = [m for m in METHODS if m != "icsd_kind_true"] if args.all else args.methods
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    runs: list[Path] = []
    for folder in args.collect or []:
        for run in sorted(folder.glob("*-s[0-9]*")):
            method, _, seed = run.name.rpartition("-s")
            if method in METHODS and (run / "eval" / BENCH / "scores.json").exists():
                results.setdefault(method, {})[int(seed)] = test_scores(run)
                runs.append(run)
    for seed in [] if args.collect else args.seeds:
        for method in methods:
            run = args.out / f"{method}-s{seed}"
            if method == "icsd_kind_true":
                dropped = kind_true_copy(args.out / f"icsd-s{seed}", run)
                done = "already there" if dropped is None else f"{dropped} kind-false pairs dropped"
                print(f"{run.name}: {done} (from icsd-s{seed})", flush=True)
            elif method != "uni_context":
                seed_text_stages(args.out / f"icsd-s{args.seeds[0]}", run)
            start = time.perf_counter()
            icsd("run", str(REPO / "configs" / METHODS[method]), "--run", str(run),
                 f"--train.seed={seed}", f"--summarize.seed={seed}", f"--render.seed={seed}",
                 *(f"--{kv}" for kv in args.set))  # fmt: skip
            seconds[run.name] = round(time.perf_counter() - start, 1)
            results.setdefault(method, {})[seed] = test_scores(run)
            runs.append(run)
            print(
                f"{run.name}: test CIDEr {results[method][seed]['CIDEr']:.3f} ({seconds[run.name]:.0f}s)",
                flush=True,
            )
    found = [
        f / "fixed_caption" for f in args.collect or [] if (f / "fixed_caption" / "predictions.json").exists()
    ]
    if found:
        fixed_run = found[0]
        caption = json.loads((fixed_run / "predictions.json").read_text())[0]["caption"]
        fixed = test_scores(fixed_run)
    else:
        caption, fixed = fixed_caption_bound(args.out)
        fixed_run = args.out / "fixed_caption"
    runs.append(fixed_run)
    seeds = sorted({s for by_seed in results.values() for s in by_seed})
    total = time.perf_counter() - t0

    metrics = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")
    lines = [
        "| method | " + " | ".join(f"{m} mean ± sd" for m in metrics) + " | CIDEr per seed |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    summary: dict[str, object] = {"seeds": seeds, "seconds": seconds, "total_seconds": round(total, 1),
                                  "overrides": args.set}  # fmt: skip
    for method, by_seed in results.items():
        cells = []
        for m in metrics:
            vals = [s[m] for s in by_seed.values() if m in s]
            if not vals:
                cells.append("")
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        per_seed = ", ".join(f"{by_seed[s]['CIDEr']:.3f}" for s in sorted(by_seed))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {per_seed} |")
    lines.append(
        f'| fixed caption "{caption}" | '
        + " | ".join(f"{fixed.get(m, 0):.3f}" for m in metrics)
        + " | (no seed) |"
    )
    table = "\n".join(lines)
    summary["results"] = {m: {str(s): v for s, v in r.items()} for m, r in results.items()}
    summary["fixed_caption"] = {"caption": caption, "scores": fixed}
    if "icsd" in results and "uni_context" in results:
        icsd_mean = statistics.mean(r["CIDEr"] for r in results["icsd"].values())
        uni_mean = statistics.mean(r["CIDEr"] for r in results["uni_context"].values())
        summary["icsd_over_uni_relative"] = round(icsd_mean / uni_mean - 1, 4) if uni_mean else None
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.publish:
        publish(results, caption, fixed, seeds)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    for run in runs:
        if (run / "pairs.parquet").exists():
            stats = {**pair_statistics(run), **caption_statistics(run)}
            summary.setdefault("pair_statistics", {})[run.name] = stats  # type: ignore[union-attr]
            print(f"{run.name}: {stats}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(icsd("compare", *map(str, runs)).stdout)
    print(f"sandbox comparison: {len(runs)} runs in {total / 60:.1f} min -> {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
