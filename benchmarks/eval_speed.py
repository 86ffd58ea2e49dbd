"""Scoring speed: icsd's evaluation against pycocoevalcap's COCOEvalCap.evaluate(), side by side.

Inputs: the shared COCO val2017 captions in leave-one-out form (for each of the 5,000 images its
first human caption is the prediction, the other 4-6 are the references). All metrics but SPICE.
Both sides run in this process on the same files, alternately, each paying its own JVM start-ups;
the numbers must be identical. Pinned to 2 CPU cores when the machine has more.

    python benchmarks/eval_speed.py                 # 5,000 images, 2 rounds
    python benchmarks/eval_speed.py --images 500 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "coco" / "captions_val2017.json"
METRICS = ["BLEU", "METEOR", "ROUGE_L", "CIDEr"]


def leave_one_out(captions: Path, n_images: int, folder: Path) -> tuple[Path, Path, int]:
    """Write references (COCO captions format) and predictions (COCO results) files."""
    data = json.loads(captions.read_text(encoding="utf-8"))
    images = data["images"][:n_images]
    keep = {im["id"] for im in images}
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in data["annotations"]:
        if a["image_id"] in keep:
            by_image[a["image_id"]].append(a)
    refs, preds = [], []
    for im in images:
        anns = sorted(by_image[im["id"]], key=lambda a: a["id"])
        preds.append({"image_id": im["id"], "caption": anns[0]["caption"]})
        refs.extend(anns[1:])
    ref_file, pred_file = folder / "references.json", folder / "predictions.json"
    ref_file.write_text(json.dumps({"images": images, "annotations": refs, "info": {}, "licenses": []}))
    pred_file.write_text(json.dumps(preds))
    return ref_file, pred_file, len(refs)


@contextlib.contextmanager
def timed_reference(steps: dict[str, float]) -> Iterator[None]:
    """Time each step inside COCOEvalCap.evaluate() by wrapping the classes it instantiates;
    SPICE is left out (a no-op), as it is on our side."""
    import pycocoevalcap.eval as coco_eval

    def wrap(cls: type, name: str, method: str) -> type:
        original = getattr(cls, method)

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                steps[name] = steps.get(name, 0.0) + time.perf_counter() - t

        return type(cls.__name__, (cls,), {method: timed})

    class NoSpice:
        def compute_score(self, gts: dict[Any, Any], res: dict[Any, Any]) -> tuple[float, list[float]]:
            return 0.0, [0.0] * len(gts)

        def method(self) -> str:
            return "SPICE"

    saved = {
        name: getattr(coco_eval, name)
        for name in ("PTBTokenizer", "Bleu", "Meteor", "Rouge", "Cider", "Spice")
    }
    coco_eval.PTBTokenizer = wrap(saved["PTBTokenizer"], "tokenize", "tokenize")
    coco_eval.Bleu = wrap(saved["Bleu"], "BLEU", "compute_score")
    coco_eval.Meteor = wrap(saved["Meteor"], "METEOR", "compute_score")
    coco_eval.Rouge = wrap(saved["Rouge"], "ROUGE_L", "compute_score")
    coco_eval.Cider = wrap(saved["Cider"], "CIDEr", "compute_score")
    coco_eval.Spice = NoSpice
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(coco_eval, name, value)


@contextlib.contextmanager
def quiet_fd2() -> Iterator[None]:
    """Silence the tokenizer jar's stderr line (it writes to the process's fd 2, not sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the JVMs), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_reference(ref_file: Path, pred_file: Path) -> tuple[dict[str, float], dict[str, float]]:
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    steps: dict[str, float] = {}
    cpu = cpu_seconds()
    start = time.perf_counter()
    with (
        timed_reference(steps),
        contextlib.redirect_stdout(io.StringIO()),
        quiet_fd2(),
    ):
        coco = COCO(str(ref_file))
        res = coco.loadRes(str(pred_file))
        ev = coco_eval.COCOEvalCap(coco, res)
        ev.params["image_id"] = res.getImgIds()
        t = time.perf_counter()
        ev.evaluate()
        steps["evaluate()"] = time.perf_counter() - t
    steps["total"] = time.perf_counter() - start
    scores = {k: float(v) for k, v in ev.eval.items() if k != "SPICE"}
    del ev  # its METEOR JVM goes with it, before the other side runs
    gc.collect()
    steps["cpu"] = cpu_seconds() - cpu
    return scores, steps


