"""Damaged outputs are detected and redone, never read as valid.

A truncated parquet part, a truncated tar shard, a done-marker without its shard, a shard without
its marker, a garbled marker and a half-written checkpoint: readers downstream refuse or skip them
(one-line errors, never a traceback), and rerunning the stage that wrote them redoes exactly them.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import (
    QUICKSTART_CAPTIONS,
    QUICKSTART_IMAGES,
    QUICKSTART_REFERENCES,
    digest,
    leftovers,
    record_figures,
)
from llm_run import coco_groups, write_run
from safetensors.torch import load_file
from synthetic_run import coco_items, make_summary_run

from icsd.backends.t2i import build_tiny_pipeline
from icsd.config import (
    EmbedConfig,
    GroupConfig,
    IngestConfig,
    PairsConfig,
    RenderConfig,
    SummarizeConfig,
    TrainConfig,
)
from icsd.errors import UserError
from icsd.records import Pair, Selection, from_table, to_table
from icsd.stages import embed, group, ingest, pairs, render, summarize, train
from icsd.store import RunDir, is_done, marker_path, read_embeddings, read_parquet, write_parquet
from icsd.testing.chat_server import ChatServer, Reply, first_caption
from icsd.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")




def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text, text
    return text


# ----------------------------------------------------------------------------- parquet parts (embed)


def test_damaged_embedding_parts_are_refused_then_redone(tmp_path: Path, tiny_sentence_model: Path) -> None:
    run = RunDir.at(tmp_path / "run")
    ingest.run(IngestConfig(corpus=str(QUICKSTART_CAPTIONS), limit=80), run)
    cfg = EmbedConfig(model=str(tiny_sentence_model), part_size=20, device="cpu")
    embed.run(cfg, run)
    parts = sorted(run.embeddings.glob("part-*.parquet"))
    good = {p.name: digest(p) for p in parts}

    truncate(parts[1])  # its marker still names the old size
    parts[2].unlink()  # a marker without its part
    marker_path(parts[3]).write_text('{"file": "part-00003.parquet", "bytes": ')  # a garbled marker
    assert [is_done(p) for p in parts] == [True, False, False, False]
    with pytest.raises(UserError, match="incomplete") as err:
        read_embeddings(run.embeddings)
    one_line(err)
    with pytest.raises(UserError, match="incomplete"):
        group.run(GroupConfig(k=5), run)

    result = embed.run(cfg, run)
    assert result.counts["parts_skipped"] == 1 and result.counts["parts_computed"] == 3
    assert {p.name: digest(p) for p in sorted(run.embeddings.glob("part-*.parquet"))} == good
    ids, _ = read_embeddings(run.embeddings)
    assert len(ids) == len(set(ids)) == 80
    record_figures("corrupt/embed", faults=3, records_checked=len(ids), lost=0)


# ----------------------------------------------------------------------------- parquet parts (summarize)


def answer_for(request: dict[str, Any]) -> Reply:
    head = first_caption(request)
    return Reply(content=json.dumps({"index": [1, 2, 3, 4, 5], "summary": f"One scene: {head}"}))


@pytest.fixture()
def llm_server() -> Iterator[ChatServer]:
    with ChatServer(answer_for) as server:
        yield server


def test_damaged_selection_parts_are_redone(tmp_path: Path, llm_server: ChatServer) -> None:
    captions, candidates = coco_groups(QUICKSTART_CAPTIONS, groups=12)
    run = write_run(tmp_path / "run", captions, candidates)
    cfg = SummarizeConfig(backend="openai", model="echo", base_url=[llm_server.url], part_size=3, concurrency=1)
    summarize.run(cfg, run)
    complete = digest(run.selections)
    parts = sorted(run.selection_parts.glob("part-*.parquet"))
    assert len(parts) == 4

    truncate(parts[0])  # truncated, marker kept
    parts[1].unlink()  # marker without its part
    marker_path(parts[2]).unlink()  # part without its marker
    assert [p.name for p in summarize.done_parts(run.selection_parts)] == [parts[3].name]
    assert len(summarize.read_records(run.selection_parts)) == 3  # only the intact part is read

    truncate(run.selections)  # the consolidated file too: readers refuse it in one line
    with pytest.raises(UserError, match="not a readable parquet") as err:
        render.run(RenderConfig(tiny_random=True), run)
    one_line(err)

    asked = llm_server.count
    result = summarize.run(cfg, run)
    assert result.counts["kept"] == 3 and result.counts["answered"] == 9
    assert llm_server.count == asked  # redone from the answer cache, not the server
    assert digest(run.selections) == complete
    in_parts = [r.group_id for p in summarize.done_parts(run.selection_parts)
                for r in from_table(read_parquet(p), Selection)]  # fmt: skip
    assert sorted(in_parts) == sorted(c.group_id for c in candidates)
    assert not (run.selection_parts / parts[0].name).exists() or is_done(run.selection_parts / parts[0].name)
    assert not leftovers(run.root)
    record_figures("corrupt/summarize", faults=4, records_checked=len(in_parts), lost=0)


# ----------------------------------------------------------------------------- tar shards


@pytest.fixture(scope="module")
def coco8() -> list[tuple[Path, int, list[str]]]:
    return coco_items(QUICKSTART_REFERENCES, QUICKSTART_IMAGES, 8)


def test_damaged_shards_are_never_read_as_done(tmp_path: Path, coco8: list[tuple[Path, int, list[str]]]) -> None:
    run = make_summary_run(tmp_path / "run", coco8, shard_size=2)
    shards = sorted(run.images.glob("shard-*.tar"))
    assert len(shards) == 4
    truncate(shards[0])  # truncated tar, marker kept
    shards[1].unlink()  # marker without its shard
    marker_path(shards[2]).write_text("{not json")  # garbled marker
    assert [is_done(s) for s in shards] == [False, False, False, True]

    result = pairs.run(PairsConfig(), run)
    got = from_table(read_parquet(run.pairs), Pair)
    assert {p.shard for p in got} == {shards[3].name}
    assert any("not finished" in n for n in result.notes)

    # a pairs file made before the damage names damaged shards: the trainer refuses it in one line
    intact = make_summary_run(tmp_path / "intact", coco8, shard_size=2)
    pairs.run(PairsConfig(), intact)
    shutil.copy(intact.pairs, run.pairs)
    with pytest.raises(UserError, match="not finished") as err:
        train.run(TrainConfig(preset="tiny", max_steps=1, device="cpu", num_workers=0), run)
    one_line(err)
    record_figures("corrupt/shards", faults=3, records_checked=len(got), lost=0)


def test_render_redoes_a_marker_without_shard_and_a_garbled_marker(tmp_path: Path) -> None:
    model = build_tiny_pipeline(tmp_path / "tiny-sd")
    run = RunDir.at(tmp_path / "run")
    rows = [Selection(f"g{i}", "ok", [f"c{i}"], f"a red bus number {i}") for i in range(6)]
    write_parquet(to_table(rows, Selection), run.selections)
    cfg = RenderConfig(model=str(model), steps=1, size=32, shard_size=2, batch_size=2, devices="cpu")
    render.run(cfg, run)
    shards = sorted(run.images.glob("shard-*.tar"))
    good = {s.name: digest(s) for s in shards}
    shards[0].unlink()
    marker_path(shards[1]).write_bytes(b"\x00\x00\x00")
    result = render.run(cfg, run)
    assert result.counts["skipped_shards"] == 1 and result.counts["rendered"] == 4
    assert {s.name: digest(s) for s in sorted(run.images.glob("shard-*.tar"))} == good
    assert all(is_done(s) for s in shards)
    record_figures("corrupt/render", faults=2, records_checked=6, lost=0)


# ----------------------------------------------------------------------------- checkpoints


def train_config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"preset": "tiny", "max_steps": 4, "batch_size": 4, "save_every": 2, "eval_every": 1000,
                            "val_fraction": 0, "num_workers": 0, "device": "cpu", "log_every": 1}  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, coco8: list[tuple[Path, int, list[str]]]) -> RunDir:
    run = make_summary_run(tmp_path_factory.mktemp("trained") / "run", coco8, shard_size=4)
    pairs.run(PairsConfig(), run)
    train.run(train_config(), run)
    return run


def test_a_half_written_checkpoint_beside_a_complete_one_is_ignored(trained: RunDir, tmp_path: Path) -> None:
    run = RunDir.at(shutil.copytree(trained.root, tmp_path / "run"))
    partial = ckpt.staging_dir(run.train / "last")
    shutil.copytree(run.train / "last", partial)
    (partial / ckpt.STATE_FILE).unlink()  # a save killed before its state file
    truncate(partial / "model.safetensors")
    assert ckpt.complete_checkpoint(run.train / "last") == run.train / "last"
    result = train.run(train_config(), run)
    assert any("already complete at step 4" in n for n in result.notes), result.notes


@pytest.mark.parametrize("damage", ["truncated weights", "missing optimizer state", "garbled state"])
def test_a_damaged_last_checkpoint_is_not_loaded(
    trained: RunDir, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir.at(shutil.copytree(trained.root, tmp_path / "run"))
    last = run.train / "last"
    if damage == "truncated weights":
        truncate(last / "model.safetensors")
    elif damage == "missing optimizer state":
        (last / "optimizer.json").unlink()
    else:
        (last / "rng-0.json").write_text('{"python": [3, ')
    assert ckpt.complete_checkpoint(last) is None
    if damage != "truncated weights":
        return  # one full retrain is enough to show what the trainer does with it
    with caplog.at_level(logging.WARNING, logger="icsd.training.checkpoint"):
        result = train.run(train_config(), run)  # trained again from step 0, not from the damaged files
    assert any("damaged" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    assert not any("resumed" in n for n in result.notes)
    want = load_file(str(trained.train / "last" / "model.safetensors"))
    got = load_file(str(last / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)
    record_figures("corrupt/checkpoint", faults=3, lost=0)


def test_caption_with_a_truncated_checkpoint_is_one_line(
    trained: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from icsd.cli import main

    best = Path(shutil.copytree(trained.train / "best", tmp_path / "best"))
    truncate(best / "model.safetensors")
    image = next(QUICKSTART_IMAGES.glob("*.jpg"))
    monkeypatch.setattr(sys, "argv", ["icsd", "caption", "--model", str(best), str(image)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err[-1].startswith("error: ") and "cannot load captioner" in err[-1], err
