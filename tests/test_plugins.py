"""Plugins through entry points: the example package (examples/plugins), installed with pip into a
folder of its own, runs through `icsd summarize`, `icsd render` and `icsd run` with no change to
icsd; its entries pass the registries' contracts; a plugin that fails to import is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from contracts import T2IContract
from llm_backend_contract import LLMBackendContract
from plugins import EXAMPLE, env_with, on_sys_path, pip_install
from stage_contract import StageContract

from icsd.llm import LLM_BACKENDS, LLMOptions, llm_options


@pytest.fixture(scope="session")
def installed_plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install(EXAMPLE, tmp_path_factory.mktemp("plugins") / "site")


@pytest.fixture(scope="module")
def active_plugins(installed_plugins: Path) -> Iterator[Path]:
    with on_sys_path(installed_plugins):
        yield installed_plugins


@pytest.fixture(autouse=True)
def _plugins_here(active_plugins: Path) -> None:
    """Every test of this module sees the example plugins; other modules do not."""


def icsd(*args: str, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "icsd.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    if ok:
        assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    return done


# ----------------------------------------------------------------------------- the registries' contracts


class TestOverlapPlugin(LLMBackendContract):
    backend_name = "overlap"

    @pytest.fixture()
    def spec(self) -> LLMOptions:
        return llm_options("overlap", model="any", max_new_tokens=16)


class TestGradientPlugin(T2IContract):
    backend = "gradient"

    @pytest.fixture(scope="class")
    def model(self) -> str:
        return "none"


class TestWordstatsPlugin(StageContract):
    stage = "wordstats"


def test_listing_the_plugins_reads_metadata_only(installed_plugins: Path) -> None:
    plugin = LLM_BACKENDS.plugin("overlap")
    assert plugin is not None and plugin.package == "icsd-example-plugins"
    assert LLM_BACKENDS.plugin("openai") is None
    code = (
        "import sys\n"
        "from icsd.backends.registry import T2I_BACKENDS\n"
        "from icsd.llm import LLM_BACKENDS\n"
        "from icsd.stages import STAGES\n"
        "assert 'overlap' in LLM_BACKENDS.names() and 'gradient' in T2I_BACKENDS and 'wordstats' in STAGES\n"
        "loaded = [m for m in sys.modules if m.startswith(('icsd_example_plugins', 'torch', 'numpy'))]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_with(installed_plugins))
    assert done.returncode == 0, done.stderr[-2000:]


# ----------------------------------------------------------------------------- end to end, as a user would


def candidate_run(run: Path, corpus: Path, groups: int, size: int) -> None:
    """A run as ingest and group leave it: the corpus ingested, then ``groups`` candidate sets of
    ``size`` consecutive captions (COCO's five captions of one image, then the next image's)."""
    from icsd.config import IngestConfig
    from icsd.records import Candidate, Caption, from_table, to_table
    from icsd.stages import ingest
    from icsd.store import RunDir, read_parquet, write_parquet

    rd = RunDir.at(run)
    ingest.run(IngestConfig(corpus=str(corpus)), rd)
    ids = [c.caption_id for c in from_table(read_parquet(rd.captions), Caption)]
    sets = [ids[5 * g : 5 * g + size] for g in range(groups)]
    rows = [Candidate(group_id=m[0], member_ids=m, scores=[1.0 - i / 10 for i in range(size)]) for m in sets]
    write_parquet(to_table(rows, Candidate), rd.candidates)


def test_an_installed_plugin_package_runs_through_the_cli(
    installed_plugins: Path, tmp_path: Path, coco_slice: Path
) -> None:
    env = env_with(installed_plugins)
    run = tmp_path / "run"
    candidate_run(run, coco_slice, groups=12, size=8)
    config = tmp_path / "chain.yaml"
    config.write_text(f"ingest: {{corpus: {coco_slice}}}\nsummarize: {{backend: overlap}}\n")

    out = icsd("summarize", "--run", str(run), "--backend", "overlap", "--limit", "12", env=env).stdout
    assert "summarize:" in out
    import pyarrow.parquet as pq

    rows = pq.read_table(run / "selections.parquet").to_pylist()
    assert len(rows) == 12 and all(r["status"] == "ok" and r["model"] == "word-overlap" for r in rows)
    assert all(len(r["selected_ids"]) == 8 for r in rows)

    out = icsd("render", "--run", str(run), "--backend", "gradient", "--size", "32", env=env).stdout
    assert "render: images 12" in out
    meta = json.loads((run / "manifest.json").read_text())["stages"]["render"]
    assert meta["models"]["text_to_image"] == "gradient"

    out = icsd("run", "-c", str(config), "--run", str(run), "--from", "wordstats", "--wordstats.top", "3", env=env)
    assert "wordstats: captions 300" in out.stdout and "run: 1 stage(s) ran" in out.stdout
    stats = json.loads((run / "wordstats.json").read_text())
    assert stats["captions"] == 300 and len(stats["top"]) == 3


def test_a_plugin_stage_takes_part_in_a_rehearsal_through_its_hook(installed_plugins: Path, tmp_path: Path) -> None:
    run = tmp_path / "rehearsal"
    out = icsd("run", "--rehearse", "--run", str(run), env=env_with(installed_plugins)).stdout
    assert "| wordstats |" in out
    doc = json.loads((run / "rehearsal.json").read_text())
    rows = {r["stage"]: r for r in doc["stages"]}
    row = rows["wordstats"]  # after the built-in stages, projected by the plugin's own hook
    assert list(rows)[-1] == "wordstats" and row["projection"] == "seconds per caption x corpus captions"
    assert row["units"] == rows["ingest"]["units"] and row["full_units"] == doc["sizes"]["captions"]["value"] > row["units"]
    assert row["projected_seconds"] > 0


def test_a_plugin_stage_is_a_command_with_its_settings(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from icsd.cli import build_app

    app, runner = build_app(), CliRunner()
    assert "wordstats" in runner.invoke(app, ["--help"]).output
    shown = runner.invoke(app, ["config", "show", "--stage", "wordstats", "--wordstats.top", "3", "--origin"])
    assert shown.output.splitlines() == ["wordstats.top: 3  # the command line", "wordstats.min_length: 1  # default"]
    assert "--min-length" in runner.invoke(app, ["wordstats", "--help"]).output


def test_a_plugin_that_fails_to_import_is_one_line_and_help_still_works(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[icsd.llm_backends]\nbroken = broken_plugin_missing.llm:Backend\n\n"
        "[icsd.stages]\nbrokenstage = broken_plugin_missing.stage:SPEC\n"
    )
    env = env_with(site)
    shown = icsd("--help", env=env)
    assert "summarize" in shown.stdout and "brokenstage" not in shown.stdout
    # one line per broken entry (the backend's options cannot be listed, the stage is left out)
    warnings = [line for line in shown.stderr.splitlines() if line.strip()]
    assert len(warnings) == 2 and all("broken-plugin" in w and w.endswith("left out") for w in warnings), shown.stderr
    assert "brokenstage" in warnings[0] and "LLM backend 'broken'" in warnings[1]

    from icsd.errors import UserError
    from icsd.llm import make_backend

    with on_sys_path(site), pytest.raises(UserError) as info:
        make_backend(llm_options("broken", model="any"))
    error = str(info.value)
    assert error.startswith("LLM backend 'broken' from plugin broken-plugin (entry point broken = ")
    assert "ModuleNotFoundError" in error and "\n" not in error
