"""Report sections a run's page gains from its evaluation: held-out test images with the model's
caption beside their references, and, for a sandbox-world run, its test score placed among the
methods and bounds of docs/sandbox.md.

The comparison is data, read from :data:`REFERENCE_FILE` (written by
``benchmarks/sandbox_compare.py --publish``; any tool may write it). Its format::

    {
      "finding": "One sentence: what the comparison shows (optional).",
      "doc": "docs/sandbox.md#the-pre-registered-comparison",           (optional; a URL or a path in the repository)
      "note": "how the figures were made",          (optional)
      "methods": {
        "<name>": {
          "CIDEr_mean": 0.487,                      (required: mean test CIDEr over seeds)
          "ci95": [0.357, 0.617],                   (optional: its 95 % interval)
          "CIDEr_sd": 0.052,                        (optional: sd over seeds; with "seeds" > 1 it
                                                     gives a t interval when "ci95" is absent)
          "seeds": 3,                               (optional: number of seeds; else read from a
                                                     "note" such as "3 seeds")
          "label": "ICSD (select 5-10)",            (optional: the row's name; else <name>)
          "bound": false,                           (optional: a bound, not a method; also true
                                                     when <name> contains "(bound)")
          "finding": "one sentence about this row"  (optional)
        }
      },
      "world": "default",                           (optional: the world the figures were measured in)
      "icsd_minus_uni_context": {                   (optional: the paired difference of the two)
        "mean": -0.08, "ci": [-0.15, -0.01], "seeds": [0, 1, 2], "decision": "one sentence"
      }
    }

Other keys (``Bleu_4_mean``, ...) are ignored. :func:`load_reference` reads it; nothing here
holds a figure of its own.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .make import is_world

REFERENCE_FILE = "reference_scores.json"
EXAMPLES = 8
# Two-sided 95 % Student t quantiles for 1-5 degrees of freedom; a series expansion beyond.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def _esc(text: Any) -> str:
    return html.escape(str(text))


def image_tag(path: Path, alt: str) -> str:
    """``<img>`` with the file inlined as a data URI (the page stays one file)."""
    suffix = path.suffix.lower().lstrip(".")
    kind = {"jpg": "jpeg", "png": "png", "webp": "webp", "gif": "gif"}.get(suffix, "jpeg")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img src='data:image/{kind};base64,{data}' alt='{_esc(alt)}'>"


def evaluate_settings(run_root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((run_root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entry = manifest.get("stages", {}).get("evaluate") or {}
    return dict(entry.get("config") or {})


@dataclass(frozen=True)
class TestExample:
    image: Path
    caption: str
    references: list[str]


def test_examples(run_root: Path, limit: int = EXAMPLES) -> list[TestExample]:
    """The first ``limit`` test images the model captioned, with their references."""
    settings = evaluate_settings(run_root)
    annotations, images = settings.get("annotations"), settings.get("images")
    predictions_file = run_root / "eval" / str(settings.get("benchmark") or "") / "predictions.json"
    if not (annotations and images and predictions_file.is_file()):
        return []
    try:
        from ..formats import load_reference_file

        _, _, refs = load_reference_file(annotations)
        predictions = {
            str(p["image_id"]): p["caption"] for p in json.loads(predictions_file.read_text(encoding="utf-8"))
        }
    except Exception:  # noqa: BLE001 - an optional section must not stop the report
        return []
    found: list[TestExample] = []
    for ref in refs:
        caption = predictions.get(str(ref.image_id))
        path = Path(images) / (ref.file or "")
        if caption is not None and path.is_file():
            found.append(TestExample(path, caption, list(ref.captions)))
        if len(found) == limit:
            break
    return found


def test_examples_section(run_root: Path, limit: int = EXAMPLES) -> str:
    """Test images as cards: the model's caption, then the references."""
    examples = test_examples(run_root, limit)
    if not examples:
        return ""
    bench = evaluate_settings(run_root).get("benchmark") or ""
    cards = "".join(
        f"<figure class='example'>{image_tag(ex.image, f'test image {ex.image.name}')}<figcaption>"
        f"<p class='pred'><span class='tag'>model</span> {_esc(ex.caption)}</p>"
        f"<p class='tag'>references</p><ol class='refs'>{''.join(f'<li>{_esc(c)}</li>' for c in ex.references)}</ol>"
        "</figcaption></figure>"
        for ex in examples
    )
    folder = examples[0].image.parent
    return (
        f"<section id='examples'><h2>Test images: the model's caption and the references</h2>"
        f"<p class='meta'>The first {len(examples)} images of {_esc(bench)}, from {_esc(folder)}.</p>"
        f"<div class='examples'>{cards}</div></section>"
    )


