"""The sandbox comparison of docs/sandbox.md (protocol: docs/sandbox-protocol.md): ICSD vs the
uni-context baseline (and, with --all, no selection, summary pairs and the oracle) over several
seeds, the paired difference with its 95 % interval and the protocol's decision, plus the
best-fixed-caption bound; with --sweep, the exploratory sweep (selection count, renderer capacity,
composition gap, corpus size) as a table and a figure.

    python benchmarks/sandbox_compare.py --world-seed 2026 --sweep --out runs/sandbox-v3   # the protocol
    python benchmarks/sandbox_compare.py --world-seed 7 --out runs/replica                # a world nobody has seen
    python benchmarks/sandbox_compare.py --all --seeds 0 1 2 --out runs/sandbox
    python benchmarks/sandbox_compare.py --methods icsd_kind_true --out runs/sandbox
        # a diagnostic: each icsd-s<seed> run of OUT retrained without its pairs that name a kind
        # the image does not show (the renderer draws at most `capacity` kinds)
    python benchmarks/sandbox_compare.py --world-seed 2026 --collect runs/sandbox-v3 --publish
        # run nothing: gather finished runs, print the table, write the reports' comparison data

Each (method, seed) is one ordinary `icsd run configs/sandbox_<method>.yaml` with `--train.seed`,
`--summarize.seed` and `--render.seed` set to the seed, on one torch thread, `--jobs` at a time
(the world itself stays the same; the text stages run once and are copied). The fixed-caption
bound is the corpus caption (among the 40 most frequent) with the best validation CIDEr, scored
on the test split with `icsd evaluate --predictions`. It prints each seed's test scores, mean and
spread per method, the pair, selection and caption statistics of each run, and writes
OUT/summary.json and OUT/summary.md (with --sweep also OUT/sweep.md, sweep.json, sweep.png).
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
WORLD = "default"  # the world preset the runs use; --world-seed N makes it "default@N"
WORLD_PATHS = (
    "ingest.corpus",
    "train.val_images",
    "train.val_captions",
    "evaluate.annotations",
    "evaluate.images",
)
REFERENCE = "reference_scores.json"  # what every sandbox run's report shows beside its own scores


def world_overrides(world: str) -> list[str]:
    """``--stage.key=value`` overrides pointing every world path of the configs at world ``world``."""
    if world == "default":
        return []
    import yaml

    from icsd.config import quickstart_config_path

    quickstart = yaml.safe_load(quickstart_config_path().read_text(encoding="utf-8"))
    out = []
    for key in WORLD_PATHS:
        stage, field = key.split(".")
        value = str(quickstart[stage][field]).replace("sandbox:default/", f"sandbox:{world}/")
        out.append(f"--{key}={value}")
    return out


def icsd(*args: str) -> subprocess.CompletedProcess[str]:
    """One icsd command in a subprocess with one torch thread (sandbox results depend on the
    thread count; docs/sandbox-protocol.md fixes it at 1)."""
    cmd = [sys.executable, "-m", "icsd.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
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


def renderer_capacity(run: Path) -> int:
    from icsd.sandbox.renderer import parse_model

    config = json.loads((run / "manifest.json").read_text())["stages"]["render"]["config"]
    return parse_model(config["model"]).capacity


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
        "prompts_over_capacity": round(
            sum(len(parse(text).objects) > renderer_capacity(run) for text in prompts.values())
            / max(1, len(scenes)),
            3,
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
    (kinds in the scene / kinds in the world), the share of named backgrounds that are right, and,
    of the colours it gives a kind the image shows, the share that are that object's own colour
    (not another object's: the colour bound to the right object)."""
    from icsd.sandbox.lexicon import KINDS, parse

    preds_file = run / "eval" / BENCH / "predictions.json"
    if not preds_file.exists():
        return {}
    scenes = {
        s["image_id"]: s["scene"]
        for s in json.loads(world_file("test_scenes.json").read_text(encoding="utf-8"))["scenes"]
    }
    naming, right, chance, bg_named, bg_right, coloured, bound = 0, 0, 0.0, 0, 0, 0, 0
    for p in json.loads(preds_file.read_text(encoding="utf-8")):
        scene = scenes[int(p["image_id"])]
        present = {o["kind"] for o in scene["objects"]}
        said = parse(p["caption"])
        colour_of = {o["kind"]: o["colour"] for o in scene["objects"]}
        for kind, mention in said.objects.items():
            if mention.colour and kind in colour_of:
                coloured += 1
                bound += mention.colour == colour_of[kind]
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
        "colours_bound_right": round(bound / max(1, coloured), 3),
    }


