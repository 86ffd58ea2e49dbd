"""The report: one self-contained HTML page of a run (images and plots embedded, no server needed).

Every string that comes from the corpus, a model or a config is HTML-escaped: captions are user data.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..config import ReportConfig
from ..errors import UserError
from ..llm.answers import error_reason
from ..metrics import SCALE_LABEL, SCORE_KEYS, format_score
from ..records import ImageSample
from ..sandbox import report as sandbox_report
from ..store import RunDir, atomic_write_text, done_shards, iter_shard_samples
from . import stage_names
from ._base import StageResult, StageSpec, Timer, finish_stage

UNTRAINED_NOTE = (
    "Images come from an untrained model; pass `--render.model <id or path>` for real images."
)

# Control characters (NUL, ESC, BEL, DEL, ...) in captions or model output are shown as their
# visible symbols (␀, ␛, ␇, ␡), never written raw into the page.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n\r"} | {0x7F: 0x2421}


def escape(text: str) -> str:
    """Text for the page: HTML-escaped (quotes included), control characters made visible."""
    return html.escape(text).translate(_CONTROL_PICTURES)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2330;padding:0 1rem;line-height:1.4}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #dde;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
td,th{border:1px solid #d8dbe4;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f1f3f8}.note{background:#fff6d6;border:1px solid #eed27a;padding:.6rem 1rem;border-radius:6px}
.group{display:flex;gap:1rem;border:1px solid #e1e4ec;border-radius:8px;padding:.8rem;margin:.8rem 0}
.group img{width:192px;height:192px;object-fit:cover;border-radius:6px;background:#eee}
.sel{font-weight:600;color:#0b6b2e}.unsel{color:#7a8090}.summary{font-style:italic;margin:.4rem 0}
.meta{font-size:.8rem;color:#667}ol{margin:.2rem 0;padding-left:1.4rem}
.status-ok{color:#0b6b2e}.status-bad{color:#a3261d}details{margin:.4rem 0}
pre{white-space:pre-wrap;background:#f6f7fa;padding:.5rem;border-radius:4px;font-size:.8rem}
"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return "" if v is None else str(v)


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist() if path.exists() else []
    except Exception:  # noqa: BLE001 - a damaged optional file must not stop the report
        return []


def overview(manifest: dict[str, Any]) -> str:
    recorded = manifest.get("stages", {})
    order = {name: i for i, name in enumerate(stage_names())}
    stages = dict(sorted(recorded.items(), key=lambda kv: order.get(kv[0], len(order))))
    rows = []
    for name, entry in stages.items():
        counts = ", ".join(f"{k}: {_fmt(v)}" for k, v in (entry.get("counts") or {}).items())
        models = entry.get("models") or {}
        rows.append([name, counts, entry.get("seconds"), json.dumps(models, default=str) if models else ""])
    settings = "".join(
        f"<details><summary>{escape(name)} settings</summary><pre>"
        f"{escape(json.dumps(entry.get('config', {}), indent=1, default=str))}</pre></details>"
        for name, entry in stages.items()
    )
    return "<h2>Pipeline at a glance</h2>" + _table(["stage", "counts", "seconds", "models"], rows) + settings


def read_samples(images_dir: Path, wanted: set[str], limit: int) -> dict[str, ImageSample]:
    """Up to ``limit`` samples from done shards, the ids in ``wanted`` first."""
    found: dict[str, ImageSample] = {}
    for shard in done_shards(images_dir)[0]:
        for sample in iter_shard_samples(shard):
            if sample.item_id in wanted or len(found) < limit:
                found[sample.item_id] = sample
        if wanted and wanted.issubset(found):
            break
    return found


def groups_section(run: RunDir, limit: int) -> str:
    selections = _read(run.selections)
    if not selections or limit == 0:
        return ""
    captions = {r["caption_id"]: r["text"] for r in _read(run.captions)}
    candidates = {r["group_id"]: r["member_ids"] for r in _read(run.candidates)}
    chosen = [s for s in selections if s["status"] == "ok"][:limit]
    chosen += [s for s in selections if s["status"] != "ok"][: max(0, limit - len(chosen)) or 3]
    samples = read_samples(run.images, {s["group_id"] for s in chosen}, limit)
    blocks = []
    for sel in chosen:
        gid = sel["group_id"]
        selected = set(sel.get("selected_ids") or [])
        items = "".join(
            f"<li class='{'sel' if cid in selected else 'unsel'}'>{'✔ ' if cid in selected else ''}"
            f"{escape(captions.get(cid, cid))}</li>"
            for cid in candidates.get(gid, [])
        )
        sample = samples.get(gid)
        if sample and sample.image:
            mime = "jpeg" if sample.image_ext in ("jpg", "jpeg") else sample.image_ext
            data = base64.b64encode(sample.image).decode("ascii")
            img = f"<img alt='rendered image' src='data:image/{mime};base64,{data}'>"
            meta = sample.meta
            info = f"seed {escape(str(meta.seed))} · NSFW {escape(str(meta.nsfw))} · {escape(meta.model)}"
        else:
            img, info = "<img alt='no image'>", "no image rendered"
        status_cls = "status-ok" if sel["status"] == "ok" else "status-bad"
        summary = escape(sel.get("summary") or "")
        error = f"<div class='meta'>{escape(sel.get('error') or '')}</div>" if sel.get("error") else ""
        blocks.append(
            f"<div class='group'>{img}<div><div class='meta'>group {escape(gid)} · "
            f"<span class='{status_cls}'>{escape(sel['status'])}</span> · {info}</div>"
            f"<div class='summary'>{summary}</div>{error}<ol>{items}</ol></div></div>"
        )
    return "<h2>Sample of groups</h2>" + "".join(blocks)


def failures_section(run: RunDir) -> str:
    selections = _read(run.selections)
    if not selections:
        return ""
    by_status = Counter(s["status"] for s in selections)
    # Each status with its reasons, counted per rule (the details after the colon, numbers and
    # lists masked, vary per group): "summary copies the prompt's placeholder", "index outside #..#".
    reasons = Counter((s["status"], error_reason(s.get("error"))) for s in selections if s["status"] != "ok")
    rows = [[status, n, f"{100 * n / len(selections):.1f}%"] for status, n in by_status.most_common()]
    why = [[status, reason or "(none given)", n] for (status, reason), n in reasons.most_common(20)]
    return (
        "<h2>LLM answers</h2>"
        + _table(["status", "groups", "share"], rows)
        + ("<h3>Why answers were not ok</h3>" + _table(["status", "reason", "groups"], why) if why else "")
    )


def _plot(xs: list[float], ys: list[float], title: str, ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{escape(title)}' src='data:image/png;base64,{data}'>"


def training_section(run: RunDir) -> str:
    path = run.train / "metrics.jsonl"
    if not path.exists():
        return ""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    plots = []
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    if loss:
        plots.append(_plot([s for s, _ in loss], [v for _, v in loss], "training loss", "loss"))
    cider_key = next((k for k in ("val_CIDEr", "CIDEr", "val_cider") if any(k in r for r in rows)), None)
    if cider_key:
        val = [(r["step"], r[cider_key]) for r in rows if cider_key in r and "step" in r]
        plots.append(_plot([s for s, _ in val], [v for _, v in val], "validation CIDEr", f"CIDEr ({SCALE_LABEL})"))
    return "<h2>Training</h2>" + "".join(plots) if plots else ""


def evaluation_section(run: RunDir) -> str:
    eval_root = run.root / "eval"
    files = sorted(eval_root.glob("*/scores.json")) if eval_root.exists() else []
    if not files:
        return ""
    out = ["<h2>Evaluation</h2>", f"<p class='meta'>Scores on pycocoevalcap's {SCALE_LABEL} (papers print them x100).</p>"]
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        scores = data.get("scores", data)
        metrics = {k: scores[k] for k in SCORE_KEYS if isinstance(scores.get(k), int | float)}
        out.append(f"<h3>{escape(f.parent.name)}</h3>")
        images = scores.get("n_images")
        out.append(_table(["images", *metrics], [[images, *(format_score(v) for v in metrics.values())]]))
        unreadable = (data.get("selection") or {}).get("unreadable_images")
        if unreadable:
            out.append(f"<p class='note'>{escape(str(unreadable))} image(s) could not be read and were not scored.</p>")
        domains = data.get("domains") or scores.get("domains")
        if isinstance(domains, dict):
            names = [k for k in SCORE_KEYS if any(isinstance(d, dict) and k in d for d in domains.values())]
            out.append(
                _table(
                    ["domain", "images", *names],
                    [
                        [d, v.get("n_images"), *(format_score(v[m]) if m in v else "" for m in names)]
                        for d, v in domains.items()
                        if isinstance(v, dict)
                    ],
                )
            )
    return "".join(out)


def untrained_images(run: RunDir) -> bool:
    entry = run.stage_entry("render") or {}
    cfg = entry.get("config") or {}
    return bool(cfg.get("tiny_random"))


def render_html(run: RunDir, cfg: ReportConfig) -> str:
    manifest = run.read_manifest()
    note = f"<p class='note'>{escape(UNTRAINED_NOTE)}</p>" if untrained_images(run) else ""
    body = "".join(
        [
            f"<h1>icsd run: {escape(run.root.name)}</h1>",
            f"<p class='meta'>{escape(str(run.root))}</p>",
            note,
            overview(manifest),
            failures_section(run),
            groups_section(run, cfg.sample_groups),
            training_section(run),
            evaluation_section(run),
            sandbox_report.sandbox_section(run.root),
            sandbox_report.test_examples_section(run.root),
        ]
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>icsd report: {escape(run.root.name)}</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def run(cfg: ReportConfig, run: RunDir) -> StageResult:
    timer = Timer()
    if not run.manifest_json.exists():
        raise UserError(f"no run at {run.root}: nothing has been run there yet (check the --run path)")
    html = render_html(run, cfg)
    atomic_write_text(run.report, html)
    return finish_stage(
        run,
        "report",
        cfg,
        counts={"bytes": len(html.encode("utf-8"))},
        seconds=timer.seconds,
        output=run.report,
    )


SPEC = StageSpec(
    name="report",
    config=ReportConfig,
    run=run,
    inputs=lambda cfg, run: [],
    outputs=lambda run: [run.report],
    always_rerun=True,
    summary="Write RUN/report.html: one self-contained page of the run (counts, groups, images, curves, scores).",
    examples=("icsd report --run runs/quickstart && xdg-open runs/quickstart/report.html",),
)
