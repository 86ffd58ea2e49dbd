"""Pair each rendered image with the texts it was made from (method step 6).

Reads the finished render shards (their ``.json`` members only), ``selections.parquet`` and
``captions.parquet``, and writes ``RUN/pairs.parquet``:

- ``selected``: an image rendered from a summary, with each caption the LLM selected for it;
- ``summary``: that image with its summary (the prompt it was rendered from);
- ``uni``: an image rendered from one caption (``icsd render --prompts captions``), with that caption.

Images flagged NSFW are left out unless asked; ``min_clip_score`` drops pairs whose CLIP score in
``RUN/scores.parquet`` is below it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import PairsConfig
from ..errors import UserError
from ..records import PAIR_KINDS, Pair, Score, Selection, from_table, to_table
from ..store import RunDir, done_shards, iter_shard_samples, read_parquet, write_parquet
from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage

if TYPE_CHECKING:
    from ..rehearse.hooks import Row, StageRehearsal


@dataclass(frozen=True)
class RenderedImage:
    """What a shard's ``<key>.json`` says about one image."""

    key: str
    shard: str
    item_id: str
    prompt_source: str
    prompt: str
    nsfw: bool | None


def rendered_images(shard: Path) -> Iterator[RenderedImage]:
    """What each sample's ``.json`` member of a shard says (images are not read)."""
    for sample in iter_shard_samples(shard, with_images=False):
        meta = sample.meta
        yield RenderedImage(
            key=sample.key,
            shard=sample.shard,
            item_id=meta.id,
            prompt_source=meta.prompt_source,
            prompt=meta.summary,
            nsfw=meta.nsfw,
        )


def load_caption_texts(run: RunDir) -> dict[str, str]:
    table = read_parquet(run.captions, "captions.parquet (run `icsd ingest` first)")
    return dict(zip(table.column("caption_id").to_pylist(), table.column("text").to_pylist(), strict=True))


def load_ok_selections(run: RunDir) -> dict[str, Selection]:
    if not run.selections.exists():
        return {}
    table = read_parquet(run.selections, "selections.parquet")
    return {s.group_id: s for s in from_table(table, Selection) if s.status == "ok"}


def load_clip_scores(run: RunDir) -> dict[tuple[str, str], float]:
    table = read_parquet(run.scores, "scores.parquet")
    return {(s.image_key, s.text): float(s.clip_score) for s in from_table(table, Score)}


def pairs_for_image(
    image: RenderedImage,
    kinds: list[str],
    selections: dict[str, Selection],
    captions: dict[str, str],
    tally: Counter[str],
) -> list[Pair]:
    """Every pair of the requested kinds for one image (``tally`` counts what had to be skipped)."""
    out: list[Pair] = []
    if image.prompt_source == "caption":
        if "uni" in kinds:
            text = captions.get(image.item_id) or image.prompt
            if text:
                out.append(Pair(image.key, image.shard, text, "uni"))
        else:
            tally["uni_images_not_paired"] += 1
        return out
    selection = selections.get(image.item_id)
    if "selected" in kinds:
        if selection is None:
            tally["no_selection"] += 1
        else:
            for cid in selection.selected_ids:
                selected = captions.get(cid)
                if selected is None:
                    tally["unknown_caption_ids"] += 1
                    continue
                out.append(Pair(image.key, image.shard, selected, "selected"))
    if "summary" in kinds:
        summary: str | None = image.prompt or (selection.summary if selection else None)
        if summary:
            out.append(Pair(image.key, image.shard, summary, "summary"))
    return out


def filter_by_clip_score(
    pairs: list[Pair], scores: dict[tuple[str, str], float], threshold: float, tally: Counter[str]
) -> list[Pair]:
    kept = []
    for p in pairs:
        score = scores.get((p.image_key, p.caption))
        if score is None:
            tally["unscored"] += 1
        elif score < threshold:
            tally["below_min_clip_score"] += 1
        else:
            kept.append(p)
    return kept