def test_scores(run: Path) -> dict[str, float]:
    data = json.loads((run / "eval" / BENCH / "scores.json").read_text())
    return {k: float(v) for k, v in data.get("scores", data).items() if isinstance(v, int | float)}


def world_file(name: str) -> Path:
    from icsd.sandbox.make import resolve_path

    return Path(resolve_path(f"sandbox:{WORLD}/{name}"))


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


LABELS = {
    "icsd": "ICSD (select 5-10, the paper's rule)",
    "uni_context": "uni-context (one image per caption)",
    "no_selection": "no selection (first 5 merged)",
    "summary_pairs": "summary pairs",
    "oracle": "oracle: camera images of the train scenes",
    "icsd_kind_true": "diagnostic: ICSD less its kind-false pairs",
}


def finding(primary: dict[str, Any] | None) -> str:
    if not primary:
        return ""
    lo, hi = primary["ci"]
    return (
        f"In the calibrated world, ICSD minus uni-context test CIDEr is {primary['mean']:+.3f} "
        f"(95 % interval {lo:+.3f} to {hi:+.3f}, {len(primary['seeds'])} seeds): {primary['decision']}."
    )


def publish(
    results: dict[str, dict[int, dict[str, float]]],
    caption: str,
    fixed: dict[str, float],
    seeds: list[int],
    primary: dict[str, Any] | None = None,
) -> None:
    """Write the comparison every sandbox report shows (the format of icsd/sandbox/report.py)."""
    from icsd.sandbox.experiment import mean_interval

    methods: dict[str, dict[str, object]] = {}
    for method, by_seed in results.items():
        cider = [s["CIDEr"] for s in by_seed.values()]
        methods[method] = {
            "label": LABELS.get(method, method),
            "CIDEr_mean": round(statistics.mean(cider), 4),
            "CIDEr_sd": round(statistics.stdev(cider), 4) if len(cider) > 1 else 0.0,
            "seeds": len(cider),
            "Bleu_4_mean": round(statistics.mean(s.get("Bleu_4", 0.0) for s in by_seed.values()), 4),
            **({"ci95": mean_interval(cider)} if len(cider) > 1 else {}),
            **({"bound": True} if method == "oracle" else {}),
        }
    methods["fixed caption (bound)"] = {
        "label": f'fixed caption "{caption}" (lower bound)', "CIDEr_mean": round(fixed["CIDEr"], 4),
        "Bleu_4_mean": round(fixed.get("Bleu_4", 0.0), 4), "bound": True,
    }  # fmt: skip
    doc: dict[str, Any] = {
        "finding": finding(primary),
        "doc": "docs/sandbox.md#the-pre-registered-comparison",
        "note": f"test CIDEr over seeds {seeds} on world {WORLD}'s 200 test images "
        "(benchmarks/sandbox_compare.py --publish; docs/sandbox-protocol.md)",
        "world": WORLD,
        "methods": methods,
    }
    if primary:
        doc["icsd_minus_uni_context"] = primary
    (REPO / "src" / "icsd" / "sandbox" / REFERENCE).write_text(
        json.dumps(doc, indent=1) + "\n", encoding="utf-8"
    )


