"""The HTML report: self-contained, every user string escaped, renders in a real browser."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icsd.config import ReportConfig
from icsd.records import Candidate, Caption, SampleMeta, Selection, to_table
from icsd.stages import report
from icsd.store import RunDir, atomic_write_json, mark_done, write_parquet

EVIL = "<script>document.title='pwned'</script><b>bold</b> & \"quotes\""


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_run(tmp_path: Path) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    caps = [Caption("1", "a dog runs on the beach", "t"), Caption("2", EVIL, "t"), Caption("3", "a cat sleeps", "t")]
    write_parquet(to_table(caps, Caption), run.captions)
    cands = [Candidate("1", ["1", "2", "3"], [1.0, 0.5, 0.2]), Candidate("3", ["3", "1", "2"], [1.0, 0.3, 0.1])]
    write_parquet(to_table(cands, Candidate), run.candidates)
    sels = [
        Selection("1", "ok", ["1", "2"], "A dog <i>runs</i> along the shore.", None, "m", "h", "{}"),
        Selection("3", "invalid", [], None, "index out of range: 9 not in 1..3", "m", "h", "{...}"),
    ]
    write_parquet(to_table(sels, Selection), run.selections)
    shard = run.images / "shard-00000.tar"
    shard.parent.mkdir(parents=True)
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "1.jpg", buf.getvalue())
        meta = SampleMeta(id="1", summary="A dog", seed=1234, model="tiny", steps=1, guidance=7.5, width=64, height=64, nsfw=False)
        add_member(tar, "1.json", meta.to_json())
    mark_done(shard, {"count": 1})
    run.update_manifest("render", {"config": {"tiny_random": True}, "counts": {"images": 1}, "complete": True})
    run.update_manifest("summarize", {"config": {"model": EVIL}, "counts": {"ok": 1, "invalid": 1}, "complete": True})
    run.train.mkdir()
    lines = [{"step": s, "loss": 5.0 / s} for s in range(1, 20)] + [{"step": 10, "val_CIDEr": 0.3}]
    (run.train / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    atomic_write_json(run.eval_dir("quickstart") / "scores.json", {"scores": {"Bleu_4": 0.1, "CIDEr": 0.25}})
    return run


def test_report_contents_escaped_and_self_contained(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    res = report.run(ReportConfig(), run)
    html = run.report.read_text()
    assert res.output == run.report
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>bold</b>" not in html and "<i>runs</i>" not in html
    assert "untrained model" in html
    assert "index out of range" in html and "seed 1234" in html
    assert html.count("data:image/png;base64,") == 2  # loss and CIDEr plots
    assert "data:image/jpeg;base64," in html
    assert "src='http" not in html and 'src="http' not in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    report.run(ReportConfig(), run)
    flags = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", run.report.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert "Pipeline at a glance" in dom and "a dog runs on the beach" in dom
    assert "pwned" not in dom.split("<title>")[1].split("</title>")[0]
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,1600", run.report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "screenshot is blank"