def run_ours(ref_file: Path, pred_file: Path) -> tuple[dict[str, float], dict[str, float]]:
    from icsd import jvm
    from icsd.config import EvaluateConfig
    from icsd.stages.evaluate import evaluate

    jvm.close_shared_meteor()  # every round pays its own METEOR JVM start-up
    cfg = EvaluateConfig(annotations=str(ref_file), predictions=str(pred_file), metrics=METRICS)
    cpu = cpu_seconds()
    start = time.perf_counter()
    outcome = evaluate(cfg)
    total = time.perf_counter() - start
    jvm.close_shared_meteor()
    steps = dict(outcome.evaluation.seconds)
    steps["cpu"] = cpu_seconds() - cpu
    steps["score_captions"] = steps.pop("total")
    steps["total"] = total
    return outcome.evaluation.overall.scores, steps


def pin_two_cores() -> str:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) > 2:
        os.sched_setaffinity(0, cpus[:2])
        return f"pinned to cores {cpus[:2]} of {len(cpus)}"
    return f"{len(cpus) or os.cpu_count()} cores"


def median_steps(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in runs for k in r)
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not args.captions.exists():
        sys.exit(f"captions not found: {args.captions}")
    cores = pin_two_cores()
    os.environ.setdefault("ICSD_CACHE_DIR", tempfile.mkdtemp(prefix="icsd-cache-"))
    with tempfile.TemporaryDirectory() as tmp:
        ref_file, pred_file, n_refs = leave_one_out(args.captions, args.images, Path(tmp))
        ours_runs, ref_runs = [], []
        ours_scores: dict[str, float] = {}
        ref_scores: dict[str, float] = {}
        sides: list[tuple[str, Callable[..., Any], list[dict[str, float]]]] = [
            ("pycocoevalcap", run_reference, ref_runs),
            ("icsd", run_ours, ours_runs),
        ]
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for name, fn, runs in order:
                scores, steps = fn(ref_file, pred_file)
                runs.append(steps)
                if name == "icsd":
                    ours_scores = scores
                else:
                    ref_scores = scores
                print(f"round {r + 1} {name:13s} {steps['total']:6.1f} s wall {steps['cpu']:6.1f} s CPU "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    same = ours_scores == ref_scores
    ours, ref = median_steps(ours_runs), median_steps(ref_runs)
    print()
    print(f"machine: {platform.node()} ({cores}), Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(
        f"inputs: {args.images} images, {n_refs} references ({n_refs / args.images:.2f} per image), metrics {', '.join(METRICS)}"
    )
    print(f"scores identical to pycocoevalcap: {'yes' if same else 'NO'}")
    if not same:
        for k in ref_scores:
            print(f"  {k}: ours {ours_scores.get(k)!r} ref {ref_scores[k]!r}")
    print(f"median of {args.rounds} rounds, seconds:")
    print("| step | pycocoevalcap | icsd |")
    print("|---|---:|---:|")
    for step in ("tokenize", "BLEU", "METEOR", "ROUGE_L", "CIDEr"):
        note = " (own thread, overlaps the rest)" if step == "METEOR" else ""
        print(f"| {step}{note} | {ref.get(step, 0):.1f} | {ours.get(step, 0):.1f} |")
    print(
        f"| COCOEvalCap.evaluate() / score_captions() | {ref['evaluate()']:.1f} | {ours['score_captions']:.1f} |"
    )
    print(f"| total, files read to scores | {ref['total']:.1f} | {ours['total']:.1f} |")
    print(f"| CPU seconds, JVMs included | {ref['cpu']:.1f} | {ours['cpu']:.1f} |")
    print(f"ratio (pycocoevalcap evaluate() / icsd total): {ref['evaluate()'] / ours['total']:.2f}x; "
          f"target icsd <= 60 s: {'met' if ours['total'] <= 60 else 'MISSED'}")  # fmt: skip
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
