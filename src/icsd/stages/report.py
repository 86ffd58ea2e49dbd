"""The report: one self-contained HTML page of a run (images and plots embedded, no server needed).

Results first: the test scores and (sandbox world) the run's place in the documented comparison,
the training curves, test images with the model's caption beside their references; then how the
training data was made (stages, the LLM's answers, a few candidate sets with more behind "show
more"); settings and provenance last.

Every string that comes from the corpus, a model or a config is HTML-escaped: captions are user data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
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
:root{--ink:#1d2330;--muted:#5d6577;--line:#d8dbe4;--soft:#f4f6fa;--ok:#0b6b2e;--bad:#a3261d;--accent:#2f5fb3}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2rem auto;max-width:1120px;
color:var(--ink);padding:0 1rem;line-height:1.45}
h1{font-size:1.45rem;margin:.2rem 0}h2{font-size:1.15rem;margin:1.6rem 0 .5rem;border-bottom:1px solid var(--line);
padding-bottom:.25rem}h3{font-size:1rem;margin:1rem 0 .4rem}
a{color:var(--accent)}code{background:var(--soft);padding:0 .25rem;border-radius:3px}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem;max-width:100%}
td,th{border:1px solid var(--line);padding:.28rem .55rem;text-align:left;vertical-align:top}
th{background:var(--soft)}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.mine td{background:#e8f0ff}
.card{border:1px solid var(--line);border-radius:10px;padding:.9rem 1.1rem;margin:.8rem 0;background:#fff}
.results{border-color:#b9c7e6;background:#fbfcff}
.lead{margin:.2rem 0 .6rem;color:var(--muted)}
.scores{display:flex;flex-wrap:wrap;gap:.6rem;margin:.6rem 0}
.score{border:1px solid var(--line);border-radius:8px;padding:.35rem .8rem;min-width:7.5rem;background:#fff}
.score b{display:block;font-size:1.5rem;font-variant-numeric:tabular-nums}.score span{font-size:.8rem;color:var(--muted)}
.score.main{border-color:var(--accent)}
.note{background:#fff6d6;border:1px solid #eed27a;padding:.5rem .9rem;border-radius:6px}
.meta{font-size:.82rem;color:var(--muted)}.tag{font-size:.75rem;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:1rem;align-items:start}
.curve img{width:100%;max-width:560px;height:auto}
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:.8rem}
.example{margin:0;border:1px solid var(--line);border-radius:8px;padding:.6rem;break-inside:avoid}
.example img{width:128px;height:128px;image-rendering:pixelated;border-radius:4px;display:block}
.pred{font-weight:600;margin:.4rem 0}.refs{font-size:.85rem;color:var(--muted);margin:.2rem 0;padding-left:1.2rem}
.group{display:flex;gap:1rem;border:1px solid var(--line);border-radius:8px;padding:.7rem;margin:.7rem 0;break-inside:avoid}
.group img,.noimg{width:160px;height:160px;flex:none;border-radius:6px;object-fit:cover;image-rendering:pixelated}
.noimg{display:flex;align-items:center;justify-content:center;text-align:center;padding:.6rem;background:var(--soft);
color:var(--muted);font-size:.8rem;border:1px dashed var(--line)}
.sel{font-weight:600;color:var(--ok)}.unsel{color:#7a8090}.summary{font-style:italic;margin:.3rem 0}
ol{margin:.2rem 0;padding-left:1.4rem}.status-ok{color:var(--ok)}.status-bad{color:var(--bad)}
details{margin:.5rem 0}summary{cursor:pointer;color:var(--accent)}
pre{white-space:pre-wrap;background:var(--soft);padding:.5rem;border-radius:4px;font-size:.8rem}
@media (max-width:700px){.group{flex-direction:column}.score{min-width:6rem}}
@media print{body{max-width:none;margin:0}.card,.group,.example{break-inside:avoid}a{color:inherit}
details>summary{display:none}details{display:block}}
"""


def _table(headers: list[str], rows: list[list[Any]], numeric: tuple[int, ...] = ()) -> str:
    """A table with every column headed; cells escaped; ``numeric`` columns right-aligned."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{escape(_fmt(c))}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    """A value as a person reads it: never ``None``, no JSON."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist() if path.exists() else []
    except Exception:  # noqa: BLE001 - a damaged optional file must not stop the report
        return []


