"""Report sections a run's page gains from its evaluation: held-out test images with the model's
caption beside their references, and, for a sandbox-world run, its test scores beside the figures
of docs/sandbox.md (:data:`REFERENCE_FILE`, written by ``benchmarks/sandbox_compare.py --publish``).
"""

from __future__ import annotations

import base64
import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

from .make import is_world

REFERENCE_FILE = "reference_scores.json"
EXAMPLES = 8


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _image_tag(path: Path) -> str:
    kind = "png" if path.suffix.lower() == ".png" else "jpeg"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img src='data:image/{kind};base64,{data}' alt='{_esc(path.name)}'>"


def _evaluate_settings(run_root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((run_root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entry = manifest.get("stages", {}).get("evaluate") or {}
    return dict(entry.get("config") or {})


def test_examples_section(run_root: Path, limit: int = EXAMPLES) -> str:
    """The first ``limit`` test images, each with the model's caption and the references."""
    settings = _evaluate_settings(run_root)
    annotations, images = settings.get("annotations"), settings.get("images")
    bench = settings.get("benchmark") or ""
    predictions_file = run_root / "eval" / str(bench) / "predictions.json"
    if not (annotations and images and predictions_file.is_file()):
        return ""
    try:
        from ..formats import load_reference_file

        _, _, refs = load_reference_file(annotations)
        predictions = {
            str(p["image_id"]): p["caption"] for p in json.loads(predictions_file.read_text(encoding="utf-8"))
        }
    except Exception:  # noqa: BLE001 - an optional section must not stop the report
        return ""
    blocks: list[str] = []
    for ref in refs:
        if len(blocks) == limit:
            break
        caption = predictions.get(str(ref.image_id))
        path = Path(images) / (ref.file or "")
        if caption is None or not path.is_file():
            continue
        items = "".join(f"<li>{_esc(c)}</li>" for c in ref.captions)
        blocks.append(
            f"<div class='group'>{_image_tag(path)}<div><p class='summary'>model: {_esc(caption)}</p>"
            f"<p class='meta'>references</p><ol>{items}</ol></div></div>"
        )
    if not blocks:
        return ""
    return f"<h2>Test images: the model's caption and the references ({_esc(bench)})</h2>" + "".join(blocks)


def reference_scores() -> dict[str, Any]:
    try:
        text = resources.files("icsd.sandbox").joinpath(REFERENCE_FILE).read_text(encoding="utf-8")
        return dict(json.loads(text))
    except (OSError, ValueError, FileNotFoundError):
        return {}


def sandbox_section(run_root: Path) -> str:
    """This run's sandbox test scores beside the methods and bounds of docs/sandbox.md."""
    settings = _evaluate_settings(run_root)
    annotations = settings.get("annotations")
    if not (annotations and is_world(Path(str(annotations)).parent)):
        return ""  # not a sandbox world's benchmark
    scores_file = run_root / "eval" / str(settings.get("benchmark") or "") / "scores.json"
    ref = reference_scores()
    if not (scores_file.is_file() and ref):
        return ""
    try:
        data = json.loads(scores_file.read_text(encoding="utf-8"))
    except ValueError:
        return ""
    mine = data.get("scores", data)
    rows = [
        f"<tr><td><b>this run</b></td><td><b>{mine.get('CIDEr', 0):.3f}</b></td><td>{mine.get('Bleu_4', 0):.3f}</td><td></td></tr>"
    ]
    for method, row in ref.get("methods", {}).items():
        rows.append(
            f"<tr><td>{_esc(method)}</td><td>{row['CIDEr_mean']:.3f} ± {row['CIDEr_sd']:.3f}</td>"
            f"<td>{row.get('Bleu_4_mean', 0):.3f}</td><td>{_esc(row.get('note', ''))}</td></tr>"
        )
    head = "<tr><th>method</th><th>test CIDEr</th><th>BLEU-4</th><th></th></tr>"
    note = _esc(ref.get("note", "mean ± sd over seeds; docs/sandbox.md"))
    return (
        "<h2>Sandbox world: this run beside the methods and bounds of docs/sandbox.md</h2>"
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table><p class='meta'>{note}</p>"
    )
