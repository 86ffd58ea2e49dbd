"""`icsd compare`: one table across runs — the settings that differ, synthetic-data counts, scores.

Settings come from each run's manifest (the resolved config each stage ran with); scores from
``RUN/eval/*/scores.json`` (NoCaps per domain). Runs without scores still get a row with counts.
Scores are shown as the files hold them, on pycocoevalcap's 0-1 scale (:data:`icsd.metrics.SCALE_LABEL`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .metrics import SCALE_LABEL, format_score
from .stages import stage_names
from .store import RunDir

COUNT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("groups", "group", "groups"),
    ("ok_summaries", "summarize", "ok"),
    ("images", "render", "images"),
    ("pairs", "pairs", "pairs"),
)
SCORE_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def flatten(prefix: str, data: Any, out: dict[str, Any]) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(data) if isinstance(data, list) else data


def run_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage, entry in manifest.get("stages", {}).items():
        if stage == "report":
            continue
        flatten(stage, entry.get("config", {}), out)
    return out


def run_scores(run: RunDir) -> dict[str, float | int]:
    """``{"<benchmark>/<metric>": value}``, NoCaps domains as ``<benchmark>/<domain>/<metric>``."""
    out: dict[str, float | int] = {}
    eval_root = run.root / "eval"
    for f in sorted(eval_root.glob("*/scores.json")) if eval_root.exists() else []:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            continue
        bench = f.parent.name
        scores = data.get("scores", data) if isinstance(data, dict) else {}
        for k, v in scores.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{bench}/{k}"] = int(v) if k.startswith("n_") else float(v)  # n_images is a count
        domains = data.get("domains") or (scores.get("domains") if isinstance(scores, dict) else None)
        if isinstance(domains, dict):
            for dom, vals in domains.items():
                if isinstance(vals, dict):
                    for k, v in vals.items():
                        if isinstance(v, int | float) and not isinstance(v, bool):
                            out[f"{bench}/{dom}/{k}"] = float(v)
    return out


def _metric_rank(key: str) -> tuple[str, int, str]:
    bench, _, metric = key.rpartition("/")
    return (bench, SCORE_ORDER.index(metric) if metric in SCORE_ORDER else len(SCORE_ORDER), metric)


def compare_rows(paths: list[Path], metric: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and one row per run."""
    runs = []
    for p in paths:
        if not p.is_dir():
            raise UserError(f"not a run directory: {p}")
        rd = RunDir.at(p, create=False)
        manifest = rd.read_manifest()
        if not manifest:
            raise UserError(f"no manifest.json in {p}: not an icsd run directory")
        runs.append((rd, manifest))
    settings = [run_settings(m) for _, m in runs]
    keys = sorted({k for s in settings for k in s})
    # a setting differs when two runs that ran its stage hold different values; a stage a run does
    # not have (uni-context has no summarize) is named once, in "stages not run", not as every one
    # of its settings
    differing = [k for k in keys if len({json.dumps(s[k], default=str) for s in settings if k in s}) > 1]
    ran = [set(m.get("stages", {})) - {"report"} for _, m in runs]
    every = set().union(*ran)
    order = {name: i for i, name in enumerate(stage_names())}
    not_run = [sorted(every - r, key=lambda n: (order.get(n, len(order)), n)) for r in ran]
    if any(not_run):
        differing.insert(0, "stages not run")
    scores = [run_scores(rd) for rd, _ in runs]
    score_keys = sorted({k for s in scores for k in s}, key=_metric_rank)
    if metric:
        score_keys = [k for k in score_keys if k.rpartition("/")[2] == metric]
    rows = []
    for (rd, manifest), st, sc, missing in zip(runs, settings, scores, not_run, strict=True):
        stages = manifest.get("stages", {})
        row: dict[str, Any] = {"run": str(rd.root.name)}
        row.update({k: st.get(k) for k in differing if k != "stages not run"})
        if "stages not run" in differing:
            row["stages not run"] = ", ".join(missing) or "-"
        for col, stage, count in COUNT_COLUMNS:
            row[col] = (stages.get(stage) or {}).get("counts", {}).get(count)
        row.update({k: sc.get(k) for k in score_keys})
        rows.append(row)
    if metric and score_keys:
        first = score_keys[0]
        rows.sort(key=lambda r: float("inf") if r.get(first) is None else -float(r[first]))
    columns = ["run", *differing, *(c for c, _, _ in COUNT_COLUMNS), *score_keys]
    return columns, rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return format_score(v)
    return str(v)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    scored = any(c.rpartition("/")[2] in SCORE_ORDER for c in columns)
    note = [f"\nScores: pycocoevalcap's {SCALE_LABEL} (papers print them x100)."] if scored else []
    return "\n".join([head, sep, *body, *note])


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _cell(r.get(c)) for c in columns})
    return buf.getvalue()


def to_json(columns: list[str], rows: list[dict[str, Any]]) -> str:
    return json.dumps({"columns": columns, "rows": rows}, indent=2, default=str)
