"""The contract every stage registered in ``icsd.stages.STAGES`` keeps (plugins included).

A stage's test class subclasses :class:`StageContract` and sets ``stage``; the checks are light
(no stage runs here: each stage's own tests run it).
"""

from __future__ import annotations

from pathlib import Path

import typer
from contract_base import Contract
from typer.testing import CliRunner

from icsd.config import STAGE_CONFIGS, StageConfig, pipeline_model
from icsd.stages import STAGES, StageSpec, stage_names
from icsd.store import RunDir


class StageContract(Contract):
    """What every stage declares: one spec under its name, a config model with defaults, inputs
    and outputs inside the run directory, a command with help and examples, a section in the
    whole-chain config."""

    names = "stage"
    stage: str = ""

    def spec(self) -> StageSpec:
        return STAGES.get(self.stage)

    def test_one_spec_under_its_name(self) -> None:
        spec = self.spec()
        assert isinstance(spec, StageSpec) and spec.name == self.stage and self.stage in stage_names()
        assert self.stage.isidentifier(), "a stage name is a config section and --stage.key prefix"
        assert callable(spec.run) and callable(spec.inputs) and callable(spec.outputs)
        assert spec.summary and spec.summary.strip() == spec.summary

    def test_its_config_has_defaults_and_a_section_in_the_chain_config(self) -> None:
        spec = self.spec()
        assert issubclass(spec.config, StageConfig)
        assert STAGE_CONFIGS[self.stage] is spec.config.section()  # with its backends' options, if any
        chain = pipeline_model()()
        assert isinstance(getattr(chain, self.stage), spec.config)
        assert set(spec.arguments) <= set(spec.config.model_fields)
        assert spec.wanted is None or isinstance(spec.wanted(chain), bool)

    def test_inputs_and_outputs_lie_in_the_run_directory(self, tmp_path: Path) -> None:
        spec = self.spec()
        run = RunDir.at(tmp_path / "run")
        outputs = spec.outputs(run)
        assert outputs and all(p.is_relative_to(run.root) for p in outputs)
        cfg = spec.config()
        assert all(isinstance(p, Path) for p in spec.inputs(cfg, run))

    def test_its_command_has_help_with_examples(self) -> None:
        from icsd.cli import stage_command

        app = typer.Typer(rich_markup_mode=None)
        stage_command(app, self.spec())
        app.command("noop")(lambda: None)  # two commands: the stage is a subcommand by its name
        out = CliRunner().invoke(app, [self.stage, "--help"], terminal_width=200)
        assert out.exit_code == 0, out.output
        assert "--run" in out.output and "--config" in out.output
        assert "Examples:" in out.output
        assert any(f"icsd {self.stage}" in e or f"icsd.cli {self.stage}" in e for e in self.spec().examples), (
            "the examples show the command"
        )