# ----------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class Figure:
    """One row of the documented comparison."""

    name: str
    label: str
    mean: float
    ci95: tuple[float, float] | None
    seeds: int | None
    bound: bool
    finding: str = ""


@dataclass(frozen=True)
class Reference:
    figures: list[Figure]
    finding: str = ""
    doc: str = ""
    note: str = ""
    world: str = ""
    difference: str = ""  # the paired ICSD - uni-context difference, in one sentence


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
    if df in _T975:
        return _T975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _figure(name: str, row: dict[str, Any]) -> Figure | None:
    mean = _number(row.get("CIDEr_mean"))
    if mean is None:
        return None
    seeds = row.get("seeds")
    if not isinstance(seeds, int):
        found = re.search(r"(\d+) seeds?", str(row.get("note", "")))
        seeds = int(found.group(1)) if found else None
    ci = row.get("ci95")
    interval: tuple[float, float] | None = None
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_number(v) is not None for v in ci):
        interval = (float(ci[0]), float(ci[1]))
    elif (sd := _number(row.get("CIDEr_sd"))) is not None and seeds and seeds > 1:
        half = t_quantile(seeds - 1) * sd / math.sqrt(seeds)
        interval = (mean - half, mean + half)
    bound = bool(row.get("bound")) or "(bound)" in name
    label = str(row.get("label") or name.replace("_", " "))
    return Figure(name, label, mean, interval, seeds, bound, str(row.get("finding") or ""))


def load_reference(data: dict[str, Any] | None = None) -> Reference | None:
    """The documented comparison from ``data`` (default: the packaged :data:`REFERENCE_FILE`);
    None when there is none or it holds no usable row."""
    if data is None:
        data = reference_scores()
    methods = data.get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, dict):
        return None
    figures = [f for name, row in methods.items() if isinstance(row, dict) and (f := _figure(str(name), row))]
    if not figures:
        return None
    text = {k: str(data.get(k) or "") for k in ("finding", "doc", "note", "world")}
    return Reference(figures, **text, difference=paired_difference(data.get("icsd_minus_uni_context")))


def paired_difference(primary: Any) -> str:
    """``ICSD minus uni-context, paired over seeds 0, 1, 2: -0.080 (95 % interval -0.150 to -0.010).``"""
    if not isinstance(primary, dict) or _number(primary.get("mean")) is None:
        return ""
    text = "ICSD minus uni-context test CIDEr"
    seeds = primary.get("seeds")
    if isinstance(seeds, list) and seeds:
        text += ", paired over seeds " + ", ".join(map(str, seeds))
    text += f": {float(primary['mean']):+.3f}"
    ci = primary.get("ci")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_number(v) is not None for v in ci):
        text += f" (95 % interval {float(ci[0]):+.3f} to {float(ci[1]):+.3f})"
    decision = primary.get("decision")
    return text + (f"; {decision}" if isinstance(decision, str) and decision else "") + "."


