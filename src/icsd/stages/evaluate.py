"""Stage 8, evaluate: score captions of a benchmark's images as the captioning papers do.

Predictions come from a COCO results file (``--predictions``) or from a checkpoint that captions the
benchmark's images here (``--model`` + ``--images``). Scores are pycocoevalcap's (see
:mod:`icsd.metrics`); NoCaps is scored per domain and overall. With a run directory the outputs go to
``RUN/eval/<benchmark>/`` (predictions.json, scores.json, per_image.json); without one,
:func:`evaluate_to` writes the scores where the user asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..caption import skipped_note
from ..config import EvaluateConfig
from ..console import progress_bar
from ..data.cards import write_model_cards
from ..errors import UserError
from ..eval_sets import count_note, load_references
from ..formats import References, load_predictions, predictions_json
from ..images import open_image
from ..jvm import SPICE_SKIPPED, shared_meteor
from ..metrics import (
    ALL_METRICS,
    SCALE_LABEL,
    SCORE_KEYS,
    CaptionScores,
    Evaluation,
    format_score,
    parse_metrics,
    score_captions,
)
from ..store import RunDir, atomic_write_json, package_versions, sha256_file
from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage

if TYPE_CHECKING:
    from ..rehearse.hooks import Row, StageRehearsal

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Bleu_1", "BLEU-1"),
    ("Bleu_2", "BLEU-2"),
    ("Bleu_3", "BLEU-3"),
    ("Bleu_4", "BLEU-4"),
    ("METEOR", "METEOR"),
    ("ROUGE_L", "ROUGE-L"),
    ("CIDEr", "CIDEr"),
    ("SPICE", "SPICE"),
)


@dataclass
class EvalOutcome:
    """Everything one evaluation produced, before it is written anywhere."""

    refs: References
    captions: dict[str, str]
    evaluation: Evaluation
    scores: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def table(self) -> str:
        return markdown_table(self.refs.name, self.evaluation)


@dataclass
class EvalResult(StageResult):
    table: str = ""
    scores: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs


def check_config(cfg: EvaluateConfig) -> None:
    if cfg.annotations is None:
        raise UserError(
            "evaluate needs the references: pass --references FILE (captions, Karpathy or NoCaps JSON)"
        )
    if cfg.predictions is not None and cfg.model is not None:
        raise UserError("pass either --predictions FILE or --model CKPT, not both")
    if cfg.predictions is None and cfg.model is None:
        raise UserError(
            "evaluate needs --predictions FILE (COCO results JSON) or --model CKPT with --images DIR"
        )
    if cfg.model is not None and cfg.images is None:
        raise UserError("--model needs --images DIR: the folder holding the benchmark's images")
    if cfg.predictions is not None and cfg.limit is not None:
        raise UserError(
            "--limit applies to --model (caption only the first N images); use --subset with --predictions"
        )


def image_path(images: Path, file: str | None, key: str) -> Path:
    """Where an image lies under ``images``: the file's relative path (``val2014/COCO_...jpg``) or
    its bare name."""
    if not file:
        raise UserError(f"the references give no file name for image {key}: cannot caption it")
    rel = Path(file)
    for candidate in (images / rel, images / rel.name):
        if candidate.is_file():
            return candidate
    return images / rel


def resolve_images(refs: References, images: Path, limit: int | None) -> list[tuple[str, Path]]:
    """``[(key, path)]`` for every image with references (the first ``limit``); all must exist."""
    if not images.is_dir():
        raise UserError(f"images folder not found: {images}")
    todo = [im for im in refs.images if im.captions][:limit]
    paths = [(im.key, image_path(images, im.file, im.key)) for im in todo]
    missing = [p for _, p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(paths)} images of {refs.name} are not under {images} (e.g. {missing[0]})"
        )
    return paths


def caption_images(cfg: EvaluateConfig, refs: References) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Caption the benchmark's images with the checkpoint, in batches, with a progress bar:
    ``({key: caption}, [(file name, reason) of each image that could not be read]``."""
    from ..caption import caption_batched

    assert cfg.model is not None and cfg.images is not None
    todo = resolve_images(refs, Path(cfg.images).expanduser(), cfg.limit)
    try:
        from ..backends.captioners import load_captioner
    except ImportError as exc:
        raise UserError(f"--model needs the captioner backend (icsd.backends.captioners): {exc}") from None
    captioner = load_captioner(cfg.model, device=cfg.device, length_norm=cfg.length_norm, decode_dtype=cfg.decode_dtype)
    with progress_bar(len(todo), f"caption {refs.name}", "img") as bar:
        done = caption_batched(
            captioner,
            todo,
            lambda item: open_image(item[1]),
            beams=cfg.beams,
            min_new_tokens=cfg.min_new_tokens,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            lengths=cfg.decode_lengths,
            progress=bar.update,
        )
    skipped = [(path.name, reason) for (_, path), reason in done.skipped]
    if not done.captions:
        raise UserError(
            f"none of the {len(todo)} images of {refs.name} could be read (e.g. {skipped[0][0]}: {skipped[0][1]})"
        )
    return {key: text for (key, _), text in done.captions}, skipped


