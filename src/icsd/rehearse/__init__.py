"""``icsd run CONFIG --rehearse``: the whole chain of a config on a small slice, every model at its
real architecture with random weights, offline, and a plan of the full run.

1. The config is resolved as ``icsd run`` resolves it; its ``rehearse`` section (``--rehearse.KEY
   VALUE`` or a ``rehearse:`` block of the file) sets the slice's size.
2. Every path it names is checked (one line per missing or unreadable one; never fatal).
3. Each model the enabled stages load (their ``models`` hook) is built at its published
   architecture with random weights (:mod:`icsd.random_models`) into ``RUN/rehearsal-models/``, as
   a ``save_pretrained`` folder that plain transformers / diffusers load back to the same outputs.
4. The stages run through :func:`icsd.pipeline.run`, one at a time, on a rehearsal copy of the
   config that each stage's ``reduce`` hook cut to a slice (the model settings point at the built
   folders; everything else is the config's own).
5. Per stage (its ``project`` hook): wall seconds, peak memory (resident set of this process and
   its children; CUDA peak on a GPU), seconds per unit, the memory extrapolated to the configured
   batch and the time of the full run projected on this hardware; the GPU-hours of the project's
   cost model (:mod:`icsd.cost_model`) at the full run's sizes. Written to ``RUN/rehearsal.json``
   and printed.

The hooks are declared by each stage (``StageSpec.rehearsal``, :mod:`icsd.rehearse.hooks`): this
module names no stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import PipelineConfig
from ..data.check import check_paths  # the same listing as `icsd data check`
from ..errors import UserError
from .hooks import ModelUse, Row, Size, StageRecord, StageRehearsal, fmt_seconds, gib, inline_executor
from .measure import MemoryMeter, Probes, cpu_seconds, cuda_available, hardware, probe_targets

MODELS_DIR = "rehearsal-models"
REPORT_FILE = "rehearsal.json"

__all__ = ["Rehearsal", "check_paths", "rehearse"]


# ----------------------------------------------------------------------------- models


def build_models(uses: list[ModelUse], root: Path, scale: str, echo: Callable[[str], None]) -> None:
    from ..random_models import build_folder

    for u in uses:
        if u.source != "built":
            continue
        echo(f"rehearsal: building {u.model_id} ({u.use}) with random weights ...")
        u.built = build_folder(u.model_id, u.use, root, scale)  # type: ignore[arg-type]
        rt = u.built.roundtrip
        how = "reused" if u.built.reused else f"{u.built.seconds:.0f}s"
        echo(
            f"  {u.built.title}: {u.built.total_parameters / 1e6:.1f}M parameters, {how}; "
            f"reloaded with plain {rt['loads_with'].split('.')[0]}: {'same outputs' if rt['ok'] else 'DIFFERENT outputs'}"
        )


# ----------------------------------------------------------------------------- the chain


def run_stages(cfg: PipelineConfig, run_dir: Path, echo: Callable[[str], None]) -> list[StageRecord]:
    from .. import pipeline

    records = []
    for stage in pipeline.enabled_stages(cfg):
        with MemoryMeter() as mem, Probes(probe_targets()) as probes:
            t0 = time.perf_counter()
            result = pipeline.run(cfg, run_dir, start=stage, stop=stage, force=[stage], echo=echo)
            seconds = time.perf_counter() - t0
        stage_result = result.results.get(stage)
        records.append(
            StageRecord(
                stage, seconds, mem.peak, mem.baseline, mem.cuda_peak, probes.probes,
                stage_result.summary() if stage_result is not None else "",
                dict(stage_result.counts) if stage_result is not None else {},
                mem.cpu,
            )
        )  # fmt: skip
        echo(f"rehearsal: {stage} {seconds:.1f}s, peak memory {gib(mem.peak)}")
    return records


def gpu_cost_model(sizes: dict[str, Size]) -> dict[str, Any]:
    """GPU-hours of the project's cost model (:mod:`icsd.cost_model`, docs/cost.md) at the full
    run's sizes this rehearsal knows; the others stay the model's recipe."""
    from ..cost_model import SIZES, project

    known = {k: (s.value, s.source) for k, s in sizes.items() if k in SIZES}
    try:
        result = project(known)
    except Exception as exc:  # noqa: BLE001 - the plan must not fail on the cost model
        return {"status": f"cost model failed: {type(exc).__name__}: {exc}"}
    return {
        "status": f"GPU-hours from icsd.cost_model (docs/cost.md) at this config's sizes: {result['gpu_hours']:,.1f} "
        "GPU-h (icsd, ungrouped training, LLM included; the rates are the paper recipe's models on one "
        "H200, each marked measured or estimated there)",
        **result,
    }


# ----------------------------------------------------------------------------- the whole rehearsal


@dataclass
class Rehearsal:
    document: dict[str, Any]
    path: Path
    table: str


def rehearse(
    config_file: Path | None,
    overrides: dict[str, Any] | None,
    run_dir: Path | None,
    echo: Callable[[str], None] = print,
) -> Rehearsal:
    from .. import pipeline
    from ..stages import stage_spec

    started = time.perf_counter()
    cpu_start = cpu_seconds()
    cfg = pipeline.load_config(config_file, overrides, None)
    opts = cfg.rehearse
    run_path = Path(run_dir) if run_dir is not None else pipeline.default_run_dir(cfg).with_name(
        pipeline.default_run_dir(cfg).name + "-rehearsal"
    )  # fmt: skip
    run_path.mkdir(parents=True, exist_ok=True)
    echo(f"rehearsal of {config_file or 'the quickstart'} in {run_path} (random weights, reduced steps)")

    checks = check_paths(cfg)
    for c in checks:
        if not c.ok:
            echo(f"path {c.line()}")
    specs = [stage_spec(name) for name in pipeline.enabled_stages(cfg)]
    on_gpu = cuda_available()
    with contextlib.ExitStack() as resources:
        sizes: dict[str, Size] = {}
        parts = {
            spec.name: StageRehearsal(spec.name, getattr(cfg, spec.name), cfg, opts, checks, on_gpu,
                                      resources, sizes, run_dir=run_path)
            for spec in specs
        }  # fmt: skip
        for spec in specs:
            if spec.rehearsal.models is not None:
                spec.rehearsal.models(parts[spec.name])
        uses = [u for part in parts.values() for u in part.uses]
        unknown = [u for u in uses if u.source == "built" and _arch(u.model_id) is None]
        if unknown:
            names = ", ".join(f"{u.key}={u.model_id}" for u in unknown)
            raise UserError(f"no known architecture to rehearse {names}; give a local model folder instead")
        t_build = time.perf_counter()
        with MemoryMeter() as build_mem:
            build_models(uses, run_path / MODELS_DIR, opts.scale, echo)
        build_seconds = time.perf_counter() - t_build

        copy = cfg.model_copy(deep=True)
        for spec in specs:
            part = parts[spec.name]
            part.config, part.rehearsal = getattr(copy, spec.name), copy
            for u in part.uses:  # the stage loads the built folder through its ordinary setting
                setattr(part.config, u.key.split(".", 1)[1], u.path)
            inline_executor(part)
            if spec.rehearsal.reduce is not None:
                spec.rehearsal.reduce(part)
        records = run_stages(copy, run_path, echo)
        rows: list[Row] = []
        for rec in records:
            spec, part = stage_spec(rec.stage), parts[rec.stage]
            part.record = rec
            rows.append(spec.rehearsal.project(part) if spec.rehearsal.project is not None else part.row())

    projected = sum(r.projected_seconds or 0.0 for r in rows)
    captions = sizes.get("captions")
    doc: dict[str, Any] = {
        "config": str(config_file) if config_file else "quickstart",
        "run": str(run_path),
        "hardware": hardware(),
        "scale": opts.scale,
        "options": opts.resolved(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(cpu_seconds() - cpu_start, 1),
        "build_seconds": round(build_seconds, 1),
        "build_peak_rss": build_mem.peak,
        "peak_rss": max([build_mem.peak] + [r.peak_rss for r in records]),
        "paths": [asdict(c) for c in checks],
        "missing_paths": [c.line() for c in checks if not c.ok],
        "models": [
            u.built.describe()
            if u.built is not None
            else {"key": u.key, "model": u.model_id, "source": u.source}
            for u in uses
        ],  # fmt: skip
        "model_notes": [n for part in parts.values() for n in part.notes],
        "reduced": [line for part in parts.values() for line in part.reductions],
        "substituted": [line for part in parts.values() for line in part.substitutions],
        "findings": [line for part in parts.values() for line in part.findings],
        "corpus_captions": {"count": int(captions.value), "source": captions.source} if captions else None,
        "sizes": {k: asdict(v) for k, v in sizes.items()},
        "stages": [asdict(r) for r in rows],
        "projected_seconds": round(projected, 1),
        "projection_note": (
            "this hardware, the configured settings and data sizes; seconds per unit measured on the "
            "rehearsal's slice with random weights (decoding runs to max_new_tokens: an upper bound); "
            "the LLM step is not included (scripted server)"
        ),
    }
    for part in parts.values():
        doc.update(part.document)
    doc["gpu_cost_model"] = gpu_cost_model(sizes)
    table = render_table(doc, rows)
    path = run_path / REPORT_FILE
    from ..store import atomic_write_json

    atomic_write_json(path, doc)
    return Rehearsal(doc, path, table)


def _arch(model_id: str) -> Any:
    from ..random_models import architecture_of

    return architecture_of(model_id)


def fmt_size(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def render_table(doc: dict[str, Any], rows: list[Row]) -> str:
    head = ["stage", "architecture", "params", "rehearsed", "seconds", "CPU time", "per unit", "peak memory",
            "at configured batch", "full run units", "projected"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    hw = doc["hardware"]
    where = hw.get("gpu") or f"{hw['cores']} CPU cores"
    out = [
        f"Rehearsal of {doc['config']} ({doc['scale']} architectures, random weights) on {where}, "
        f"load average {hw['load_average'][0]}: {fmt_seconds(doc['wall_seconds'])} "
        f"(CPU time {fmt_seconds(doc['cpu_seconds'])}, models built in {fmt_seconds(doc['build_seconds'])}), "
        f"peak memory {gib(doc['peak_rss'])}",
        "",
        *lines,
        "",
        f"Projected full run on this hardware: {fmt_seconds(doc['projected_seconds'])} (without the LLM step).",
        "Full-run sizes (the projections and the cost model use them):",
        *(f"  {k.replace('_', ' ')}: {fmt_size(v['value'])} ({v['source']})" for k, v in doc["sizes"].items()),
        f"GPU cost model: {doc['gpu_cost_model'].get('status', 'see rehearsal.json')}",
    ]
    bad_models = [m for m in doc["models"] if m.get("roundtrip") and not m["roundtrip"].get("ok")]
    if not any(m.get("roundtrip") for m in doc["models"]):
        out.append("Checkpoints: no model was built (every model the config names is local or packaged).")
    elif not bad_models:
        out.append("Checkpoints: every built model reloads with plain transformers/diffusers to the same outputs.")
    else:
        out.append(f"Checkpoints: {len(bad_models)} model(s) reload to DIFFERENT outputs: "
                   + ", ".join(m["model_id"] for m in bad_models))  # fmt: skip
    out += doc["findings"]
    if doc["missing_paths"]:
        out.append("Missing data paths (the full run needs them):")
        out += [f"  {line}" for line in doc["missing_paths"]]
    out.append("Reduced for the rehearsal:")
    out += [f"  {line}" for line in doc["reduced"] + doc["substituted"]]
    return "\n".join(out)