def reference_scores() -> dict[str, Any]:
    try:
        text = resources.files("icsd.sandbox").joinpath(REFERENCE_FILE).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def doc_link(doc: str) -> str:
    """``<a>`` to the documentation: a URL as it is; a repository path as a file link when this
    installation sits in a checkout that has it, else as plain text."""
    if not doc:
        return ""
    if re.match(r"https?://", doc):
        return f"<a href='{_esc(doc)}'>{_esc(doc)}</a>"
    path, _, anchor = doc.partition("#")
    repo_file = Path(__file__).resolve().parents[3] / path
    if repo_file.is_file():
        return f"<a href='{_esc(repo_file.as_uri() + ('#' + anchor if anchor else ''))}'>{_esc(doc)}</a>"
    return f"<code>{_esc(doc)}</code>"


def placement(score: float, figures: list[Figure]) -> str:
    """One sentence placing ``score`` among the rows: which intervals hold it, or where it falls."""
    methods = [f for f in figures if not f.bound]
    inside = [f.label for f in methods if f.ci95 and f.ci95[0] <= score <= f.ci95[1]]
    below = sum(1 for f in methods if f.mean > score)
    text = f"This run's test CIDEr, {score:.3f}, "
    if inside:
        text += "lies inside the 95 % interval of " + ", ".join(inside)
    elif below == 0:
        text += "is above every documented method's mean"
    elif below == len(methods):
        text += "is below every documented method's mean"
    else:
        text += f"is below {below} of the {len(methods)} documented methods' means"
    return text + "."


def comparison_section(run_root: Path, reference: Reference | None = None) -> str:
    """For a sandbox-world run: its test CIDEr among the documented methods and bounds, best first,
    with each row's 95 % interval and number of seeds, one sentence and the documentation's link."""
    settings = evaluate_settings(run_root)
    annotations = settings.get("annotations")
    if not (annotations and is_world(Path(str(annotations)).parent)):
        return ""  # not a sandbox world's benchmark
    scores_file = run_root / "eval" / str(settings.get("benchmark") or "") / "scores.json"
    ref = reference if reference is not None else load_reference()
    try:
        data = json.loads(scores_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    score = _number(data.get("scores", data).get("CIDEr")) if isinstance(data, dict) else None
    if ref is None or score is None:
        return ""
    rows: list[tuple[float, str]] = []
    for f in ref.figures:
        interval = f"{f.ci95[0]:.3f} – {f.ci95[1]:.3f}" if f.ci95 else "–"
        seeds = str(f.seeds) if f.seeds else "–"
        kind = " <span class='tag'>bound</span>" if f.bound else ""
        title = f" title='{_esc(f.finding)}'" if f.finding else ""
        rows.append((f.mean, f"<tr{title}><td>{_esc(f.label)}{kind}</td><td class='num'>{f.mean:.3f}</td>"
                            f"<td class='num'>{interval}</td><td class='num'>{seeds}</td></tr>"))  # fmt: skip
    rows.append((score, f"<tr class='mine'><td><b>this run</b></td><td class='num'><b>{score:.3f}</b></td>"
                        "<td class='num'>–</td><td class='num'>1 run</td></tr>"))  # fmt: skip
    rows.sort(key=lambda r: -r[0])
    head = "<tr><th>method</th><th>mean test CIDEr</th><th>95 % interval</th><th>seeds</th></tr>"
    finding = "".join(f" {_esc(s)}" for s in (ref.difference, ref.finding) if s)
    link = doc_link(ref.doc or "docs/sandbox.md")
    measured = "; ".join(s for s in (ref.note, f"world {ref.world}" if ref.world else "") if s)
    note = f"<p class='meta'>{_esc(measured)}</p>" if measured else ""
    return (
        "<div id='comparison'><h2>This run beside the documented comparison</h2>"
        f"<p>{_esc(placement(score, ref.figures))}{finding} More: {link}.</p>"
        f"<table class='compact'><thead>{head}</thead><tbody>{''.join(r for _, r in rows)}</tbody></table>{note}</div>"
    )
