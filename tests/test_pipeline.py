"""`icsd run`: the whole chain through the stage functions, skipping unchanged stages, rerunning
changed ones and what depends on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from icsd import pipeline
from icsd.testing.chat_server import ChatServer, echo_responder

SMOKE = "pkg:configs/smoke.yaml"  # the real-model smoke chain (COCO captions, SmolLM2, tiny random diffusion)

pytestmark = pytest.mark.slow  # long: kept in the default run (deselect with -m 'not slow')


@pytest.fixture(scope="module")
def server() -> Iterator[ChatServer]:
    srv = ChatServer(echo_responder()).start()
    yield srv
    srv.stop()


def small_overrides(server: ChatServer) -> dict[str, Any]:
    """The real-model smoke chain, shrunk: a scripted LLM server instead of SmolLM2, tiny shapes, few steps."""
    return {
        "ingest.limit": 200,
        "embed.part_size": 100,
        "summarize.backend": "openai",
        "summarize.base_url": server.url,
        "summarize.model": "echo",
        "summarize.sample": 6,
        "summarize.timeout": 20,
        "render.size": 32,
        "render.steps": 2,
        "render.shard_size": 4,
        "train.max_steps": 4,
        "train.eval_every": 2,
        "train.save_every": 2,
        "train.batch_size": 4,
        "evaluate.batch_size": 8,
        "report.sample_groups": 4,
    }


def test_whole_chain_then_skip_then_partial_rerun(tmp_path: Path, server: ChatServer) -> None:
    cfg = pipeline.load_config(SMOKE, small_overrides(server))
    run_dir = tmp_path / "qs"
    lines: list[str] = []
    first = pipeline.run(cfg, run_dir, echo=lines.append)
    assert first.ran == [s for s in pipeline.order() if s != "score"], lines
    root = first.run.root
    for rel in ("captions.parquet", "candidates.parquet", "selections.parquet", "pairs.parquet", "report.html"):
        assert (root / rel).is_file(), rel
    assert list((root / "images").glob("shard-*.done.json"))
    scores = json.loads((root / "eval" / "coco-captions" / "scores.json").read_text())
    assert "CIDEr" in json.dumps(scores)
    html = (root / "report.html").read_text()
    assert "untrained model" in html and "How the training data was made" in html
    assert "carry no meaning" in html.split("id='training'")[0]  # the chain's notice, in the results card
    assert "summarize: started" in lines and lines.index("summarize: started") < lines.index("render: started")
    assert any(line.startswith("note: summarize sends a sample: 6 of ") for line in lines), lines

    again = pipeline.run(cfg, run_dir, echo=lines.append)
    assert again.ran == ["report"] and again.skipped == [s for s in first.ran if s != "report"]

    longer = pipeline.load_config(SMOKE, {**small_overrides(server), "train.max_steps": 6})
    third = pipeline.run(longer, run_dir, echo=lines.append)
    assert third.ran == ["train", "evaluate", "report"]

    forced = pipeline.run(longer, run_dir, force=["render"], echo=lines.append)
    # same per-image seeds -> byte-identical shards -> pairs and training are still current
    assert forced.ran == ["render", "report"]


def test_run_command_prints_where_outputs_went(tmp_path: Path, server: ChatServer) -> None:
    args = [f"--{k}={v}" for k, v in small_overrides(server).items() if not k.startswith(("train", "evaluate"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "icsd.cli", "run", SMOKE, "--run", str(tmp_path / "r"), "--to", "render", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "render: images 6" in r.stdout and "run: 5 stage(s) ran" in r.stdout
    # the smoke chain says what it checks and that its scores mean nothing, first and last
    out = r.stdout.strip().splitlines()
    assert out[0].startswith("smoke: a check that the real model classes load and run")
    assert out[-1].startswith("note: a check that") and "carry no meaning" in out[-1]
    assert "\r" not in r.stderr  # no progress-bar frames in a log
    bad = subprocess.run(
        [sys.executable, "-m", "icsd.cli", "run", "--render.nope", "1"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "unknown key render.nope (from the command line)" in bad.stderr