def _ordered_stages(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    recorded = manifest.get("stages", {})
    order = {name: i for i, name in enumerate(stage_names())}
    return dict(sorted(recorded.items(), key=lambda kv: order.get(kv[0], len(order))))


# ----------------------------------------------------------------------------- results


def evaluations(run: RunDir) -> list[tuple[str, dict[str, Any]]]:
    """(benchmark, scores.json) of every evaluation of the run, in name order."""
    eval_root = run.root / "eval"
    found = []
    for f in sorted(eval_root.glob("*/scores.json")) if eval_root.exists() else []:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found.append((f.parent.name, data))
    return found


SCORE_LABELS = {"CIDEr": "CIDEr", "Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "SPICE": "SPICE"}


def score_tiles(data: dict[str, Any]) -> str:
    scores = data.get("scores", data)
    tiles = "".join(
        f"<div class='score{' main' if key == 'CIDEr' else ''}'><span>{label}</span><b>{scores[key]:.3f}</b></div>"
        for key, label in SCORE_LABELS.items()
        if isinstance(scores.get(key), int | float)
    )
    return f"<div class='scores'>{tiles}</div>" if tiles else ""


def results_card(run: RunDir, manifest: dict[str, Any]) -> str:
    """The page's first card: what was trained on what, the test scores, and (sandbox world) this
    run's place in the documented comparison."""
    stages = manifest.get("stages", {})
    evals = evaluations(run)
    notes = [manifest["notice"]] if isinstance(manifest.get("notice"), str) else []
    notes += [UNTRAINED_NOTE] if untrained_images(run) else []
    note = "".join(f"<p class='note'>{escape(n[:1].upper() + n[1:])}</p>" for n in notes)
    parts = [f"<h1>icsd run: {escape(run.root.name)}</h1><p class='lead'>{escape(data_line(stages))}</p>", note]
    if not evals:
        parts.append("<p>No test scores yet: this run has no evaluation (<code>icsd evaluate --run RUN ...</code>).</p>")
    for name, data in evals:
        scores = data.get("scores", data)
        images = scores.get("n_images")
        on = f" on {images:,} images" if isinstance(images, int) else ""
        parts.append(f"<h2 id='scores'>Test scores: {escape(name)}{escape(on)}</h2>" if len(evals) > 1 else
                     f"<p class='meta' id='scores'>Test scores, {escape(name)}{escape(on)} (pycocoevalcap, {SCALE_LABEL}; papers print them x100)</p>")  # fmt: skip
        parts.append(score_tiles(data))
        unreadable = (data.get("selection") or {}).get("unreadable_images")
        if unreadable:
            parts.append(f"<p class='note'>{escape(str(unreadable))} image(s) could not be read and were not scored.</p>")
        domains = data.get("domains") or scores.get("domains")
        if isinstance(domains, dict):
            parts.append(domains_table(domains))
    parts.append(sandbox_report.comparison_section(run.root))
    return f"<section id='results' class='card results'>{''.join(parts)}</section>"


def data_line(stages: dict[str, Any]) -> str:
    """``Trained on 4,828 pairs (558 images) made from 3,000 captions.``, as far as the run got."""
    count = lambda stage, key: (stages.get(stage) or {}).get("counts", {}).get(key)  # noqa: E731
    captions, pairs, images = count("ingest", "kept"), count("pairs", "pairs"), count("pairs", "images")
    if pairs is None:
        return "No training pairs yet." if captions is None else f"{captions:,} captions read; no training pairs yet."
    made = f" made from {captions:,} captions" if isinstance(captions, int) else ""
    return f"A captioner trained on {pairs:,} synthetic pairs ({images:,} images){made}, scored on held-out test images."


def domains_table(domains: dict[str, Any]) -> str:
    names = [k for k in SCORE_KEYS if any(isinstance(d, dict) and k in d for d in domains.values())]
    rows = [
        [d, v.get("n_images"), *(format_score(v[m]) if m in v else "" for m in names)]
        for d, v in domains.items()
        if isinstance(v, dict)
    ]
    return _table(["domain", "images", *names], rows, numeric=tuple(range(1, len(names) + 2)))


# ----------------------------------------------------------------------------- training


def _plot_curves(loss: list[tuple[float, float]], val: list[tuple[float, float]], val_label: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("training loss", "loss", loss)] + ([("validation", val_label, val)] if val else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 2.8), dpi=100, squeeze=False)
    for ax, (title, ylabel, points) in zip(axes[0], panels, strict=True):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
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
    return f"<img alt='training curves: loss and validation' src='data:image/png;base64,{data}'>"


def training_section(run: RunDir, manifest: dict[str, Any]) -> str:
    path = run.train / "metrics.jsonl"
    if not path.exists():
        return ""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    cider_key = next((k for k in ("val_CIDEr", "CIDEr", "val_cider") if any(k in r for r in rows)), None)
    val = [(r["step"], r[cider_key]) for r in rows if cider_key and cider_key in r and "step" in r]
    if not loss and not val:
        return ""
    curves = _plot_curves(loss, val, f"CIDEr ({SCALE_LABEL})") if loss else ""
    counts = ((manifest.get("stages") or {}).get("train") or {}).get("counts") or {}
    images = next((r.get("val_images") for r in rows if r.get("val_images")), None)
    on = f" on {images:,} validation images" if isinstance(images, int | float) else ""
    if isinstance(counts.get("best_score"), int | float):
        chosen = (
            f"The kept checkpoint (<code>train/best</code>) is the one of step {escape(_fmt(counts.get('best_step')))} "
            f"with the best validation score{escape(on)}, {counts['best_score']:.3f} = validation CIDEr + BLEU-4 "
            "(never chosen on the test images)."
        )
    else:
        chosen = "No validation score chose a checkpoint: <code>train/best</code> is the last one."
    steps = counts.get("steps")
    lead = f"{steps:,} steps" if isinstance(steps, int) else "Training"
    return (
        f"<section id='training'><h2>Training</h2><p>{escape(lead)}. {chosen}</p>"
        f"<div class='curve'>{curves}</div></section>"
    )


# ----------------------------------------------------------------------------- the data story


def report_counts(stage: str) -> tuple[tuple[str, str], ...]:
    """The counts the stage's spec names for this table (``StageSpec.report_counts``)."""
    from . import STAGES

    if stage not in STAGES:
        return ()
    try:
        return STAGES.get(stage).report_counts
    except Exception:  # noqa: BLE001 - a stage whose plugin is gone is shown with its raw counts
        return ()


def stage_outcome(stage: str, counts: dict[str, Any]) -> str:
    """A stage's counts in words (``600 sets sent to the LLM, 558 ok, 42 invalid``); other stages'
    counts as ``key value``."""
    known = report_counts(stage)
    if not known:
        return ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in counts.items() if not isinstance(v, dict | list))
    return ", ".join(f"{_fmt(counts[k])} {label}" for k, label in known if counts.get(k))


