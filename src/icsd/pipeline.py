"""The whole chain: ingest -> embed -> group -> summarize -> render -> [score] -> pairs -> train ->
evaluate -> report, each through the same stage function its subcommand uses.

A stage is skipped when its config and inputs are unchanged since its last complete run: the
pipeline records, per stage, the hash of the stage's resolved config and of the files it read.
A changed stage reruns; the files it rewrites change the inputs of the stages after it, so they
rerun too. Stages resume their own unfinished parts, so an interrupted ``icsd run`` continues.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module, resources
from pathlib import Path
from typing import Any

from .config import PipelineConfig, pipeline_config
from .errors import UserError
from .store import STAGES, RunDir, hash_obj, input_hashes

ORDER: tuple[str, ...] = STAGES
PKG_PREFIX = "pkg:"


def package_file(relative: str) -> Path:
    """A file shipped inside the icsd package (vendored sample data, bundled configs)."""
    path = Path(str(resources.files("icsd").joinpath(relative)))
    if not path.exists():
        raise UserError(f"packaged file missing: {relative} (reinstall icsd)")
    return path


def resolve_package_paths(data: Any) -> Any:
    """Replace every ``pkg:relative/path`` string in a config by the file's installed path."""
    if isinstance(data, dict):
        return {k: resolve_package_paths(v) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_package_paths(v) for v in data]
    if isinstance(data, str) and data.startswith(PKG_PREFIX):
        return str(package_file(data[len(PKG_PREFIX) :]))
    return data


def quickstart_config_path() -> Path:
    return package_file("configs/quickstart.yaml")