def selection_statistics(run: Path) -> dict[str, float]:
    """How the selector chose, measured against the hidden scenes (read here only, never by the
    selector): the share of candidate sets answered ``ok``, captions selected per ok set, and the
    share of selected captions written about the head caption's own scene."""
    import pyarrow.parquet as pq

    if not (run / "selections.parquet").exists():
        return {}
    texts = {r["caption_id"]: r["text"] for r in pq.read_table(run / "captions.parquet").to_pylist()}
    scenes_of: dict[str, set[int]] = collections.defaultdict(set)
    data = json.loads(world_file("train_scenes.json").read_text(encoding="utf-8"))
    for k, entry in enumerate(data["scenes"]):
        for caption in entry["captions"]:
            scenes_of[" ".join(caption.split())].add(k)
    rows = pq.read_table(run / "selections.parquet").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    own = total = 0
    for r in ok:
        head = scenes_of[" ".join(texts[r["group_id"]].split())]
        for cid in r["selected_ids"]:
            total += 1
            own += bool(scenes_of[" ".join(texts[cid].split())] & head)
    return {
        "ok_share": round(len(ok) / max(1, len(rows)), 3),
        "selected_per_set": round(statistics.mean(len(r["selected_ids"]) for r in ok), 2) if ok else 0.0,
        "selected_from_head_scene": round(own / max(1, total), 3),
    }


def run_chain(
    out: Path, method: str, seed: int, extra: list[str]
) -> tuple[str, int, dict[str, float], float]:
    run = out / f"{method}-s{seed}"
    if method == "icsd_kind_true":
        dropped = kind_true_copy(out / f"icsd-s{seed}", run)
        done = "already there" if dropped is None else f"{dropped} kind-false pairs dropped"
        print(f"{run.name}: {done} (from icsd-s{seed})", flush=True)
    elif method != "uni_context":
        seed_text_stages(out / "text", run)
    start = time.perf_counter()
    icsd("run", str(REPO / "configs" / METHODS[method]), "--run", str(run),
         f"--train.seed={seed}", f"--summarize.seed={seed}", f"--render.seed={seed}", *extra)  # fmt: skip
    seconds = round(time.perf_counter() - start, 1)
    scores = test_scores(run)
    print(f"{run.name}: test CIDEr {scores['CIDEr']:.3f} ({seconds:.0f}s)", flush=True)
    return method, seed, scores, seconds


def run_methods(
    out: Path, methods: list[str], seeds: list[int], extra: list[str], jobs: int
) -> tuple[dict[str, dict[int, dict[str, float]]], dict[str, float]]:
    """Every (method, seed) chain of ``out``, ``jobs`` at a time (each on one torch thread); the
    text stages (ingest, embed, group) are run once and copied, as they do not depend on the seed."""
    from concurrent.futures import ThreadPoolExecutor

    if (
        any(m not in ("uni_context", "icsd_kind_true") for m in methods)
        and not (out / "text" / "manifest.json").exists()
    ):
        icsd(
            "run",
            str(REPO / "configs" / METHODS["icsd"]),
            "--run",
            str(out / "text"),
            "--to",
            "group",
            *extra,
        )
    results: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    first = [(m, s) for s in seeds for m in methods if m != "icsd_kind_true"]
    later = [(m, s) for s in seeds for m in methods if m == "icsd_kind_true"]
    for batch in (first, later):
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for method, seed, scores, secs in pool.map(lambda ms: run_chain(out, ms[0], ms[1], extra), batch):
                results.setdefault(method, {})[seed] = scores
                seconds[f"{method}-s{seed}"] = secs
    return results, seconds


def collect(folders: list[Path]) -> tuple[dict[str, dict[int, dict[str, float]]], list[Path]]:
    results: dict[str, dict[int, dict[str, float]]] = {}
    runs: list[Path] = []
    for folder in folders:
        for run in sorted(folder.glob("*-s[0-9]*")):
            method, _, seed = run.name.rpartition("-s")
            if method in METHODS and (run / "eval" / BENCH / "scores.json").exists():
                results.setdefault(method, {})[int(seed)] = test_scores(run)
                runs.append(run)
    return results, runs


