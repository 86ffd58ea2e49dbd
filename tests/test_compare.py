"""`icsd compare`: settings that differ, counts, scores; runs without scores still listed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from icsd.compare import compare_rows, to_csv, to_json, to_markdown
from icsd.errors import UserError
from icsd.store import RunDir, atomic_write_json


def fake_run(root: Path, name: str, k: int, mode: str, ok: int, scores: dict | None) -> Path:
    rd = RunDir.at(root / name)
    rd.update_manifest("group", {"config": {"k": k, "index": "flat"}, "counts": {"groups": 100}, "complete": True})
    rd.update_manifest(
        "summarize", {"config": {"mode": mode, "backend": "openai"}, "counts": {"ok": ok}, "complete": True}
    )
    rd.update_manifest("render", {"config": {"steps": 20}, "counts": {"images": ok}, "complete": True})
    rd.update_manifest("pairs", {"config": {"kinds": ["selected"]}, "counts": {"pairs": ok * 6}, "complete": True})
    if scores is not None:
        atomic_write_json(rd.eval_dir("coco-karpathy-test") / "scores.json", {"scores": scores})
    return rd.root


def test_compare_lists_only_differing_settings_and_all_runs(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "multi", 30, "select", 90, {"Bleu_4": 0.21, "CIDEr": 0.70})
    b = fake_run(tmp_path, "k10", 10, "select", 80, {"Bleu_4": 0.19, "CIDEr": 0.64})
    c = fake_run(tmp_path, "firstn", 30, "first-n", 95, None)
    columns, rows = compare_rows([a, b, c])
    assert columns[:3] == ["run", "group.k", "summarize.mode"]
    assert "group.index" not in columns and "render.steps" not in columns
    assert [r["run"] for r in rows] == ["multi", "k10", "firstn"]
    assert rows[2]["coco-karpathy-test/CIDEr"] is None and rows[2]["pairs"] == 570
    assert rows[0]["ok_summaries"] == 90 and rows[1]["group.k"] == 10
    md = to_markdown(columns, rows)
    assert "| firstn | 30 | first-n | 100 | 95 | 95 | 570 |  |  |" in md
    assert md.splitlines()[-1] == "Scores: pycocoevalcap's 0-1 scale (papers print them x100)."
    parsed = list(csv.DictReader(io.StringIO(to_csv(columns, rows))))
    assert parsed[1]["coco-karpathy-test/CIDEr"] == "0.6400"
    assert json.loads(to_json(columns, rows))["rows"][0]["coco-karpathy-test/Bleu_4"] == 0.21


def test_a_stage_one_run_lacks_is_one_column_not_all_its_settings(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "multi", 30, "select", 90, {"CIDEr": 0.70})
    b = RunDir.at(tmp_path / "uni")  # the uni-context baseline: no group, no summarize
    b.update_manifest("render", {"config": {"steps": 20}, "counts": {"images": 50}, "complete": True})
    b.update_manifest("pairs", {"config": {"kinds": ["uni"]}, "counts": {"pairs": 50}, "complete": True})
    columns, rows = compare_rows([a, b.root])
    assert columns[:3] == ["run", "stages not run", "pairs.kinds"]
    assert not any(c.startswith(("group.", "summarize.", "render.")) for c in columns)
    assert [r["stages not run"] for r in rows] == ["-", "group, summarize"]


def test_metric_filters_and_sorts(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "a", 30, "select", 1, {"Bleu_4": 0.2, "CIDEr": 0.5})
    b = fake_run(tmp_path, "b", 20, "select", 1, {"Bleu_4": 0.1, "CIDEr": 0.9})
    columns, rows = compare_rows([a, b], metric="CIDEr")
    assert "coco-karpathy-test/Bleu_4" not in columns
    assert [r["run"] for r in rows] == ["b", "a"]


def test_nocaps_domains(tmp_path: Path) -> None:
    rd = RunDir.at(tmp_path / "n")
    rd.update_manifest("group", {"config": {"k": 30}, "counts": {"groups": 1}, "complete": True})
    atomic_write_json(
        rd.eval_dir("nocaps-val") / "scores.json",
        {"scores": {"CIDEr": 0.5}, "domains": {"in": {"CIDEr": 0.6}, "out": {"CIDEr": 0.3}}},
    )
    columns, rows = compare_rows([rd.root])
    assert rows[0]["nocaps-val/in/CIDEr"] == 0.6 and rows[0]["nocaps-val/out/CIDEr"] == 0.3


def test_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest"):
        compare_rows([tmp_path / "empty"])
    with pytest.raises(UserError, match="not a run directory"):
        compare_rows([tmp_path / "missing"])
