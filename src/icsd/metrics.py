"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE on PTB-tokenised text.

Every number comes from pycocoevalcap's own scorers and jars, so corpus and per-image scores equal
``COCOEvalCap.evaluate()`` on the same inputs, float for float. The Java side (the PTB tokenizer,
the kept METEOR JVM, SPICE) lives in :mod:`icsd.jvm`; here the inputs are matched, the tokenizer
runs once for references and predictions together, METEOR and SPICE run in threads while BLEU,
ROUGE-L and CIDEr run in Python, and the scores are assembled per set and per named subset.

Scores are on pycocoevalcap's 0-1 scale everywhere (files, tables, report, compare, training logs):
see :data:`SCALE_LABEL`; papers print them x100.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import UserError, examples_text
from .jvm import (
    close_shared_meteor,
    compute_spice,
    find_java,
    find_spice_jars,
    natural_order,
    ptb_tokenize,
    shared_meteor,
    spice_missing_note,
)

K = TypeVar("K", bound=Hashable)

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "BLEU": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
ALL_METRICS: tuple[str, ...] = tuple(METRIC_KEYS)
SCORE_KEYS: tuple[str, ...] = tuple(k for keys in METRIC_KEYS.values() for k in keys)
# One scale for every score icsd writes or shows: pycocoevalcap's own 0-1 (CIDEr may exceed 1).
# Papers print the same numbers x100.
SCALE_LABEL = "0-1 scale"


def format_score(value: float) -> str:
    """A score as every table shows it: pycocoevalcap's 0-1 scale, four decimals."""
    return f"{value:.4f}"

_ALIASES = {
    "bleu": "BLEU",
    "meteor": "METEOR",
    "rouge": "ROUGE_L",
    "rouge_l": "ROUGE_L",
    "rouge-l": "ROUGE_L",
    "rougel": "ROUGE_L",
    "cider": "CIDEr",
    "cider-d": "CIDEr",
    "cider_d": "CIDEr",
    "spice": "SPICE",
}

def parse_metrics(names: str | Iterable[str]) -> tuple[str, ...]:
    """Metric group names (BLEU, METEOR, ROUGE_L, CIDEr, SPICE; any case, comma-separated) in canonical order."""
    items = names.split(",") if isinstance(names, str) else list(names)
    chosen = set()
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        canon = _ALIASES.get(name.lower())
        if canon is None:
            raise UserError(f"unknown metric {name!r}: choose from {', '.join(ALL_METRICS)}")
        chosen.add(canon)
    if not chosen:
        raise UserError(f"no metric chosen: choose from {', '.join(ALL_METRICS)}")
    return tuple(m for m in ALL_METRICS if m in chosen)


def spice_mean(per_image: Mapping[Any, float], ids: Iterable[Any]) -> float:
    """The corpus SPICE of ``ids``: the mean over images in sorted id order, as pycocoevalcap takes it."""
    return float(np.mean(np.array([per_image[i] for i in sorted(ids, key=natural_order)])))


# ----------------------------------------------------------------------------- scoring


@dataclass
class CaptionScores:
    """Corpus scores (pycocoevalcap's 0-1 scale) and per-image scores of one image set."""

    scores: dict[str, float]
    per_image: dict[Any, dict[str, float]]

    @property
    def n_images(self) -> int:
        return len(self.per_image)


@dataclass
class Evaluation:
    """The result of :func:`score_captions`: the whole set, optional named subsets (NoCaps domains),
    seconds per step, and notes (e.g. why SPICE was skipped)."""

    overall: CaptionScores
    subsets: dict[str, CaptionScores] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    java: str | None = None


def match_inputs(
    references: Mapping[K, Sequence[str]], predictions: Mapping[K, str], *, subset: bool = False
) -> list[K]:
    """The image ids to score, in reference order; every mismatch is a one-line :class:`UserError`."""
    if not predictions:
        raise UserError("no predictions to score: the predictions are empty")
    for k, cap in predictions.items():
        if not isinstance(cap, str):
            raise UserError(f"prediction for image {k!r} is not a string: {cap!r}")
    with_refs = {k for k, caps in references.items() if caps}
    if not with_refs:
        raise UserError("no reference captions to score against: the references are empty")
    orphans = [k for k in predictions if k not in with_refs]
    if orphans:
        raise UserError(
            f"{len(orphans)} of {len(predictions)} predictions are for images without reference captions "
            f"(e.g. {examples_text(orphans)}): check that the references file (and --split) match the predictions"
        )
    missing = [k for k in references if k in with_refs and k not in predictions]
    if missing and not subset:
        raise UserError(
            f"{len(missing)} of {len(with_refs)} reference images have no prediction (e.g. {examples_text(missing)}): "
            "caption them all, or pass --subset to score only the predicted images"
        )
    return [k for k in references if k in with_refs and k in predictions]