def read_predictions(path: str) -> dict[str, str]:
    return {key: caption for key, (_, caption) in load_predictions(path).items()}


# ----------------------------------------------------------------------------- scoring


def scores_block(scores: CaptionScores) -> dict[str, Any]:
    return {**scores.scores, "n_images": scores.n_images}


def scores_document(
    cfg: EvaluateConfig,
    refs: References,
    ev: Evaluation,
    captions: dict[str, str],
    unreadable: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """scores.json: every metric at the top level (0-1 scale), NoCaps domains, and how they were made.
    ``unreadable``: the images that could not be read (not captioned, so not scored)."""
    doc: dict[str, Any] = {"benchmark": refs.name, **scores_block(ev.overall)}
    if ev.subsets:
        doc["domains"] = {
            **{name: scores_block(s) for name, s in ev.subsets.items()},
            "overall": scores_block(ev.overall),
        }
    skipped = {n.split(" ", 1)[0]: n for n in ev.notes if " skipped: " in n}
    doc.update(
        {
            "metrics": list(ev.metrics),
            "skipped": skipped,
            "format": refs.format,
            "split": refs.split,
            "annotations": str(refs.path),
            "annotations_sha256": sha256_file(refs.path),
            "predictions": cfg.predictions,
            "predictions_sha256": sha256_file(cfg.predictions) if cfg.predictions else None,
            "checkpoint": cfg.model,
            "decoding": (
                {
                    "beams": cfg.beams,
                    "min_new_tokens": cfg.min_new_tokens,
                    "max_new_tokens": cfg.max_new_tokens,
                    "decode_lengths": cfg.decode_lengths,
                    "length_norm": cfg.length_norm or "as the checkpoint",
                    "decode_dtype": cfg.decode_dtype or "as the checkpoint",
                    "batch_size": cfg.batch_size,
                }
                if cfg.model
                else None
            ),
            "selection": {
                "predictions": len(captions),
                "subset": cfg.subset or cfg.limit is not None or bool(unreadable),
                "unreadable_images": len(unreadable or ()),
                "unreadable_examples": [f"{name}: {why}" for name, why in (unreadable or [])[:10]],
            },
            "seconds": {k: round(v, 3) for k, v in ev.seconds.items()},
            "java": ev.java,
            "versions": {
                k: v for k, v in package_versions().items() if k in ("python", "icsd", "pycocoevalcap")
            },
        }
    )
    return doc


def evaluate(cfg: EvaluateConfig) -> EvalOutcome:
    """Load references, get predictions (file or checkpoint), score them; nothing is written."""
    check_config(cfg)
    assert cfg.annotations is not None
    if "METEOR" in parse_metrics(cfg.metrics):
        shared_meteor()  # its JVM loads METEOR's paraphrase table while the files are read
    refs = load_references(cfg.annotations, benchmark=cfg.benchmark, split=cfg.split)
    notes = [n for n in (count_note(refs),) if n]
    unreadable: list[tuple[str, str]] = []
    if cfg.predictions is not None:
        captions = read_predictions(cfg.predictions)
    else:
        captions, unreadable = caption_images(cfg, refs)
        note = skipped_note(len(unreadable), len(captions) + len(unreadable), unreadable, f"images of {refs.name}")
        notes += [note] if note else []
    ev = score_captions(
        refs.captions(),
        captions,
        metrics=cfg.metrics,
        subsets=refs.domains() or None,
        subset=cfg.subset or cfg.limit is not None or bool(unreadable),
        spice_jars=cfg.spice_jars,
    )
    doc = scores_document(cfg, refs, ev, captions, unreadable)
    notes += [n for n in ev.notes if spice_asked(cfg) or not n.startswith(SPICE_SKIPPED)]
    return EvalOutcome(refs=refs, captions=captions, evaluation=ev, scores=doc, notes=notes, unreadable=unreadable)


def spice_asked(cfg: EvaluateConfig) -> bool:
    """SPICE was named on purpose: the metrics are not the default set, which takes SPICE only when
    its jars are found (and says nothing when they are not)."""
    chosen = parse_metrics(cfg.metrics)
    return "SPICE" in chosen and chosen != ALL_METRICS


def per_image_document(outcome: EvalOutcome) -> list[dict[str, Any]]:
    ids = {im.key: im for im in outcome.refs.images}
    domains = {k: name for name, s in outcome.evaluation.subsets.items() for k in s.per_image}
    rows = []
    for key, scores in outcome.evaluation.overall.per_image.items():
        row: dict[str, Any] = {"image_id": ids[key].image_id, "caption": outcome.captions[key]}
        if key in domains:
            row["domain"] = domains[key]
        rows.append({**row, **scores})
    return rows


def markdown_table(name: str, ev: Evaluation) -> str:
    """Scores on pycocoevalcap's 0-1 scale (as in scores.json; the scale is named in the header),
    one row per domain for NoCaps."""
    cols = [(k, label) for k, label in TABLE_COLUMNS if k in ev.overall.scores]
    rows = [(f"{name} {d}", s) for d, s in ev.subsets.items()]
    rows.append((f"{name} overall" if ev.subsets else name, ev.overall))
    head = f"| benchmark | images | {SCALE_LABEL}: " + " | ".join(label for _, label in cols) + " |"
    rule = "|---|---:|" + "---:|" * len(cols)
    lines = [head, rule]
    for label, s in rows:
        cells = " | ".join(format_score(s.scores[k]) for k, _ in cols)
        lines.append(f"| {label} | {s.n_images} | {cells} |")
    return "\n".join(lines)


def _counts(outcome: EvalOutcome) -> dict[str, Any]:
    s = outcome.evaluation.overall.scores
    counts: dict[str, Any] = {"images": outcome.evaluation.overall.n_images}
    if outcome.unreadable:
        counts["unreadable"] = len(outcome.unreadable)
    for key in ("Bleu_4", "CIDEr", "SPICE"):
        if key in s:
            counts[key] = round(s[key], 4)
    return counts


def write_outputs(outcome: EvalOutcome, folder: Path) -> Path:
    """predictions.json, per_image.json and scores.json (last) under ``folder``; returns scores.json."""
    atomic_write_json(folder / "predictions.json", predictions_json(outcome.refs, outcome.captions))
    atomic_write_json(folder / "per_image.json", per_image_document(outcome))
    scores = folder / "scores.json"
    atomic_write_json(scores, outcome.scores)
    return scores


def run(cfg: EvaluateConfig, run: RunDir) -> EvalResult:
    """Evaluate into ``RUN/eval/<benchmark>/`` and record the stage in the manifest."""
    timer = Timer()
    outcome = evaluate(cfg)
    scores_path = write_outputs(outcome, run.eval_dir(outcome.refs.name))
    write_model_cards(run.root)  # the run's checkpoints' cards now carry these scores
    result = finish_stage(
        run,
        "evaluate",
        cfg,
        counts=_counts(outcome),
        seconds=timer.seconds,
        output=scores_path,
        models={"captioner": cfg.model} if cfg.model else None,
        extra={
            "benchmark": outcome.refs.name,
            "scores": {k: outcome.scores[k] for k in SCORE_KEYS if k in outcome.scores},
        },
        notes=outcome.notes,
    )
    return EvalResult(**vars(result), table=outcome.table, scores=outcome.scores)


def main(cfg: EvaluateConfig, run_dir: Path | None = None, out: Path | None = None) -> EvalResult:
    """What ``icsd evaluate`` does: into the run directory when given (and a copy of scores.json
    to ``out``), else to ``out`` alone (or only the printed table)."""
    if run_dir is None:
        return evaluate_to(cfg, out)
    result = run(cfg, RunDir.at(run_dir))
    if out is not None:
        atomic_write_json(out, result.scores)
    return result


def _command(cfg: EvaluateConfig, run_dir: Path | None, files: dict[str, Any]) -> EvalResult:
    return main(cfg, run_dir, files.get("out"))


def evaluate_to(cfg: EvaluateConfig, out: Path | None = None) -> EvalResult:
    """Evaluate without a run directory: scores.json to ``out`` (when given), with the predictions
    beside it (``<out stem>.predictions.json``) when they were made here by ``--model``."""
    timer = Timer()
    outcome = evaluate(cfg)
    if out is not None:
        if out.is_dir():
            raise UserError(f"--out must be a file path, not a folder: {out}")
        if cfg.model is not None:
            atomic_write_json(
                out.with_name(f"{out.stem}.predictions.json"),
                predictions_json(outcome.refs, outcome.captions),
            )
        atomic_write_json(out, outcome.scores)
    return EvalResult(
        stage="evaluate",
        counts=_counts(outcome),
        seconds=timer.seconds,
        output=out,
        notes=outcome.notes,
        table=outcome.table,
        scores=outcome.scores,
    )


def _inputs(cfg: EvaluateConfig, run: RunDir) -> list[Path]:
    return [Path(p).expanduser() for p in (cfg.annotations, cfg.images, cfg.predictions, cfg.model) if p]


def _prepare(cfg: EvaluateConfig, run: RunDir, changed: bool) -> EvaluateConfig:
    """Under ``icsd run``: evaluate the run's own best checkpoint unless a model or predictions are set."""
    if cfg.model or cfg.predictions:
        return cfg
    best = run.train / "best"
    return cfg.model_copy(update={"model": str(best if best.exists() else run.train / "last")})


# ----------------------------------------------------------------------------- rehearsal


def _rehearsal_reduce(ctx: StageRehearsal) -> None:
    from ..config import package_file

    cfg, r, n = ctx.configured, ctx.config, ctx.options.eval_images
    if not (cfg.annotations or cfg.predictions):
        return
    if not (ctx.exists("annotations") and ctx.exists("images")):
        r.annotations = str(package_file("data/quickstart/references.json"))
        r.images = str(package_file("data/quickstart/images"))
        r.benchmark = "coco-captions"
        r.split = "test"
        ctx.substituted(
            f"evaluate: the bundled COCO images and references instead of {cfg.benchmark or 'the benchmark'}"
        )
    r.predictions = None
    r.model = None
    r.limit = n
    r.batch_size = min(cfg.batch_size, n)
    r.spice_jars = None
    r.metrics = [m for m in cfg.metrics if m.lower() != "spice"] or ["BLEU"]
    ctx.reduced(f"the first {n} images (SPICE left out)")


def _benchmark_images(ctx: StageRehearsal) -> int | None:
    from ..eval_sets import EVAL_SETS

    cfg = ctx.configured
    if ctx.exists("annotations"):
        try:
            refs = load_references(cfg.annotations or "", benchmark=cfg.benchmark, split=cfg.split)
            return sum(1 for im in refs.images if im.captions)
        except Exception:  # noqa: BLE001 - the benchmark's published size below
            pass
    spec = EVAL_SETS.get(cfg.benchmark or "")
    return spec.expected_images if spec is not None and spec.expected_images else None


def _rehearsal_project(ctx: StageRehearsal) -> Row:
    from ..rehearse.hooks import per

    rec = ctx.record
    assert rec is not None
    cfg, r = ctx.configured, ctx.config
    gen = ctx.probe("generate")
    spu = per(gen.seconds, gen.items) or per(rec.seconds, r.limit or 1)
    bench = _benchmark_images(ctx)
    return ctx.row(architecture="the trained captioner",
                   settings={"benchmark": cfg.benchmark, "beams": cfg.beams, "min_new_tokens": cfg.min_new_tokens,
                             "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size},
                   unit="image", units=gen.items or (r.limit or 0), seconds_per_unit=spu, full_units=bench,
                   projected_seconds=(spu or 0) * bench if bench else None,
                   projection="beam search seconds per image x benchmark images")  # fmt: skip


SPEC = StageSpec(
    name="evaluate",
    run_optional=True,
    file_options=(("out", "Write scores.json here."),),
    main=_command,
    wanted=lambda cfg: bool(cfg.evaluate.annotations or cfg.evaluate.predictions),
    report_counts=(("images", "test images"),),
    rehearsal=RehearsalHooks(reduce=_rehearsal_reduce, project=_rehearsal_project),
    config=EvaluateConfig,
    run=run,
    inputs=_inputs,
    outputs=lambda run: [run.root / "eval"],
    prepare=_prepare,
    summary="Score captions with BLEU, METEOR, ROUGE-L, CIDEr and SPICE exactly as pycocoevalcap does.",
    examples=(
        "icsd evaluate --predictions preds.json --references captions_val2017.json",
        "icsd evaluate --predictions preds.json --references dataset_coco.json --split test --out scores.json",
        "icsd evaluate --predictions preds.json --references nocaps_val_4500_captions.json --benchmark nocaps-val",
        "icsd evaluate --model runs/coco/train/best --benchmark coco-karpathy-test "
        "--annotations dataset_coco.json --images data/coco --run runs/coco",
        "icsd evaluate --model runs/coco/train/best --benchmark flickr30k-karpathy-test "
        "--annotations dataset_flickr30k.json --images data/flickr30k-images --run runs/coco",
        "ICSD_SPICE_JARS=~/stanford-corenlp-full-2015-12-09 icsd evaluate --predictions p.json --references r.json",
        "SPICE needs the Stanford CoreNLP 3.6.0 jars: download "
        "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip, unzip it and pass --spice-jars DIR "
        "(or set ICSD_SPICE_JARS=DIR). The default metrics take SPICE when the jars are found; "
        "--metrics ...,SPICE asks for it and says when it cannot run.",
        "Benchmarks: coco-karpathy-test, coco-karpathy-val, flickr30k-karpathy-test, flickr30k-karpathy-val, "
        "nocaps-val (scored per domain), coco-captions.",
    ),
)