def pipeline_section(manifest: dict[str, Any], sample_note: str) -> str:
    stages = _ordered_stages(manifest)
    rows = [
        [name, stage_outcome(name, entry.get("counts") or {}), f"{entry['seconds']:.1f}" if isinstance(entry.get("seconds"), int | float) else ""]
        for name, entry in stages.items()
    ]
    table = _table(["stage", "what came out", "seconds"], rows, numeric=(2,))
    return f"<h3>Stage by stage</h3>{table}{sample_note}"


_COUNT_RULE = re.compile(r"^(\d+) captions? chosen, (\d+)\.\.(\d+) required")


def reason_in_words(status: str, examples: list[str]) -> str:
    """Why answers of one rule were not ok, in words (``too few captions chosen: 1-4, where the
    prompt asks for 5-10``), from the errors recorded for them."""
    counts = [m for e in examples if (m := _COUNT_RULE.match(e))]
    if counts and len(counts) == len(examples):
        chosen = sorted({int(m.group(1)) for m in counts})
        lo, hi = int(counts[0].group(2)), int(counts[0].group(3))
        few = "too few" if chosen[-1] < lo else "too many" if chosen[0] > hi else "too few or too many"
        span = f"{chosen[0]}" if len(chosen) == 1 else f"{chosen[0]}–{chosen[-1]}"
        return f"{few} captions chosen ({span}) where the prompt asks for {lo}–{hi}"
    if not examples or not examples[0]:
        return {"failed": "the request failed", "parse_error": "the answer could not be read"}.get(status, "no reason recorded")
    alike = f" (and {len(examples) - 1} alike)" if len(examples) > 1 else ""
    return f"{examples[0][:160]}{alike}"


