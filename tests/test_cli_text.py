"""The text stages end to end through the real `icsd` command, and its error contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ICSD = [sys.executable, "-m", "icsd.cli"]


def icsd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([*ICSD, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_ingest_embed_group_on_real_coco_slice(tmp_path: Path, coco_slice: Path, tiny_sentence_model: Path) -> None:
    run = tmp_path / "run"
    r = icsd("ingest", str(coco_slice), "--run", str(run))
    assert r.returncode == 0, r.stderr
    assert "ingest: read 300, kept 300" in r.stdout
    r = icsd("embed", "--run", str(run), "--model", str(tiny_sentence_model), "--part-size", "128")
    assert r.returncode == 0, r.stderr
    assert "parts 3" in r.stdout
    r = icsd("group", "--run", str(run), "--k", "30")
    assert r.returncode == 0, r.stderr
    cands = pq.read_table(run / "candidates.parquet").to_pylist()
    assert cands and all(len(c["member_ids"]) == 30 and c["member_ids"][0] == c["group_id"] for c in cands)
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"ingest", "embed", "group"}
    config = (run / "config.yaml").read_text()
    assert "k: 30" in config and "part_size: 128" in config


def test_user_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    r = icsd("ingest", str(tmp_path / "missing.json"), "--run", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: corpus not found")
    r = icsd("group", "--run", str(tmp_path / "run"), "--k", "0")
    assert r.returncode == 2 and "k: Input should be greater than or equal to 1" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("group:\n  k: 30\n  bogus: 1\n")
    r = icsd("group", "--run", str(tmp_path / "run"), "--config", str(bad))
    assert r.returncode == 2 and "unknown key group.bogus (from " in r.stderr and "bad.yaml)" in r.stderr


def test_help_has_examples() -> None:
    r = icsd("ingest", "--help")
    assert r.returncode == 0 and "Examples" in r.stdout and "--format" in r.stdout


def test_the_command_line_starts_without_torch() -> None:
    """Declaring every stage (options, help, examples) imports no torch: ``icsd --help``, ``config
    show`` and a mistyped flag answer in about a second; the training loop is imported when it runs."""
    code = "import sys, icsd.cli, icsd.stages as s; [s.stage_spec(n) for n in s.stage_names()]; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
