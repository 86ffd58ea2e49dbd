"""The whole chain, in the order of :mod:`icsd.stages` (ingest -> embed -> group -> summarize ->
render -> [score] -> pairs -> train -> [evaluate] -> report), each through the same stage function
its subcommand uses.

A stage is skipped when it finished before with the same settings and the same inputs, and all of
its outputs are still there: the pipeline records, per stage, the hash of the stage's resolved
config (one-invocation settings left out) and of the files its spec names as inputs. A changed
stage reruns; the files it rewrites change the inputs of the stages after it, so they rerun too.
Stages resume their own unfinished parts, so an interrupted ``icsd run`` continues. One ``icsd run``
at a time writes a run folder (:mod:`icsd.locks`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import interrupt
from .config import PKG_PREFIX, PipelineConfig, lasting, package_file, quickstart_config_path, resolve
from .errors import UserError
from .locks import run_writer
from .stages import loaded_specs, stage_names, stage_spec
from .stages._base import StageSpec
from .store import RunDir, atomic_write_json, hash_obj, input_hashes


def order() -> tuple[str, ...]:
    return stage_names()


def load_config(
    file: str | Path | None, overrides: dict[str, Any] | None = None, run_dir: str | Path | None = None
) -> PipelineConfig:
    """The run's config: the given YAML (``pkg:configs/NAME.yaml`` for a bundled one), or the bundled
    offline quickstart, over what ``run_dir`` was made with (its ``config.yaml``), with dotted
    overrides on top."""
    if file is not None and str(file).startswith(PKG_PREFIX):
        file = package_file(str(file)[len(PKG_PREFIX) :])
    path = Path(file) if file is not None else quickstart_config_path()
    return resolve(path, overrides, run_dir).config


def default_run_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def enabled_stages(cfg: PipelineConfig) -> list[str]:
    """The stages this config runs: each stage's spec says when it is wanted (score only with a CLIP
    model, evaluate only with references, no grouping or LLM for the uni-context baseline)."""
    return [spec.name for spec in loaded_specs() if spec.wanted is None or spec.wanted(cfg)]


def prepared(spec: StageSpec, cfg: PipelineConfig, run: RunDir, changed: bool = False) -> Any:
    """The stage's settings with what only the chain knows filled in (see ``StageSpec.prepare``)."""
    stage_cfg = getattr(cfg, spec.name).model_copy(deep=True)
    return spec.prepare(stage_cfg, run, changed) if spec.prepare else stage_cfg


def fingerprint(spec: StageSpec, stage_cfg: Any, run: RunDir) -> dict[str, Any]:
    settings = lasting(spec.name, stage_cfg.resolved())
    return {"config_hash": hash_obj(settings), "inputs": input_hashes(*spec.inputs(stage_cfg, run))}


def missing_outputs(spec: StageSpec, run: RunDir) -> list[Path]:
    return [p for p in spec.outputs(run) if not p.exists()]


def is_current(spec: StageSpec, cfg: PipelineConfig, run: RunDir) -> bool:
    """True when the stage finished before with the same settings and inputs, and its outputs exist."""
    if spec.always_rerun or missing_outputs(spec, run):
        return False
    manifest = run.read_manifest()
    entry = manifest.get("stages", {}).get(spec.name)
    recorded = manifest.get("pipeline", {}).get(spec.name)
    if not (isinstance(entry, dict) and entry.get("complete") and isinstance(recorded, dict)):
        return False
    return bool(recorded == fingerprint(spec, prepared(spec, cfg, run), run))


def record_fingerprint(spec: StageSpec, stage_cfg: Any, run: RunDir) -> None:
    manifest = run.read_manifest()
    manifest.setdefault("pipeline", {})[spec.name] = fingerprint(spec, stage_cfg, run)
    atomic_write_json(run.manifest_json, manifest)


def record_notice(run: RunDir, notice: str | None) -> None:
    """Keep the chain's notice (what it checks, what its scores mean) in the manifest, for the report."""
    if not run.manifest_json.exists():
        return
    manifest = run.read_manifest()
    if manifest.get("notice") != notice:
        manifest["notice"] = notice
        atomic_write_json(run.manifest_json, manifest)


def finished_before(stage: str, run: RunDir) -> bool:
    """The stage completed a run earlier (so a rerun now means its config or inputs changed)."""
    recorded = run.read_manifest().get("pipeline", {}).get(stage)
    entry = run.stage_entry(stage) or {}
    return bool(recorded) and bool(entry.get("complete"))


def select_stages(stages: list[str], start: str | None, stop: str | None) -> list[str]:
    names = order()
    for name in (start, stop):
        if name is not None and name not in names:
            raise UserError(f"unknown stage {name!r}; stages: {', '.join(names)}")
    lo = names.index(start) if start else 0
    hi = names.index(stop) if stop else len(names) - 1
    if lo > hi:
        raise UserError(f"--from {start} comes after --to {stop}")
    return [s for s in stages if lo <= names.index(s) <= hi]


def remove_outputs(spec: StageSpec, run: RunDir) -> None:
    for out in spec.outputs(run):
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()


@dataclass
class PipelineResult:
    run: RunDir
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def run(
    cfg: PipelineConfig,
    run_dir: str | Path | None = None,
    *,
    start: str | None = None,
    stop: str | None = None,
    force: list[str] | None = None,
    echo: Callable[[str], None] = print,
) -> PipelineResult:
    """Run the chain on ``run_dir`` (default ``runs/<name>``); see the module docstring."""
    t0 = time.perf_counter()
    run_path = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    forced = set(force or [])
    unknown = forced - set(order())
    if unknown:
        raise UserError(f"unknown stage(s) for --force: {', '.join(sorted(unknown))}")
    stages = select_stages(enabled_stages(cfg), start, stop)
    rd = RunDir.at(run_path)
    with run_writer(rd.root):
        result = run_stages(cfg, rd, stages, forced, echo)
    result.seconds = time.perf_counter() - t0
    return result


def run_stages(
    cfg: PipelineConfig, rd: RunDir, stages: list[str], forced: set[str], echo: Callable[[str], None]
) -> PipelineResult:
    result = PipelineResult(run=rd)
    for stage in stages:
        interrupt.at(stage)
        spec = stage_spec(stage)
        if stage in forced:
            remove_outputs(spec, rd)
        elif is_current(spec, cfg, rd):
            result.skipped.append(stage)
            echo(f"{stage}: unchanged since its last run, skipped")
            continue
        changed = stage in forced or finished_before(stage, rd)
        stage_cfg = prepared(spec, cfg, rd, changed)
        echo(f"{stage}: started")
        record_notice(rd, cfg.notice)
        stage_result = spec.run(stage_cfg, rd)
        record_fingerprint(spec, stage_cfg, rd)
        record_notice(rd, cfg.notice)
        result.ran.append(stage)
        result.results[stage] = stage_result
        for note in getattr(stage_result, "notes", []):
            echo(note)
        echo(stage_result.summary())
    return result

