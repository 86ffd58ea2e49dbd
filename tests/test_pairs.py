from __future__ import annotations

from collections import Counter

import pytest
from synthetic_run import coco_items, make_summary_run, sample_meta, write_shard

from icsd.config import PairsConfig
from icsd.errors import UserError
from icsd.records import Caption, Pair, Score, from_table, to_table
from icsd.stages import pairs as pairs_stage
from icsd.store import atomic_path, read_parquet, write_parquet


@pytest.fixture
def items(coco_captions, coco_images):
    return coco_items(coco_captions, coco_images, 6)


def read_pairs(run):
    return from_table(read_parquet(run.pairs), Pair)


def test_selected_pairs_are_each_image_with_each_selected_caption(tmp_path, items):
    run = make_summary_run(tmp_path / "run", items, shard_size=4)
    result = pairs_stage.run(PairsConfig(), run)
    got = read_pairs(run)
    expected = sum(len(texts) for _, _, texts in items)
    assert len(got) == expected
    assert {p.kind for p in got} == {"selected"}
    first_path, first_id, first_texts = items[0]
    mine = [p for p in got if p.image_key == f"g{first_id}"]
    assert [p.caption for p in mine] == first_texts
    assert {p.shard for p in got} == {"shard-00000.tar", "shard-00001.tar"}
    assert result.counts["selected"] == expected and result.counts["images"] == len(items)
    assert "selected" in result.summary() and run.stage_entry("pairs")["complete"]


def test_summary_kind_and_both(tmp_path, items):
    run = make_summary_run(tmp_path / "run", items)
    pairs_stage.run(PairsConfig(kinds="summary"), run)
    got = read_pairs(run)
    assert len(got) == len(items) and all(p.kind == "summary" for p in got)
    assert got[0].caption == items[0][2][0]
    result = pairs_stage.run(PairsConfig(kinds="selected,summary"), run)
    kinds = Counter(p.kind for p in read_pairs(run))
    assert kinds["summary"] == len(items) and kinds["selected"] == sum(len(t) for _, _, t in items)
    assert result.counts["summary"] == len(items)


def test_nsfw_images_left_out_unless_asked(tmp_path, items):
    flagged = frozenset({items[1][1]})
    run = make_summary_run(tmp_path / "run", items, nsfw_ids=flagged)
    result = pairs_stage.run(PairsConfig(), run)
    assert f"g{items[1][1]}" not in {p.image_key for p in read_pairs(run)}
    assert result.counts["nsfw_excluded"] == 1
    pairs_stage.run(PairsConfig(include_nsfw=True), run)
    assert f"g{items[1][1]}" in {p.image_key for p in read_pairs(run)}


def test_unfinished_shards_are_skipped(tmp_path, items):
    run = make_summary_run(tmp_path / "run", items, shard_size=3)
    (run.images / "shard-00001.done.json").unlink()
    result = pairs_stage.run(PairsConfig(), run)
    assert {p.shard for p in read_pairs(run)} == {"shard-00000.tar"}
    assert any("not finished" in n for n in result.notes)


def test_uni_pairs_from_images_rendered_from_captions(tmp_path, items):
    run = make_summary_run(tmp_path / "run", items[:2])
    captions = [Caption(f"{image_id}-0", texts[0], "coco") for _, image_id, texts in items]
    write_parquet(to_table(captions, Caption), run.captions)
    for p in run.images.glob("*"):
        p.unlink()
    samples = [(c.caption_id, path.read_bytes(), sample_meta(c.caption_id, c.text, source="caption"))
               for c, (path, _, _) in zip(captions, items, strict=True)]
    write_shard(run.images / "shard-00000.tar", samples)
    with pytest.raises(UserError, match="--kinds uni"):
        pairs_stage.run(PairsConfig(), run)
    result = pairs_stage.run(PairsConfig(kinds=["uni"]), run)
    got = read_pairs(run)
    assert [(p.image_key, p.caption, p.kind) for p in got] == [
        (c.caption_id, c.text, "uni") for c in captions
    ]
    assert result.counts["uni"] == len(items)


def test_min_clip_score_filters_by_scores_parquet(tmp_path, items):
    run = make_summary_run(tmp_path / "run", items[:2])
    with pytest.raises(UserError, match="icsd score"):
        pairs_stage.run(PairsConfig(min_clip_score=0.2), run)
    (_, id0, texts0), (_, id1, texts1) = items[0], items[1]
    scores = [Score(f"g{id0}", t, 0.3) for t in texts0] + [Score(f"g{id1}", t, 0.1) for t in texts1[:-1]]
    write_parquet(to_table(scores, Score), run.scores)
    result = pairs_stage.run(PairsConfig(min_clip_score=0.25), run)
    got = read_pairs(run)
    assert {p.image_key for p in got} == {f"g{id0}"} and len(got) == len(texts0)
    assert result.counts["below_min_clip_score"] == len(texts1) - 1
    assert result.counts["unscored"] == 1


def test_missing_inputs_are_one_line_errors(tmp_path, items):
    from icsd.store import RunDir

    with pytest.raises(UserError, match="icsd render"):
        pairs_stage.run(PairsConfig(), RunDir.at(tmp_path / "empty"))
    run = make_summary_run(tmp_path / "run", items[:1])
    with atomic_path(run.images / "shard-00000.tar") as tmp:
        tmp.write_bytes(b"not a tar")
    from icsd.store import mark_done

    mark_done(run.images / "shard-00000.tar", {})
    with pytest.raises(UserError, match="unreadable"):
        pairs_stage.run(PairsConfig(), run)


def test_cli_pairs(tmp_path, items):
    from typer.testing import CliRunner

    from icsd.cli import app

    run = make_summary_run(tmp_path / "run", items[:3])
    res = CliRunner().invoke(app, ["pairs", "--run", str(run.root), "--kinds", "selected,summary"])
    assert res.exit_code == 0, res.output
    assert "pairs:" in res.output and "summary 3" in res.output
    res = CliRunner().invoke(app, ["pairs", "--run", str(run.root), "--kinds", "nope"])
    assert res.exit_code != 0
