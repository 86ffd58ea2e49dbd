"""The HTML report: self-contained, every user string escaped, renders in a real browser."""

from __future__ import annotations

import html as html_lib
import io
import json
import re
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
    atomic_write_json(run.eval_dir("quickstart") / "scores.json", {"scores": {"Bleu_4": 0.1, "CIDEr": 0.25, "n_images": 2}})
    # the test images, their references and the model's captions
    images = tmp_path / "test"
    images.mkdir()
    for i in (1, 2):
        img.save(images / f"{i}.png")
    refs = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in (1, 2)],
        "annotations": [{"id": 10 * i + j, "image_id": i, "caption": f"reference {j} of {i}"} for i in (1, 2) for j in (1, 2)],
    }
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    atomic_write_json(run.eval_dir("quickstart") / "predictions.json", [{"image_id": i, "caption": f"model says {i}"} for i in (1, 2)])
    evaluate = {"annotations": str(tmp_path / "refs.json"), "images": str(images), "benchmark": "quickstart"}
    run.update_manifest("evaluate", {"config": evaluate, "counts": {"images": 2}, "complete": True})
    run.update_manifest("embed", {"config": {}, "counts": {"captions": 3}, "complete": True,
                                  "models": {"embedder": {"name": "MiniLM", "dim": 384, "path": None}}})  # fmt: skip
    run.update_manifest("train", {"config": {}, "counts": {"steps": 19, "best_score": 0.4, "best_step": 10}, "complete": True,
                                  "models": {"vision": "tiny-vit", "text": "tiny-bert", "preset": None}})  # fmt: skip
    return run


FIGURES = {
    "finding": "A sentence <i>about</i> the comparison.",
    "doc": "https://example.org/docs/sandbox.md#results",
    "methods": {
        "icsd": {"label": "ICSD", "CIDEr_mean": 0.3, "ci95": [0.2, 0.4], "seeds": 3},
        "uni_context": {"CIDEr_mean": 0.5, "CIDEr_sd": 0.05, "note": "3 seeds"},
        "fixed caption (bound)": {"CIDEr_mean": 0.1},
    },
}


@pytest.fixture
def sandbox_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's benchmark counts as a sandbox world's, with these documented figures."""
    from icsd.sandbox import report as sandbox_report

    monkeypatch.setattr(sandbox_report, "is_world", lambda folder: True)
    monkeypatch.setattr(sandbox_report, "reference_scores", lambda: FIGURES)


def test_report_contents_escaped_and_self_contained(tmp_path: Path, sandbox_figures: None) -> None:
    run = make_run(tmp_path)
    res = report.run(ReportConfig(), run)
    html = run.report.read_text()
    assert res.output == run.report
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>bold</b>" not in html and "<i>runs</i>" not in html and "<i>about</i>" not in html
    assert "untrained model" in html
    assert "why: index out of range" in html and "seed 1,234" in html
    assert html.count("data:image/png;base64,") == 3  # the curves, two test images
    assert "data:image/jpeg;base64," in html
    assert "src='http" not in html and 'src="http' not in html


def test_report_leads_with_results_and_keeps_provenance_last(tmp_path: Path, sandbox_figures: None) -> None:
    run = make_run(tmp_path)
    html = report.render_html(run, ReportConfig())
    order = [html.index(f"id='{part}'") for part in ("results", "scores", "comparison", "training", "examples", "data", "provenance")]
    assert order == sorted(order)
    results = html[: html.index("id='training'")]
    assert "0.250" in results and "BLEU-4" in results and "0.100" in results
    assert "0.200 – 0.400" in results and "0.376 – 0.624" in results  # given, and from sd over 3 seeds
    assert "A sentence &lt;i&gt;about&lt;/i&gt; the comparison." in results and "https://example.org/docs/sandbox.md" in results
    assert "validation CIDEr + BLEU-4" in html and "step 10" in html
    assert "model says 1" in html and "reference 2 of 2" in html
    # readable: no None, no JSON, every column headed, no image without a source
    assert "None" not in html.replace("NoneType", "") and '{"' not in html and "<th></th>" not in html
    assert re.search(r"<img(?![^>]*\bsrc=)[^>]*>", html) is None
    assert "no image: the answer was not ok" in html
    assert "<td>embed</td><td>embedder</td><td>MiniLM</td><td>dim 384</td>" in html
    assert "<td>train</td><td>vision</td><td>tiny-vit</td>" in html


def test_report_groups_beyond_a_few_are_behind_show_more(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    sels = [Selection(str(i), "ok", ["1"], f"summary {i}", None, "m", "h", "{}") for i in range(10)]
    sels.append(Selection("x", "invalid", [], None, "3 captions chosen, 5..10 required", "m", "h", "{}"))
    sels.append(Selection("y", "invalid", [], None, "4 captions chosen, 5..10 required", "m", "h", "{}"))
    write_parquet(to_table(sels, Selection), run.selections)
    html = report.render_html(run, ReportConfig(sample_groups=8))
    shown, _, hidden = html.partition("<details><summary>show ")
    assert shown.count("class='group'") == report.GROUPS_SHOWN and hidden.startswith("4 more sets")
    assert "too few captions chosen (3–4) where the prompt asks for 5–10" in html
    assert "#" not in html.split("id='data'")[1].split("id='provenance'")[0].replace("&#x27;", "")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Loaded before the report's own markup: records script errors, console errors and resources that
# fail to load, then, once the page has loaded, where the results card is and which images failed.
PROBE = """<script>
window.__errors = [];
addEventListener('error', e => __errors.push(e.message || ('failed to load ' + (e.target.src || e.target.tagName))), true);
const __error = console.error; console.error = (...a) => { __errors.push(a.join(' ')); __error(...a); };
addEventListener('load', () => {
  const box = id => { const r = document.getElementById(id).getBoundingClientRect(); return [r.top, r.bottom]; };
  const broken = [...document.images].filter(i => !i.getAttribute('src') || !i.complete || i.naturalWidth === 0).length;
  const probe = document.createElement('pre'); probe.id = 'probe';
  probe.textContent = JSON.stringify({errors: __errors, broken, images: document.images.length,
    results: box('results'), scores: box('scores'), width: document.documentElement.scrollWidth});
  document.body.appendChild(probe);
});
</script>"""


@pytest.mark.skipif(chromium() is None, reason="chromium not installed")
def test_report_in_headless_chromium(tmp_path: Path, sandbox_figures: None) -> None:
    run = make_run(tmp_path)
    report.run(ReportConfig(), run)
    html = run.report.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    flags = [
        str(chromium()),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    seen = {}
    for width, height in ((1280, 800), (760, 1000)):  # a laptop, a narrow window
        dom = subprocess.run(
            [*flags, f"--window-size={width},{height}", "--virtual-time-budget=3000", "--dump-dom", probed.as_uri()],
            capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        found = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom)
        assert found, dom[-2000:]
        seen[width] = probe = json.loads(html_lib.unescape(found.group(1)))
        assert probe["errors"] == [] and probe["broken"] == 0 and probe["images"] >= 4, probe
        assert probe["width"] <= width, probe  # nothing wider than the window
        shot = tmp_path / f"report-{width}.png"
        subprocess.run([*flags, f"--window-size={width},{height}", f"--screenshot={shot}", run.report.as_uri()],
                       capture_output=True, timeout=60)  # fmt: skip
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        assert pixels.std() > 10, "screenshot is blank"
    # the results card starts the page and its scores are above the fold at 1280x800
    assert seen[1280]["results"][0] < 60 and seen[1280]["scores"][1] < 800
    assert "pwned" not in dom.split("<title>")[1].split("</title>")[0]
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