def failures_section(run: RunDir, selections: list[dict[str, Any]] | None = None) -> str:
    """The LLM's answers per status, and why those not ok were not, in words."""
    selections = _read(run.selections) if selections is None else selections
    if not selections:
        return ""
    by_status = Counter(s["status"] for s in selections)
    rows = [[status, n, f"{100 * n / len(selections):.1f} %"] for status, n in by_status.most_common()]
    grouped: dict[tuple[str, str], list[str]] = {}
    for s in selections:
        if s["status"] != "ok":
            grouped.setdefault((s["status"], error_reason(s.get("error"))), []).append(s.get("error") or "")
    ranked = sorted(grouped.items(), key=lambda kv: -len(kv[1]))[:20]
    why = [[status, reason_in_words(status, errors), len(errors)] for (status, _), errors in ranked]
    return (
        "<h3>LLM answers</h3><div class='cols'><div>"
        + _table(["status", "sets", "share"], rows, numeric=(1, 2))
        + "</div><div>"
        + (_table(["status", "why not ok", "sets"], why, numeric=(2,)) if why else "")
        + "</div></div>"
    )


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


GROUPS_SHOWN = 4  # group cards shown at first; the others behind "show more"
NO_IMAGE = {"ok": "no image rendered for this set yet"}


def group_card(sel: dict[str, Any], members: list[str], captions: dict[str, str], sample: ImageSample | None) -> str:
    gid, status = sel["group_id"], sel["status"]
    selected = set(sel.get("selected_ids") or [])
    shown = [(n, cid) for n, cid in enumerate(members, 1) if cid in selected] or list(enumerate(members[:5], 1))
    others = [(n, cid) for n, cid in enumerate(members, 1) if (n, cid) not in shown]

    def item(n: int, cid: str) -> str:
        tick = "✔ " if cid in selected else ""
        return f"<li value='{n}' class='{'sel' if tick else 'unsel'}'>{tick}{escape(captions.get(cid) or cid)}</li>"

    items = "".join(item(n, c) for n, c in shown)
    if others:
        rest = "".join(item(n, c) for n, c in others)
        items += f"</ol><details><summary>the {len(others)} other candidates</summary><ol>{rest}</ol></details><ol>"
    info = [f"set {escape(gid)}", f"<span class='status-{'ok' if status == 'ok' else 'bad'}'>{escape(status)}</span>"]
    if sample and sample.image:
        ext = sample.image_ext or "jpeg"
        mime = {"jpg": "jpeg"}.get(ext, ext)
        data = base64.b64encode(sample.image).decode("ascii")
        img = f"<img alt='rendered image of set {escape(gid)}' src='data:image/{mime};base64,{data}'>"
        meta = sample.meta
        info.append(f"seed {escape(_fmt(meta.seed))}")
        if meta.nsfw:
            info.append("flagged NSFW (blacked out)")
        if meta.model:
            info.append(escape(meta.model))
    else:
        why = NO_IMAGE.get(status, "no image: the answer was not ok, so nothing was rendered")
        img = f"<div class='noimg'>{escape(why)}</div>"
    summary = f"<div class='summary'>{escape(sel['summary'])}</div>" if sel.get("summary") else ""
    error = f"<div class='meta'>why: {escape(reason_in_words(status, [sel['error']]))}</div>" if sel.get("error") else ""
    chosen = f"{len(selected)} of {len(members)} captions chosen" if members else ""
    return (
        f"<div class='group'>{img}<div><div class='meta'>{' · '.join(info)} · {chosen}</div>"
        f"{summary}{error}<ol>{items}</ol></div></div>"
    )


