"""`kill -9` at random points inside embed, summarize, render and train.

Each stage runs as a real `python -m icsd.cli` subprocess that is SIGKILLed after a random number
of finished work units (their done-markers), or inside the next unit once it has visibly begun
(several seeds; every wait is for a file, never for a time), then the same command is run again.
The rerun must complete; every record must appear exactly once; what was finished before the kill
must be left byte for byte as it was; and the final outputs must be byte-identical to those of an
uninterrupted run. Training must resume from its last checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import (
    QUICKSTART_CAPTIONS,
    QUICKSTART_IMAGES,
    QUICKSTART_REFERENCES,
    cli_env,
    digest,
    kill_at_random_point,
    leftovers,
    record_figures,
    seeds,
    snapshot,
    temp_file_with_data,
)
from llm_run import coco_groups, write_run
from safetensors.torch import load_file
from synthetic_run import coco_items, make_summary_run

from icsd.backends.t2i import build_tiny_pipeline
from icsd.config import EmbedConfig, IngestConfig, PairsConfig, RenderConfig, SummarizeConfig, TrainConfig
from icsd.records import Selection, from_table, to_table
from icsd.stages import embed, ingest, pairs, render, summarize, train
from icsd.store import RunDir, is_done, iter_shard_samples, read_embeddings, read_parquet, write_parquet
from icsd.testing.chat_server import ChatServer, Reply, user_text
from icsd.training import checkpoint as ckpt

# long: kept in the default run (deselect with -m 'not slow')
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

_FIRST = re.compile(r"^\s*1\.\s+(.*)$", re.MULTILINE)




def copy_run(src: RunDir, dest: Path) -> RunDir:
    shutil.copytree(src.root, dest)
    return RunDir.at(dest)


def finished(folder: Path, pattern: str) -> int:
    return sum(1 for p in folder.glob(pattern) if is_done(p))


# ----------------------------------------------------------------------------- embed

EMBED_PARTS = 12
EMBED_CAPTIONS = 1200


@pytest.fixture(scope="module")
def embed_base(tmp_path_factory: pytest.TempPathFactory, tiny_sentence_model: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("embed")
    base = RunDir.at(root / "base")
    ingest.run(IngestConfig(corpus=str(QUICKSTART_CAPTIONS), limit=EMBED_CAPTIONS), base)
    ref = copy_run(base, root / "reference")
    cfg = EmbedConfig(
        model=str(tiny_sentence_model), part_size=EMBED_CAPTIONS // EMBED_PARTS, batch_size=4, device="cpu"
    )
    embed.run(cfg, ref)
    return {"base": base, "cfg": cfg, "reference": snapshot(ref.embeddings, "part-*.parquet")}


@pytest.mark.parametrize("seed", seeds(3))
def test_embed_killed_at_a_random_point_resumes_to_identical_parts(
    embed_base: dict[str, Any], tmp_path: Path, seed: int
) -> None:
    run = copy_run(embed_base["base"], tmp_path / "run")
    cfg: EmbedConfig = embed_base["cfg"]
    args = ["embed", "--run", str(run.root), "--model", cfg.model, "--part-size", str(cfg.part_size),
            "--batch-size", str(cfg.batch_size), "--device", "cpu"]  # fmt: skip
    kill = kill_at_random_point(
        args,
        seed=seed,
        progress=lambda: finished(run.embeddings, "part-*.parquet"),
        total=EMBED_PARTS,
    )
    assert kill.alive and 2 <= kill.done_at_kill < EMBED_PARTS, kill
    done_before = {n: h for n, h in snapshot(run.embeddings, "part-*.parquet").items()
                   if is_done(run.embeddings / n)}  # fmt: skip

    result = embed.run(cfg, run)

    assert result.counts["parts_skipped"] == len(done_before)
    assert result.counts["parts_computed"] == EMBED_PARTS - len(done_before)
    after = snapshot(run.embeddings, "part-*.parquet")
    assert {n: after[n] for n in done_before} == done_before  # finished parts untouched
    assert after == embed_base["reference"]  # every part byte-identical to an uninterrupted run's
    ids, vectors = read_embeddings(run.embeddings)
    assert len(ids) == len(set(ids)) == EMBED_CAPTIONS and vectors.shape[0] == EMBED_CAPTIONS
    assert not leftovers(run.root)
    record_figures("kill/embed", seed=seed, target=kill.target, phase=kill.phase,
                   parts_done_at_kill=kill.done_at_kill, records_checked=len(ids), lost=0)  # fmt: skip


# ----------------------------------------------------------------------------- summarize

SUMMARY_GROUPS = 40
SUMMARY_PART = 4
SERVER_DELAY = 0.1
SERVER_CONCURRENCY = 2


def scene_answer(request: dict[str, Any]) -> Reply:
    """A valid answer that differs per group: the summary quotes the group's first caption."""
    heads = _FIRST.findall(user_text(request))  # the last list's item 1: the first caption
    head = heads[-1].strip() if heads else "?"
    return Reply(content=json.dumps({"index": [1, 2, 3, 4, 5], "summary": f"One scene: {head}"}), delay=SERVER_DELAY)


