"""The GPU benchmark scripts and the cost model run here with tiny shapes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
ENV.pop("ICSD_SHARED_DATA", None)  # the train benchmark reads the photos under tests/data, as CI does


@pytest.fixture()
def bench_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def test_cost_doc_is_generated_from_the_inputs(bench_path: None, capsys: pytest.CaptureFixture[str]) -> None:
    import cost_model

    text = cost_model.main([])
    assert (REPO / "docs" / "cost.md").read_text() == text, "regenerate: python -m icsd.cost_model > docs/cost.md"
    assert "| **total, image-grouped training** |" in text
    inputs = json.loads((REPO / "src" / "icsd" / "tables" / "cost_inputs.json").read_text())
    assert all(r["kind"] in {"measured", "derived", "estimate", "target", "assumption"} for r in inputs["rates"].values())


def test_cost_model_takes_the_measured_gpu_figures(bench_path: None, tmp_path: Path) -> None:
    import cost_model

    results = {
        "shapes": "paper",
        "steps": {
            "group": {"rc": 0, "result": {"device": "H200", "runs": {"fp32": {"seconds": 12.0, "recall": 1.0}}}},
            "render": {"rc": 0, "result": {"device": "H200", "rows": [
                {"path": "reference loop (paper script)", "ips": 7.0}, {"path": "icsd render [best]", "ips": 16.1}]}},
            "train": {"rc": 0, "result": {"device": "H200", "icsd": {"samples_per_s": 1500.0}}},
            "train_grouped": {"rc": 1, "result": None},
        },
    }  # fmt: skip
    (tmp_path / "gpu.json").write_text(json.dumps(results))
    text = cost_model.main(["--gpu-results", str(tmp_path / "gpu.json")])
    assert "`group_icsd_gpu_s`, `render_icsd_ratio`, `train_icsd_pairs_per_s`" in text
    assert "2.30x the reference (measured" in text and "1,500 pairs/s (measured" in text
    assert "x 1.67 (measured: grouped / ungrouped" in text  # the failed grouped step leaves the derivation


def test_group_benchmark_tiny_on_cpu(bench_path: None, tmp_path: Path) -> None:
    import group_gpu

    out = group_gpu.main(["--n", "1500", "--dim", "32", "--device", "cpu", "--block-size", "256",
                          "--recall-queries", "100", "--json", str(tmp_path / "g.json")])  # fmt: skip
    assert set(out["runs"]) == {"fp32", "bf16"}
    assert all(r["recall"] == 1.0 and r["groups"] > 1000 for r in out["runs"].values())


@pytest.mark.slow
def test_grouped_step_benchmark_tiny(tmp_path: Path) -> None:
    args = [sys.executable, str(BENCH / "train_grouped.py"), "--tiny", "--steps", "1", "--json", str(tmp_path / "r.json")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["pairs_per_step"] == 14 and r["grouped"]["pairs_per_s"] > 0 and r["ungrouped"]["pairs_per_s"] > 0
    assert r["analytic_flop_ratio"] > 1 and r["counted_flop_ratio"] > 1
    assert abs(r["grouped"]["counted_flops_per_pair"] / r["grouped"]["analytic_flops_per_pair"] - 1) < 0.15


@pytest.mark.slow
def test_gpu_all_runs_with_tiny_shapes_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_all.json"
    proc = subprocess.run(["bash", str(BENCH / "gpu_all.sh"), str(out), "--tiny"], capture_output=True, text=True,
                          timeout=1500, env=ENV, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {k: v["rc"] for k, v in result["steps"].items()} == {"group": 0, "render": 0, "train": 0, "train_grouped": 0}, proc.stdout[-6000:]
    assert result["steps"]["train_grouped"]["result"]["group_captions"] is True
    assert result["steps"]["train_grouped"]["result"]["pairs_per_step"] == 7
    # render_gpu.py --tiny: both paths timed, the shards' images equal the reference loop's
    render = result["steps"]["render"]["log_tail"]
    assert "| reference loop (paper script) |" in render and "| icsd render [selected] |" in render
    assert "ratio icsd/reference:" in render and "images equal within tolerance: yes" in render
    assert "8/8 identical" in render  # fp32 on CPU, same seeds: the very same pixels
    assert result["steps"]["render"]["result"]["rows"]
    # train_gpu.py --tiny (reads the photos under tests/data): both paths timed, FLOPs counted
    train = result["steps"]["train"]
    assert "| reference (eager fp32, tensors on device) |" in train["log_tail"] and "| icsd trainer (" in train["log_tail"]
    assert "ratio icsd/reference:" in train["log_tail"] and "GFLOP/sample" in train["log_tail"]
    assert train["result"]["reference_samples_per_s"] > 0 and train["result"]["icsd"]["samples_per_s"] > 0
    assert 0 <= train["result"]["icsd"]["data_wait_frac"] < 1


def test_readme_rehearsal_and_the_cost_doc_state_one_recipe() -> None:
    """README's paper-config rehearsal (corpus absent: the recipe's sizes) shows the GPU-hours and
    the pairs of docs/cost.md: one cost model, one set of recipe sizes."""
    from icsd import cost_model

    recipe = cost_model.project({})
    readme = (REPO / "README.md").read_text()
    cost_doc = (REPO / "docs" / "cost.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("GPU cost model:"))
    assert f": {recipe['gpu_hours']:,.1f} GPU-h" in line, "rerun the README's rehearsal and paste its output"
    pairs = f"{recipe['sizes']['pairs']['value']:,}"
    assert f"| {pairs} |" in readme and f"- pairs: {pairs} " in cost_doc
    assert f"**{recipe['gpu_hours']:.1f}**" in cost_doc