def groups_section(run: RunDir, limit: int, selections: list[dict[str, Any]] | None = None) -> str:
    """Sets with their captions (chosen ones ticked), summary and image: ``GROUPS_SHOWN`` at first,
    the rest of ``limit`` (ok ones first, a few that were not ok after them) behind "show more"."""
    selections = _read(run.selections) if selections is None else selections
    if not selections or limit == 0:
        return ""
    captions = {r["caption_id"]: r["text"] for r in _read(run.captions)}
    candidates = {r["group_id"]: r["member_ids"] for r in _read(run.candidates)}
    bad = [s for s in selections if s["status"] != "ok"][: max(1, limit // 4)]
    chosen = [s for s in selections if s["status"] == "ok"][: limit - len(bad)] + bad
    samples = read_samples(run.images, {s["group_id"] for s in chosen}, limit)
    cards = [group_card(s, candidates.get(s["group_id"], []), captions, samples.get(s["group_id"])) for s in chosen]
    more = (
        f"<details><summary>show {len(cards) - GROUPS_SHOWN} more sets</summary>{''.join(cards[GROUPS_SHOWN:])}</details>"
        if len(cards) > GROUPS_SHOWN
        else ""
    )
    return f"<h3>Candidate sets, the captions chosen, the summary and its image</h3>{''.join(cards[:GROUPS_SHOWN])}{more}"


def sample_note(manifest: dict[str, Any]) -> str:
    """``Only 600 of the 2,958 candidate sets were sent to the LLM (summarize.sample).``"""
    stages = manifest.get("stages", {})
    sets = ((stages.get("group") or {}).get("counts") or {}).get("groups")
    sent = ((stages.get("summarize") or {}).get("counts") or {}).get("groups")
    if isinstance(sets, int) and isinstance(sent, int) and sent < sets:
        return f"<p class='meta'>{sent:,} of the {sets:,} candidate sets were sent to the LLM (a sample: summarize.sample / summarize.limit).</p>"
    return ""


def data_section(run: RunDir, manifest: dict[str, Any], cfg: ReportConfig) -> str:
    selections = _read(run.selections)
    return (
        "<section id='data'><h2>How the training data was made</h2>"
        "<p class='meta'>Captions → candidate sets of nearest neighbours → the LLM's selection and summary → "
        "one image per summary → (image, chosen caption) pairs.</p>"
        + pipeline_section(manifest, sample_note(manifest))
        + failures_section(run, selections)
        + groups_section(run, cfg.sample_groups, selections)
        + "</section>"
    )


# ----------------------------------------------------------------------------- settings, provenance


def model_rows(stages: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One row per model a stage used: stage, role, model, the rest of what was recorded."""
    rows: list[list[Any]] = []
    for stage, entry in stages.items():
        models = entry.get("models") or {}
        nested = {k: v for k, v in models.items() if isinstance(v, dict)}
        flat = {k: v for k, v in models.items() if not isinstance(v, dict)}
        for role, info in nested.items():
            name = next((info[k] for k in ("name", "model", "path") if info.get(k)), "")
            rest = {k: v for k, v in info.items() if v != name and v not in (None, "")}
            rows.append([stage, role, name, _fmt(rest)])
        if flat:
            for role in list(flat):
                rows.append([stage, role, flat[role], ""])
    return [r for r in rows if r[2] not in (None, "")]


def provenance_section(run: RunDir, manifest: dict[str, Any]) -> str:
    stages = _ordered_stages(manifest)
    models = model_rows(stages)
    settings = "".join(
        f"<details><summary>{escape(name)} settings</summary><pre>"
        f"{escape(json.dumps(entry.get('config', {}), indent=1, default=str))}</pre></details>"
        for name, entry in stages.items()
    )
    versions = next((e.get("versions") for e in stages.values() if e.get("versions")), None) or {}
    version_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (
        "<section id='provenance'><h2>Settings and provenance</h2>"
        + (_table(["stage", "role", "model", "details"], models) if models else "")
        + settings
        + f"<p class='meta'>Run folder: {escape(str(run.root))}"
        + (f"<br>Versions: {escape(version_line)}" if version_line else "")
        + "</p></section>"
    )


def untrained_images(run: RunDir) -> bool:
    entry = run.stage_entry("render") or {}
    cfg = entry.get("config") or {}
    return bool(cfg.get("tiny_random"))


def render_html(run: RunDir, cfg: ReportConfig) -> str:
    manifest = run.read_manifest()
    body = "".join(
        [
            results_card(run, manifest),
            training_section(run, manifest),
            sandbox_report.test_examples_section(run.root),
            data_section(run, manifest, cfg),
            provenance_section(run, manifest),
        ]
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
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
    report_counts=(("bytes", "bytes"),),
    config=ReportConfig,
    run=run,
    inputs=lambda cfg, run: [],
    outputs=lambda run: [run.report],
    always_rerun=True,
    summary="Write RUN/report.html: one self-contained page of the run (counts, groups, images, curves, scores).",
    examples=("icsd report --run runs/quickstart && xdg-open runs/quickstart/report.html",),
)
