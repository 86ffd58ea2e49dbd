"""Optional stage, score: CLIP image-text similarity of every rendered image with its texts.

For an image rendered from a summary: the summary and each selected caption; for one rendered
from a caption (uni-context): that caption. Written to ``RUN/scores.parquet``; ``icsd pairs
--min-clip-score X`` filters by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ScoreConfig
from ..console import progress_bar
from ..errors import UserError
from ..executor import resolve_device
from ..records import ImageSample, Score, Selection, from_table, iter_batches, to_table
from ..store import RunDir, done_shards, iter_shard_samples, read_parquet, write_parquet
from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage

if TYPE_CHECKING:
    from ..rehearse.hooks import StageRehearsal


def texts_for(sample: ImageSample, selections: dict[str, Selection], captions: dict[str, str]) -> list[str]:
    """The texts an image is scored against (each once, in a stable order)."""
    if sample.meta.prompt_source == "caption":
        text = captions.get(sample.item_id) or sample.meta.summary
        return [text] if text else []
    texts: list[str] = []
    sel = selections.get(sample.item_id)
    if sel and sel.summary:
        texts.append(sel.summary)
    elif sample.meta.summary:
        texts.append(sample.meta.summary)
    if sel:
        texts += [captions[c] for c in sel.selected_ids if c in captions]
    return list(dict.fromkeys(texts))


def _samples(run: RunDir) -> Iterator[ImageSample]:
    shards, _ = done_shards(run.images)
    for shard in shards:
        yield from iter_shard_samples(shard)


def run(cfg: ScoreConfig, run: RunDir) -> StageResult:
    from ..backends.clip_scorer import ClipScorer

    timer = Timer()
    if not cfg.model:
        raise UserError("no CLIP model given: icsd score --run RUN --model CLIP_ID_OR_PATH")
    shards, unfinished = done_shards(run.images)
    if not shards:
        raise UserError(f"no finished image shards in {run.images} (run `icsd render` first)")
    captions_t = read_parquet(run.captions, "captions.parquet")
    captions = dict(zip(captions_t.column("caption_id").to_pylist(), captions_t.column("text").to_pylist(), strict=True))
    selections = (
        {s.group_id: s for s in from_table(read_parquet(run.selections), Selection)}
        if run.selections.exists()
        else {}
    )
    scorer = ClipScorer(cfg.model, resolve_device(cfg.device))
    scores: list[Score] = []
    images = 0
    with progress_bar(None, "score", "img") as bar:
        for batch in iter_batches((s for s in _samples(run) if s.image), cfg.batch_size):
            img_vecs = scorer.embed_images([s.image for s in batch if s.image])
            for sample, img_vec in zip(batch, img_vecs, strict=True):
                texts = texts_for(sample, selections, captions)
                if not texts:
                    continue
                sims = scorer.embed_texts(texts) @ img_vec
                scores += [Score(sample.key, t, float(v)) for t, v in zip(texts, sims, strict=True)]
            images += len(batch)
            bar.update(len(batch))
    write_parquet(to_table(scores, Score), run.scores)
    mean = sum(s.clip_score for s in scores) / len(scores) if scores else 0.0
    return finish_stage(
        run,
        "score",
        cfg,
        counts={"images": images, "scores": len(scores), "mean_clip_score": round(mean, 4), "unfinished_shards": unfinished},
        seconds=timer.seconds,
        output=run.scores,
        models={"clip": cfg.model},
    )


# ----------------------------------------------------------------------------- rehearsal


def _rehearsal_reduce(ctx: StageRehearsal) -> None:
    model = ctx.configured.model
    if model and not Path(model).expanduser().exists():
        ctx.config.model = None
        ctx.reduced("not rehearsed (no random CLIP scorer is built); the stage is skipped")


SPEC = StageSpec(
    name="score",
    wanted=lambda cfg: bool(cfg.score.model),
    rehearsal=RehearsalHooks(reduce=_rehearsal_reduce),
    config=ScoreConfig,
    run=run,
    inputs=lambda cfg, run: [run.images, run.selections, run.captions],
    outputs=lambda run: [run.scores],
    summary="Optional: CLIP image-text similarity of each image with its summary and selected captions.",
    examples=(
        "icsd score --run runs/coco --model openai/clip-vit-base-patch32",
        "icsd pairs --run runs/coco --min-clip-score 0.25",
    ),
)