def run(cfg: PairsConfig, run: RunDir) -> StageResult:
    timer = Timer()
    unknown = [k for k in cfg.kinds if k not in PAIR_KINDS]
    if unknown or not cfg.kinds:
        raise UserError(f"--kinds takes a comma-separated list of {', '.join(PAIR_KINDS)}; got {cfg.kinds}")
    shards, unfinished = done_shards(run.images)
    if not shards:
        raise UserError(f"no finished render shards under {run.images}: run `icsd render --run {run.root}` first")
    captions = load_caption_texts(run)
    selections = load_ok_selections(run)
    if ("selected" in cfg.kinds or "summary" in cfg.kinds) and not run.selections.exists():
        raise UserError(f"selections.parquet not found in {run.root}: run `icsd summarize` first")
    scores: dict[tuple[str, str], float] | None = None
    if cfg.min_clip_score is not None:
        if not run.scores.exists():
            raise UserError(
                f"--min-clip-score needs {run.scores}: run `icsd score --run {run.root} --model CLIP` first"
            )
        scores = load_clip_scores(run)

    tally: Counter[str] = Counter()
    pairs: list[Pair] = []
    images_paired: set[str] = set()
    for shard in shards:
        for image in rendered_images(shard):
            tally["images"] += 1
            if image.nsfw and not cfg.include_nsfw:
                tally["nsfw_excluded"] += 1
                continue
            found = pairs_for_image(image, list(cfg.kinds), selections, captions, tally)
            if scores is not None and cfg.min_clip_score is not None:
                found = filter_by_clip_score(found, scores, cfg.min_clip_score, tally)
            if found:
                images_paired.add(image.key)
            pairs.extend(found)

    if not pairs:
        raise UserError(no_pairs_reason(cfg, tally))
    write_parquet(to_table(pairs, Pair), run.pairs)
    per_kind = Counter(p.kind for p in pairs)
    counts: dict[str, Any] = {"images": len(images_paired), "pairs": len(pairs)}
    counts.update({k: per_kind.get(k, 0) for k in cfg.kinds})
    for name in ("nsfw_excluded", "below_min_clip_score", "unscored", "no_selection"):
        if tally[name]:
            counts[name] = tally[name]
    notes = skip_notes(tally, unfinished)
    return finish_stage(
        run,
        "pairs",
        cfg,
        counts=counts,
        seconds=timer.seconds,
        output=run.pairs,
        notes=notes,
    )


def skip_notes(tally: Counter[str], unfinished: int) -> list[str]:
    notes = []
    if unfinished:
        notes.append(f"note: {unfinished} render shard(s) not finished were left out (rerun `icsd render`)")
    if tally["uni_images_not_paired"]:
        notes.append(
            f"note: {tally['uni_images_not_paired']} image(s) rendered from single captions were left out: "
            "add `--kinds uni` to pair them"
        )
    if tally["unknown_caption_ids"]:
        notes.append(f"note: {tally['unknown_caption_ids']} selected caption id(s) are not in captions.parquet")
    if tally["unscored"]:
        notes.append(f"note: {tally['unscored']} pair(s) without a CLIP score in scores.parquet were left out")
    return notes


def no_pairs_reason(cfg: PairsConfig, tally: Counter[str]) -> str:
    kinds = ",".join(cfg.kinds)
    if tally["images"] == 0:
        return "the finished render shards hold no images"
    if tally["nsfw_excluded"] == tally["images"]:
        return f"all {tally['images']} images are flagged NSFW (pass --include-nsfw to keep them)"
    if tally["uni_images_not_paired"]:
        return f"no pairs of kind {kinds}: the images were rendered from single captions, use --kinds uni"
    if tally["below_min_clip_score"] or tally["unscored"]:
        return f"no pair has a CLIP score of at least {cfg.min_clip_score} in scores.parquet"
    return f"no pairs of kind {kinds} could be made from {tally['images']} images (no ok selections?)"


# ----------------------------------------------------------------------------- rehearsal


def _rehearsal_project(ctx: StageRehearsal) -> Row:
    """Pairs per image: the slice's, except for selected captions when the scripted server chose
    them (it always picks the same number): then the cost model's recipe figure."""
    from ..rehearse.hooks import Size, parquet_rows, per

    rec = ctx.record
    assert rec is not None
    pairs = parquet_rows(ctx.run.pairs)
    images = int(rec.counts.get("images", 0))
    kinds = list(ctx.configured.kinds)
    selected = ctx.sizes.get("selected_per_image")
    if "selected" in kinds and selected is not None:
        others = [k for k in kinds if k != "selected"]
        extra = f" + one pair of each other kind ({', '.join(others)})" if others else ""
        per_image = Size(selected.value + len(others), f"the selected captions per image{extra}")
    else:
        per_image = Size(round(pairs / images, 3) if images else 0.0, "measured on the rehearsal's slice")
    ctx.sizes["pairs_per_image"] = per_image
    full = int((ctx.size("images") or 0) * per_image.value)
    ctx.sizes["pairs"] = Size(full, "images x pairs per image")
    return ctx.row(settings={"kinds": kinds}, unit="pair", units=pairs, seconds_per_unit=per(rec.seconds, pairs),
                   full_units=full, projected_seconds=None, projection="minor (table work)")  # fmt: skip


SPEC = StageSpec(
    name="pairs",
    report_counts=(("pairs", "pairs"), ("images", "images")),
    rehearsal=RehearsalHooks(project=_rehearsal_project),
    config=PairsConfig,
    run=run,
    inputs=lambda cfg, run: [run.images, run.selections, run.captions, run.scores],
    outputs=lambda run: [run.pairs],
    summary="Pair each rendered image with its selected captions (and/or summary) into RUN/pairs.parquet.",
    examples=(
        "icsd pairs --run runs/coco",
        "icsd pairs --run runs/coco --kinds selected,summary",
        "icsd pairs --run runs/uni --kinds uni",
        "icsd pairs --run runs/coco --min-clip-score 0.25 --include-nsfw",
    ),
)