def results_table(
    results: dict[str, dict[int, dict[str, float]]], caption: str, fixed: dict[str, float]
) -> str:
    metrics = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")
    lines = [
        "| method | " + " | ".join(f"{m} mean ± sd" for m in metrics) + " | CIDEr per seed |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for method, by_seed in results.items():
        cells = []
        for m in metrics:
            vals = [s[m] for s in by_seed.values() if m in s]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}" if vals else "")
        per_seed = ", ".join(f"{by_seed[s]['CIDEr']:.3f}" for s in sorted(by_seed))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {per_seed} |")
    lines.append(
        f'| fixed caption "{caption}" | '
        + " | ".join(f"{fixed.get(m, 0):.3f}" for m in metrics)
        + " | (no seed) |"
    )
    return "\n".join(lines)


def primary_result(results: dict[str, dict[int, dict[str, float]]]) -> dict[str, Any] | None:
    from icsd.sandbox.experiment import decide, paired_difference

    if "icsd" not in results or "uni_context" not in results:
        return None
    cider = {m: {s: r["CIDEr"] for s, r in results[m].items()} for m in ("icsd", "uni_context")}
    diff = paired_difference(cider["icsd"], cider["uni_context"])
    return {**diff, "decision": decide(diff)}


# The sweep of docs/sandbox.md ("When does multi-context help?"): each variant changes one thing
# of the primary comparison; methods whose chain the change does not touch reuse the primary runs.
SWEEP: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    # name: (what it varies, overrides, methods rerun)
    "select-5": ("selection count: at most 5", ["summarize.max_select=5"], ("icsd",)),
    "select-7": ("selection count: at most 7", ["summarize.max_select=7"], ("icsd",)),
    "capacity-2": ("renderer capacity: 2 kinds", ["render.model=world:capacity=2"], ("icsd", "uni_context")),
    "capacity-5": ("renderer capacity: 5 kinds", ["render.model=world:capacity=5"], ("icsd", "uni_context")),
    "close-up": (
        "composition gap: short prompts drawn close up",
        ["render.model=world:close_up=1"],
        ("icsd", "uni_context"),
    ),
    "corpus-10k": ("corpus: 10,000 captions (2,000 scenes)", [], ("icsd", "uni_context")),
}
PRIMARY_LABEL = "primary: select 5-10, capacity 3, no close-up, 3,000 captions"