def _python_scores(gts: dict[Any, list[str]], res: dict[Any, list[str]], metrics: Sequence[str],
                   seconds: dict[str, float]) -> tuple[dict[str, float], dict[str, list[float]]]:  # fmt: skip
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    corpus: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    if "BLEU" in metrics:
        t = time.perf_counter()
        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
        for name, sc, scs in zip(METRIC_KEYS["BLEU"], score, scores, strict=True):
            corpus[name], per[name] = float(sc), [float(x) for x in scs]
        seconds["BLEU"] = seconds.get("BLEU", 0.0) + time.perf_counter() - t
    for metric, scorer in (("ROUGE_L", Rouge), ("CIDEr", Cider)):
        if metric in metrics:
            t = time.perf_counter()
            sc, scs = scorer().compute_score(gts, res)
            corpus[metric], per[metric] = float(sc), [float(x) for x in scs]
            seconds[metric] = seconds.get(metric, 0.0) + time.perf_counter() - t
    return corpus, per


def _assemble(ids: list[Any], corpus: dict[str, float], per: dict[str, list[float]]) -> CaptionScores:
    order = [k for k in SCORE_KEYS if k in corpus]
    return CaptionScores(
        scores={k: corpus[k] for k in order},
        per_image={i: {k: per[k][n] for k in order} for n, i in enumerate(ids)},
    )


def score_captions(
    references: Mapping[K, Sequence[str]],
    predictions: Mapping[K, str],
    *,
    metrics: str | Iterable[str] = ALL_METRICS,
    subsets: Mapping[str, Sequence[K]] | None = None,
    subset: bool = False,
    spice_jars: str | os.PathLike[str] | None = None,
) -> Evaluation:
    """Score one prediction per image against its references, as ``COCOEvalCap.evaluate()`` does.

    ``references`` maps image id -> raw captions (its order is the evaluation order, as the images
    list of a COCO file); ``predictions`` maps image id -> raw caption. ``subsets`` names id lists
    scored on their own as well (NoCaps domains: each with its own CIDEr document frequencies, as
    the NoCaps evaluation does). ``subset=True`` scores only the predicted images.
    """
    chosen = parse_metrics(metrics)
    ids = match_inputs(references, predictions, subset=subset)
    notes: list[str] = []
    jars: Path | None = None
    if "SPICE" in chosen:
        jars = find_spice_jars(spice_jars)
        if jars is None:
            notes.append(spice_missing_note(short=True))
            chosen = tuple(m for m in chosen if m != "SPICE")
            if not chosen:
                raise UserError(f"nothing to compute: {spice_missing_note()}")
    groups = subset_ids(ids, subsets)
    java = find_java()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    meteor = shared_meteor() if "METEOR" in chosen else None
    meteor_pool = ThreadPoolExecutor(1, "icsd-meteor")
    spice_pool = ThreadPoolExecutor(1, "icsd-spice")
    try:
        t = time.perf_counter()
        tokens = ptb_tokenize(
            {**{("r", i): list(references[i]) for i in ids}, **{("p", i): [predictions[i]] for i in ids}}
        )
        gts = {i: tokens[("r", i)] for i in ids}
        res = {i: tokens[("p", i)] for i in ids}
        seconds["tokenize"] = time.perf_counter() - t
        spice_job = (
            spice_pool.submit(_timed, seconds, "SPICE", compute_spice, gts, res, jars) if jars else None
        )
        meteor_jobs = {
            name: meteor_pool.submit(_timed, seconds, "METEOR", meteor.score, _slice(gts, g), _slice(res, g))
            for name, g in groups.items()
            if meteor is not None
        }
        results = {
            name: _python_scores(_slice(gts, g), _slice(res, g), chosen, seconds)
            for name, g in groups.items()
        }
        for name, job in meteor_jobs.items():
            corpus, per = results[name]
            corpus["METEOR"], per["METEOR"] = job.result()
        if spice_job is not None:
            spice = spice_job.result()
            for name, g in groups.items():
                corpus, per = results[name]
                corpus["SPICE"], per["SPICE"] = spice_mean(spice, g), [spice[i] for i in g]
    except BaseException:
        # A METEOR JVM left mid-conversation would answer the next caller with stale lines.
        close_shared_meteor()
        raise
    finally:
        meteor_pool.shutdown(wait=True, cancel_futures=True)
        spice_pool.shutdown(wait=True, cancel_futures=True)
    seconds["total"] = time.perf_counter() - start
    scored = {name: _assemble(groups[name], *results[name]) for name in groups}
    overall = scored.pop("")
    return Evaluation(
        overall=overall, subsets=scored, metrics=chosen, seconds=seconds, notes=notes, java=java.banner
    )


def _timed(seconds: dict[str, float], name: str, fn: Any, *args: Any) -> Any:
    t = time.perf_counter()
    try:
        return fn(*args)
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t


def subset_ids(ids: list[K], subsets: Mapping[str, Sequence[K]] | None) -> dict[str, list[K]]:
    """``{"": ids, name: [ids of that subset, in ``ids`` order], ...}``; empty subsets are left out."""
    groups: dict[str, list[K]] = {"": ids}
    for name, members in (subsets or {}).items():
        if not name:
            raise UserError("a subset of images needs a name")
        wanted = set(members)
        chosen = [i for i in ids if i in wanted]
        if chosen:
            groups[name] = chosen
    return groups


def _slice(d: dict[Any, list[str]], ids: Sequence[Any]) -> dict[Any, list[str]]:
    return {i: d[i] for i in ids}
