"""What a run's synthetic data is made of, read from the run directory: the settings of the stages
that made it (the recipe), its hash, and the counts. Dataset and model cards both print this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..store import RunDir, hash_obj, read_json

RECIPE_STAGES = ("ingest", "embed", "group", "summarize", "render", "score", "pairs")


@dataclass(frozen=True)
class Recipe:
    stages: dict[str, dict[str, Any]]  # the settings of each stage that ran
    inputs: dict[str, Any]  # the corpus file(s) and their SHA-256
    hash: str  # of the settings and the corpus: two runs with the same hash made the same data
    counts: dict[str, dict[str, Any]]  # per stage, from the manifest

    def setting(self, stage: str, key: str, default: Any = None) -> Any:
        return self.stages.get(stage, {}).get(key, default)


def run_config(run: RunDir) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(run.config_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_recipe(run_root: Path) -> Recipe:
    run = RunDir.at(run_root, create=False)
    config = run_config(run)
    manifest = read_json(run.manifest_json) if run.manifest_json.exists() else {}
    entries = manifest.get("stages", {}) if isinstance(manifest, dict) else {}
    ran = [s for s in RECIPE_STAGES if s in entries]
    stages = {s: config.get(s, {}) for s in ran}
    inputs = dict(entries.get("ingest", {}).get("inputs", {}))
    counts = {s: dict(entries[s].get("counts", {})) for s in ran}
    digest = hash_obj({"config": {s: entries[s].get("config_hash") for s in ran}, "corpus": inputs})
    return Recipe(stages=stages, inputs=inputs, hash=digest, counts=counts)