def sweep(
    out: Path, primary: dict[str, dict[int, dict[str, float]]], seeds: list[int], jobs: int
) -> dict[str, Any]:
    """Run every :data:`SWEEP` variant with ``seeds`` under ``out/sweep``; the ICSD minus
    uni-context gap of each, with its interval, as a table and a figure."""
    from icsd.sandbox.experiment import paired_difference

    rows: dict[str, Any] = {}
    base = {m: {s: r["CIDEr"] for s, r in primary[m].items() if s in seeds} for m in ("icsd", "uni_context")}
    rows["primary"] = {"label": PRIMARY_LABEL, **paired_difference(base["icsd"], base["uni_context"])}
    for name, (label, overrides, methods) in SWEEP.items():
        world = WORLD.replace("default", "large", 1) if name == "corpus-10k" else WORLD
        extra = [*world_overrides(world), *(f"--{kv}" for kv in overrides)]
        results, _ = run_methods(out / "sweep" / name, list(methods), seeds, extra, jobs)
        cider = {m: {s: r["CIDEr"] for s, r in results.get(m, {}).items()} for m in methods}
        icsd_c = cider.get("icsd", base["icsd"])
        uni_c = cider.get("uni_context", base["uni_context"])
        rows[name] = {"label": label, **paired_difference(icsd_c, uni_c),
                      "icsd_mean": round(statistics.mean(icsd_c.values()), 4),
                      "uni_context_mean": round(statistics.mean(uni_c.values()), 4)}  # fmt: skip
        print(f"sweep {name}: ICSD - uni-context {rows[name]['mean']:+.3f} {rows[name]['ci']}", flush=True)
    rows["primary"]["icsd_mean"] = round(statistics.mean(base["icsd"].values()), 4)
    rows["primary"]["uni_context_mean"] = round(statistics.mean(base["uni_context"].values()), 4)
    lines = [
        "| variant | ICSD CIDEr | uni-context CIDEr | ICSD - uni-context | 95 % interval |",
        "|---|---|---|---|---|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row['label']} | {row['icsd_mean']:.3f} | {row['uni_context_mean']:.3f} | {row['mean']:+.3f} | "
            f"{row['ci'][0]:+.3f} to {row['ci'][1]:+.3f} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    sweep_figure(rows, out / "sweep.png", seeds)
    print("\n".join(lines))
    return rows


def sweep_figure(rows: dict[str, Any], path: Path, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.2))
    for i, name in enumerate(names):
        row = rows[name]
        lo, hi = row["ci"]
        ax.plot([lo, hi], [i, i], color="tab:blue", lw=2)
        ax.plot([row["mean"]], [i], "o", color="tab:red" if name == "primary" else "tab:blue")
    ax.axvline(0, color="gray", lw=1, ls="--")
    ax.set_yticks(range(len(names)), [rows[n]["label"] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"ICSD minus uni-context, test CIDEr\n(mean and 95 % interval, seeds {', '.join(map(str, seeds))})", fontsize=9)
    ax.set_title("When does multi-context help? (sandbox world)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    global WORLD
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/sandbox"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=["icsd", "uni_context"], choices=list(METHODS))
    ap.add_argument(
        "--world-seed",
        type=int,
        help="run on the default world made with this seed (default: the default world)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="chains run at once, each on one torch thread")
    ap.add_argument("--sweep", action="store_true", help="after the primary comparison, the sweep (3 seeds)")
    ap.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1, 2])
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
    if args.world_seed is not None:
        WORLD = f"default@{args.world_seed}"
    methods = [m for m in METHODS if m != "icsd_kind_true"] if args.all else args.methods
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [*world_overrides(WORLD), *(f"--{kv}" for kv in args.set)]
    t0 = time.perf_counter()
    if args.collect:
        results, runs = collect(args.collect)
        seconds: dict[str, float] = {}
    else:
        results, seconds = run_methods(args.out, methods, args.seeds, extra, args.jobs)
        runs = [args.out / f"{m}-s{s}" for m in methods for s in args.seeds]
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
    table = results_table(results, caption, fixed)
    summary: dict[str, Any] = {
        "world": WORLD, "seeds": seeds, "seconds": seconds, "total_seconds": round(total, 1),
        "overrides": args.set, "torch_threads": 1, "jobs": args.jobs,
        "results": {m: {str(s): v for s, v in r.items()} for m, r in results.items()},
        "fixed_caption": {"caption": caption, "scores": fixed},
    }  # fmt: skip
    primary = primary_result(results) if len(seeds) > 1 else None
    if primary:
        summary["icsd_minus_uni_context"] = primary
    if args.publish:
        publish(results, caption, fixed, seeds, primary)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    if primary:
        print(
            f"ICSD - uni-context test CIDEr: {primary['mean']:+.3f} (95 % CI {primary['ci'][0]:+.3f} to "
            f"{primary['ci'][1]:+.3f}; {primary['relative']:+.1%} of uni-context) over seeds {primary['seeds']}: "
            f"{primary['decision']}"
        )
    for run in runs:
        if (run / "pairs.parquet").exists():
            stats = {**pair_statistics(run), **selection_statistics(run), **caption_statistics(run)}
            summary.setdefault("pair_statistics", {})[run.name] = stats
            print(f"{run.name}: {stats}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"sandbox comparison: {len(runs)} runs in {total / 60:.1f} min -> {args.out / 'summary.md'}")
    if args.sweep:
        rows = sweep(args.out, results, args.sweep_seeds, args.jobs)
        summary["sweep"] = rows
        summary["total_seconds_with_sweep"] = round(time.perf_counter() - t0, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(
            f"sandbox sweep: done in {(time.perf_counter() - t0) / 60:.1f} min in all -> {args.out / 'sweep.md'}"
        )


if __name__ == "__main__":
    main()