@pytest.fixture(scope="module")
def llm_server() -> Iterator[ChatServer]:
    with ChatServer(scene_answer) as server:
        server.keep_requests = False
        yield server


def summarize_args(run: RunDir, server: ChatServer) -> list[str]:
    return ["summarize", "--run", str(run.root), "--backend", "openai", "--model", "echo",
            "--base-url", server.url, "--client", "aiohttp", "--concurrency", str(SERVER_CONCURRENCY),
            "--part-size", str(SUMMARY_PART), "--timeout", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def summarize_base(tmp_path_factory: pytest.TempPathFactory, llm_server: ChatServer) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("summarize")
    captions, candidates = coco_groups(QUICKSTART_CAPTIONS, groups=SUMMARY_GROUPS)
    base = write_run(root / "base", captions, candidates)
    ref = copy_run(base, root / "reference")
    cfg = SummarizeConfig(backend="openai", model="echo", base_url=[llm_server.url], client="aiohttp",
                          concurrency=SERVER_CONCURRENCY, part_size=SUMMARY_PART, timeout=5)  # fmt: skip
    summarize.run(cfg, ref)
    return {"base": base, "cfg": cfg, "reference": digest(ref.selections), "groups": [c.group_id for c in candidates]}


def records_in_parts(run: RunDir) -> list[str]:
    return [r.group_id for p in summarize.done_parts(run.selection_parts)
            for r in from_table(read_parquet(p), Selection)]  # fmt: skip


@pytest.mark.parametrize("seed", seeds(3))
def test_summarize_killed_at_a_random_point_loses_only_groups_in_flight(
    summarize_base: dict[str, Any], llm_server: ChatServer, tmp_path: Path, seed: int
) -> None:
    run = copy_run(summarize_base["base"], tmp_path / "run")
    total_parts = SUMMARY_GROUPS // SUMMARY_PART
    kill = kill_at_random_point(
        summarize_args(run, llm_server),
        seed=seed,
        progress=lambda: len(summarize.done_parts(run.selection_parts)),
        total=total_parts,
        env=cli_env(OPENAI_API_KEY=""),
    )
    assert kill.alive and 2 <= kill.done_at_kill < total_parts, kill
    parts_before = {n: h for n, h in snapshot(run.selection_parts, "part-*.parquet").items()
                    if is_done(run.selection_parts / n)}  # fmt: skip
    groups_before = records_in_parts(run)
    assert len(groups_before) == len(set(groups_before))

    asked_before = llm_server.count
    result = summarize.run(summarize_base["cfg"], run)

    after = snapshot(run.selection_parts, "part-*.parquet")
    assert {n: after[n] for n in parts_before} == parts_before  # finished parts untouched
    in_parts = records_in_parts(run)
    assert sorted(in_parts) == sorted(summarize_base["groups"])  # each group once, in all parts together
    assert result.counts["kept"] == len(groups_before) and result.counts["ok"] == SUMMARY_GROUPS
    # no finished group was asked again (answers cached but not yet in a part may be reused)
    assert llm_server.count - asked_before <= SUMMARY_GROUPS - len(groups_before)
    rows = from_table(read_parquet(run.selections), Selection)
    assert [r.group_id for r in rows] == summarize_base["groups"]
    assert digest(run.selections) == summarize_base["reference"]  # byte-identical to an uninterrupted run
    assert not leftovers(run.root)
    record_figures("kill/summarize", seed=seed, target=kill.target, phase=kill.phase,
                   parts_done_at_kill=kill.done_at_kill, groups_kept=len(groups_before),
                   records_checked=len(rows), lost=0)  # fmt: skip


# ----------------------------------------------------------------------------- render

RENDER_ITEMS = 12
RENDER_SHARD = 2


@pytest.fixture(scope="module")
def render_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("render")
    model = build_tiny_pipeline(root / "tiny-sd")
    base = RunDir.at(root / "base")
    rows = [Selection(f"g{i:02d}", "ok", [f"c{i}"], f"a photo of thing number {i} on a table")
            for i in range(RENDER_ITEMS)]  # fmt: skip
    write_parquet(to_table(rows, Selection), base.selections)
    ref = copy_run(base, root / "reference")
    cfg = RenderConfig(model=str(model), steps=2, size=32, shard_size=RENDER_SHARD, batch_size=1, devices="cpu")
    render.run(cfg, ref)
    return {"base": base, "cfg": cfg, "reference": snapshot(ref.images, "shard-*.tar")}


@pytest.mark.parametrize("seed", seeds(2))
def test_render_killed_at_a_random_point_resumes_to_identical_shards(
    render_base: dict[str, Any], tmp_path: Path, seed: int
) -> None:
    run = copy_run(render_base["base"], tmp_path / "run")
    cfg: RenderConfig = render_base["cfg"]
    shards = RENDER_ITEMS // RENDER_SHARD
    args = ["render", "--run", str(run.root), "--model", cfg.model, "--steps", str(cfg.steps), "--size",
            str(cfg.size), "--shard-size", str(cfg.shard_size), "--batch-size", str(cfg.batch_size),
            "--devices", "cpu"]  # fmt: skip
    kill = kill_at_random_point(
        args,
        seed=seed,
        progress=lambda: finished(run.images, "shard-*.tar"),
        total=shards,
        in_flight=temp_file_with_data(run.images, ".shard-*.tmp"),  # the next shard holds an image
    )
    assert kill.alive and 2 <= kill.done_at_kill < shards, kill
    done_before = {n: h for n, h in snapshot(run.images, "shard-*.tar").items() if is_done(run.images / n)}

    result = render.run(cfg, run)

    assert result.counts["skipped_shards"] == len(done_before) and result.counts["images"] == RENDER_ITEMS
    after = snapshot(run.images, "shard-*.tar")
    assert {n: after[n] for n in done_before} == done_before  # finished shards untouched
    assert after == render_base["reference"]  # every shard byte-identical to an uninterrupted run's
    ids = [s.item_id for shard in sorted(run.images.glob("shard-*.tar")) for s in iter_shard_samples(shard)]
    assert sorted(ids) == [f"g{i:02d}" for i in range(RENDER_ITEMS)]  # each item exactly once
    assert not leftovers(run.root)
    record_figures("kill/render", seed=seed, target=kill.target, phase=kill.phase,
                   shards_done_at_kill=kill.done_at_kill, records_checked=len(ids), lost=0)  # fmt: skip


# ----------------------------------------------------------------------------- train

TRAIN_STEPS = 12
SAVE_EVERY = 2


def train_cfg() -> TrainConfig:
    return TrainConfig(preset="tiny", max_steps=TRAIN_STEPS, batch_size=4, save_every=SAVE_EVERY, eval_every=1000,
                       val_fraction=0, num_workers=0, device="cpu", log_every=1)  # fmt: skip


def checkpoint_step(run: RunDir) -> int:
    folder = ckpt.complete_checkpoint(run.train / "last")
    state = ckpt.read_state(folder) if folder is not None else None
    return int(state["step"]) if state else 0


def last_logged_step(run: RunDir) -> int:
    """The last step in metrics.jsonl (a line being written is not counted)."""
    try:
        lines = (run.train / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except (ValueError, AttributeError):
            continue
    return max(steps)


def losses(run: RunDir) -> dict[int, float]:
    lines = (run.train / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {sorted(steps)}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def train_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train")
    items = coco_items(QUICKSTART_REFERENCES, QUICKSTART_IMAGES, 8)
    base = make_summary_run(root / "base", items, shard_size=4)
    pairs.run(PairsConfig(), base)
    ref = copy_run(base, root / "reference")
    train.run(train_cfg(), ref)
    return {"base": base, "weights": weights(ref.train / "last"), "losses": losses(ref)}


@pytest.mark.parametrize("seed", seeds(2))
def test_train_killed_at_a_random_point_resumes_from_its_last_checkpoint(
    train_base: dict[str, Any], tmp_path: Path, seed: int
) -> None:
    run = copy_run(train_base["base"], tmp_path / "run")
    cfg = train_cfg()
    args = ["train", "--run", str(run.root), "--preset", "tiny", "--max-steps", str(TRAIN_STEPS),
            "--batch-size", "4", "--save-every", str(SAVE_EVERY), "--eval-every", "1000",
            "--val-fraction", "0", "--num-workers", "0", "--device", "cpu", "--log-every", "1"]  # fmt: skip
    checkpoints = TRAIN_STEPS // SAVE_EVERY
    kill = kill_at_random_point(
        args,
        seed=seed,
        progress=lambda: checkpoint_step(run) // SAVE_EVERY,
        total=checkpoints,
        in_flight=lambda: last_logged_step(run) > checkpoint_step(run),  # a step past the checkpoint
    )
    assert kill.alive and 2 <= kill.done_at_kill < checkpoints, kill
    step_at_kill = checkpoint_step(run)

    result = train.run(cfg, run)

    assert f"at step {step_at_kill}" in " ".join(result.notes), result.notes  # resumed, not restarted
    assert result.counts["steps"] == TRAIN_STEPS
    got = losses(run)
    assert sorted(got) == list(range(1, TRAIN_STEPS + 1))  # every step logged exactly once
    assert got == pytest.approx(train_base["losses"], rel=1e-6)  # the same steps as an uninterrupted run
    final = weights(run.train / "last")
    assert final.keys() == train_base["weights"].keys()
    assert all(torch.equal(final[k], train_base["weights"][k]) for k in final)
    assert not leftovers(run.root) and not list(run.train.glob(".*.partial")) and not list(run.train.glob(".*.old"))
    record_figures("kill/train", seed=seed, target=kill.target, phase=kill.phase, resumed_at_step=step_at_kill,
                   records_checked=len(got), lost=0)  # fmt: skip
