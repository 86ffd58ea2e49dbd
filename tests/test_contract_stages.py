"""The stage contract (tests/stage_contract.py) on every registered stage; the chain's config is
derived from the stages, and a stage registered at run time is a command and part of `icsd run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from contract_base import contract_subclasses
from pydantic import Field
from stage_contract import StageContract
from typer.testing import CliRunner

from icsd.config import RUN_SECTIONS, STAGE_CONFIGS, StageConfig, pipeline_model
from icsd.records import Caption, from_table
from icsd.stages import STAGES, StageResult, StageSpec, Timer, finish_stage, stage_names
from icsd.store import RunDir, atomic_write_json, read_parquet


class TestIngest(StageContract):
    stage = "ingest"


class TestEmbed(StageContract):
    stage = "embed"


class TestGroup(StageContract):
    stage = "group"


class TestSummarize(StageContract):
    stage = "summarize"


class TestRender(StageContract):
    stage = "render"


class TestScore(StageContract):
    stage = "score"


class TestPairs(StageContract):
    stage = "pairs"


class TestTrain(StageContract):
    stage = "train"


class TestEvaluate(StageContract):
    stage = "evaluate"


class TestReport(StageContract):
    stage = "report"


def test_every_registered_stage_has_a_contract_test() -> None:
    tested = {cls.stage for cls in contract_subclasses(StageContract)}
    assert set(stage_names()) <= tested, set(stage_names()) - tested


def test_stage_configs_and_the_chain_config_are_the_registered_stages() -> None:
    assert list(STAGE_CONFIGS) == list(stage_names())
    assert all(STAGE_CONFIGS[name] is STAGES.get(name).config.section() for name in stage_names())
    assert list(pipeline_model().model_fields) == ["name", "run_dir", "notice", *stage_names(), *RUN_SECTIONS]


def test_a_contract_class_without_its_name_says_what_to_set() -> None:
    with pytest.raises(TypeError, match="TestNothing: set stage = '<name>'"):
        type("TestNothing", (StageContract,), {})


# ----------------------------------------------------------------------------- a stage added at run time


class LongestConfig(StageConfig):
    top: int = Field(default=2, ge=1, description="Longest captions kept.")


def _longest(cfg: LongestConfig, run: RunDir) -> StageResult:
    timer = Timer()
    captions = from_table(read_parquet(run.captions, "captions"), Caption)
    longest = sorted(captions, key=lambda c: (-len(c.text), c.caption_id))[: cfg.top]
    atomic_write_json(run.root / "longest.json", [c.text for c in longest])
    return finish_stage(run, "longest", cfg, counts={"kept": len(longest)}, seconds=timer.seconds, output=None)


LONGEST = StageSpec(
    name="longest",
    config=LongestConfig,
    run=_longest,
    inputs=lambda cfg, run: [run.captions],
    outputs=lambda run: [run.root / "longest.json"],
    summary="The longest captions into RUN/longest.json.",
    examples=("icsd longest --run runs/demo --top 3",),
)


@pytest.fixture()
def longest_stage() -> object:
    STAGES.register("longest", LONGEST)
    yield LONGEST
    STAGES.unregister("longest")


class TestLongest(StageContract):
    stage = "longest"

    @pytest.fixture(autouse=True)
    def _registered(self, longest_stage: object) -> None:
        pass


def test_a_stage_registered_at_run_time_is_a_command_and_runs_in_the_chain(
    longest_stage: object, tmp_path: Path, coco_slice: Path
) -> None:
    from icsd import cli

    app = cli.build_app()
    runner = CliRunner()
    run = tmp_path / "run"
    assert runner.invoke(app, ["ingest", str(coco_slice), "--run", str(run)]).exit_code == 0
    out = runner.invoke(app, ["longest", "--run", str(run), "--top", "3"])
    assert out.exit_code == 0, out.output
    assert "longest: kept 3" in out.output and len(json.loads((run / "longest.json").read_text())) == 3
    shown = runner.invoke(app, ["config", "show", "--stage", "longest", "-r", str(run)])
    assert shown.output.splitlines() == ["longest.top: 3"]

    config = tmp_path / "chain.yaml"
    config.write_text(f"ingest: {{corpus: {coco_slice}}}\nlongest: {{top: 4}}\n")
    out = runner.invoke(app, ["run", "-c", str(config), "--run", str(run), "--from", "longest", "--longest.top", "5"])
    assert out.exit_code == 0, out.output
    assert "longest: kept 5" in out.output and len(json.loads((run / "longest.json").read_text())) == 5
    again = runner.invoke(app, ["run", str(config), "--run", str(run), "--from", "longest", "--longest.top", "5"])
    assert "longest: unchanged since its last run, skipped" in again.output
