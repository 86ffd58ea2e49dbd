"""Every `icsd ...` command line shown to users (README.md, configs/README.md, docs/, and each
command's --help examples) still parses: flags keep their names. The work itself is replaced by a
sentinel, so nothing runs and nothing is read."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from icsd.cli import app
from icsd.stages import stage_names, stage_spec

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


class Parsed(Exception):
    """Raised instead of doing the work: the command line was accepted."""


def command_lines() -> list[str]:
    """`icsd ...` lines of the docs (continuations joined) and of every --help epilog."""
    found: list[str] = []
    # docs/plugins.md's commands need the example plugin package: tests/test_plugins.py runs them
    docs = [f for f in sorted((ROOT / "docs").glob("*.md")) if f.name != "plugins.md"]
    files = [ROOT / "README.md", ROOT / "configs" / "README.md", *docs]
    for f in files:
        text = f.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip().lstrip("$ ")
            if re.match(r"icsd (ingest|embed|group|summarize|render|score|pairs|train|caption|evaluate|run|report|compare|config)\b", line):
                found.append(line)
    for stage in stage_names():
        found += [e for e in stage_spec(stage).examples if e.startswith("icsd ")]
    cleaned = []
    for line in found:
        line = re.split(r"\s+#|\s+\(|\s+&&|`", line)[0].strip()
        cleaned.append(line)
    return sorted(set(cleaned))


LINES = command_lines()


def test_there_are_many_command_lines() -> None:
    assert len(LINES) > 30


@pytest.mark.parametrize("line", LINES)
def test_documented_command_line_parses(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from icsd import caption, compare, pipeline
    from icsd.stages import evaluate as evaluate_stage

    def stop(*_: Any, **__: Any) -> Any:
        raise Parsed

    for stage in stage_names():
        object.__setattr__(stage_spec(stage), "run", stop)
    monkeypatch.setattr(evaluate_stage, "main", stop)
    monkeypatch.setattr(caption, "caption_files", stop)
    monkeypatch.setattr(compare, "compare_rows", stop)
    monkeypatch.setattr(pipeline, "run", stop)
    from icsd import rehearse

    monkeypatch.setattr(rehearse, "rehearse", stop)
    monkeypatch.chdir(ROOT)
    try:
        args = shlex.split(line)[1:]
        result = runner.invoke(app, args, catch_exceptions=True)
    finally:
        import importlib

        for stage in stage_names():
            module = importlib.import_module(f"icsd.stages.{stage}")
            object.__setattr__(stage_spec(stage), "run", module.run)
    assert isinstance(result.exception, Parsed) or (result.exit_code == 0 and "show" in args), (
        f"{line!r} -> exit {result.exit_code}: {result.output[-800:]} {result.exception!r}"
    )