def load_config(file: str | Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The run's config: the given YAML, or the bundled offline quickstart; dotted overrides on top."""
    path = Path(file) if file is not None else quickstart_config_path()
    cfg = pipeline_config(path, overrides)
    return PipelineConfig.model_validate(resolve_package_paths(cfg.model_dump(mode="json")))


def default_run_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def enabled_stages(cfg: PipelineConfig) -> list[str]:
    """The stages this config runs: score only with a CLIP model, evaluate only with references,
    and no grouping or LLM for the uni-context baseline (one image per original caption)."""
    stages = list(ORDER)
    if cfg.render.prompts == "captions" and set(cfg.pairs.kinds) == {"uni"}:
        for text_stage in ("embed", "group", "summarize"):
            stages.remove(text_stage)
    if not cfg.score.model:
        stages.remove("score")
    if not (cfg.evaluate.annotations or cfg.evaluate.predictions):
        stages.remove("evaluate")
    return stages


def stage_inputs(stage: str, cfg: PipelineConfig, run: RunDir) -> list[Path]:
    """The files a stage reads; their hashes decide whether it must rerun."""
    ev = cfg.evaluate
    table: dict[str, list[Path]] = {
        "ingest": [Path(cfg.ingest.corpus)] if cfg.ingest.corpus else [],
        "embed": [run.captions],
        "group": [run.captions, run.embeddings],
        "summarize": [run.candidates, run.captions],
        "render": [run.selections if cfg.render.prompts == "summaries" else run.captions],
        "score": [run.images, run.selections, run.captions],
        "pairs": [run.images, run.selections, run.captions, run.scores],
        "train": [run.pairs, run.images],
        "evaluate": [Path(p) for p in (ev.annotations, ev.images, ev.predictions) if p] + [run.train],
        "report": [],
    }
    return table[stage]


def stage_outputs(stage: str, run: RunDir) -> list[Path]:
    """What ``--force`` removes before rerunning a stage."""
    table: dict[str, list[Path]] = {
        "ingest": [run.captions],
        "embed": [run.embeddings],
        "group": [run.candidates],
        "summarize": [run.selection_parts, run.selections],
        "render": [run.images],
        "score": [run.scores],
        "pairs": [run.pairs],
        "train": [run.train],
        "evaluate": [run.root / "eval"],
        "report": [run.report],
    }
    return table[stage]


def fingerprint(stage: str, cfg: PipelineConfig, run: RunDir) -> dict[str, Any]:
    stage_cfg = getattr(cfg, stage).resolved()
    return {"config_hash": hash_obj(stage_cfg), "inputs": input_hashes(*stage_inputs(stage, cfg, run))}


def is_current(stage: str, cfg: PipelineConfig, run: RunDir) -> bool:
    """True when the stage finished before with the same config and the same inputs."""
    if stage == "report":
        return False
    manifest = run.read_manifest()
    entry = manifest.get("stages", {}).get(stage)
    recorded = manifest.get("pipeline", {}).get(stage)
    if not (isinstance(entry, dict) and entry.get("complete") and isinstance(recorded, dict)):
        return False
    return bool(recorded == fingerprint(stage, cfg, run))


def record_fingerprint(stage: str, cfg: PipelineConfig, run: RunDir) -> None:
    from .store import atomic_write_json

    manifest = run.read_manifest()
    manifest.setdefault("pipeline", {})[stage] = fingerprint(stage, cfg, run)
    atomic_write_json(run.manifest_json, manifest)


def finished_before(stage: str, run: RunDir) -> bool:
    """The stage completed a run earlier (so a rerun now means its config or inputs changed)."""
    recorded = run.read_manifest().get("pipeline", {}).get(stage)
    entry = run.stage_entry(stage) or {}
    return bool(recorded) and bool(entry.get("complete"))


def stage_config_for(stage: str, cfg: PipelineConfig, run: RunDir, changed: bool = False) -> Any:
    """The stage's config, with what only the pipeline knows filled in: the trained checkpoint to
    evaluate, and a fresh start for training whose settings or data changed since it finished."""
    stage_cfg = getattr(cfg, stage).model_copy(deep=True)
    if stage == "train" and changed:
        stage_cfg.restart = True
    if stage == "evaluate" and not stage_cfg.model and not stage_cfg.predictions:
        best = run.train / "best"
        stage_cfg.model = str(best if best.exists() else run.train / "last")
    return stage_cfg


def select_stages(stages: list[str], start: str | None, stop: str | None) -> list[str]:
    for name in (start, stop):
        if name is not None and name not in ORDER:
            raise UserError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    lo = ORDER.index(start) if start else 0
    hi = ORDER.index(stop) if stop else len(ORDER) - 1
    if lo > hi:
        raise UserError(f"--from {start} comes after --to {stop}")
    return [s for s in stages if lo <= ORDER.index(s) <= hi]


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
    rd = RunDir.at(run_path)
    forced = set(force or [])
    unknown = forced - set(ORDER)
    if unknown:
        raise UserError(f"unknown stage(s) for --force: {', '.join(sorted(unknown))}")
    result = PipelineResult(run=rd)
    for stage in select_stages(enabled_stages(cfg), start, stop):
        if stage in forced:
            for out in stage_outputs(stage, rd):
                if out.is_dir():
                    shutil.rmtree(out)
                elif out.exists():
                    out.unlink()
        elif is_current(stage, cfg, rd):
            result.skipped.append(stage)
            echo(f"{stage}: unchanged since its last run, skipped")
            continue
        changed = stage in forced or finished_before(stage, rd)
        module = import_module(f"icsd.stages.{stage}")
        stage_result = module.run(stage_config_for(stage, cfg, rd, changed), rd)
        record_fingerprint(stage, cfg, rd)
        result.ran.append(stage)
        result.results[stage] = stage_result
        for note in getattr(stage_result, "notes", []):
            echo(note)
        echo(stage_result.summary())
    result.seconds = time.perf_counter() - t0
    return result


def run_file(
    file: str | Path | None,
    overrides: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    **kw: Any,
) -> PipelineResult:
    """``icsd run [CONFIG]`` as a function: load the config (or the quickstart) and run it."""
    return run(load_config(file, overrides), run_dir, **kw)
