"""The training GPU benchmark runs on CPU with tiny shapes, as CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_benchmark_tiny_on_cpu(tmp_path: Path, coco_images: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ICSD_SHARED_DATA", None)  # the benchmark reads the photos under tests/data, as CI does
    out_json = tmp_path / "result.json"
    args = [sys.executable, str(REPO / "benchmarks" / "train_gpu.py"), "--tiny", "--steps", "4", "--warmup", "2",
            "--images", "16", "--json", str(out_json)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "| reference (eager fp32, tensors on device) |" in out and "| icsd trainer (" in out
    assert "ratio icsd/reference:" in out and "GFLOP/sample" in out
    result = json.loads(out_json.read_text())
    assert result["reference_samples_per_s"] > 0 and result["icsd"]["samples_per_s"] > 0
    assert 0 <= result["icsd"]["data_wait_frac"] < 1
