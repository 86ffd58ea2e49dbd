"""The render GPU benchmark runs on CPU with tiny shapes, as CI runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_render_benchmark_tiny_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = str(REPO / "src")
    out_json = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "render_gpu.py"), "--tiny", "--images", "8", "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "| reference loop (paper script) |" in out and "| icsd render [selected] |" in out
    assert "ratio icsd/reference:" in out and "images equal within tolerance: yes" in out
    assert "8/8 identical" in out  # fp32 on CPU, same seeds: the very same pixels
    assert out_json.is_file()
