"""What a new user reads: progress off a terminal, the start and closing lines of `icsd run`, the
sample and SPICE notes, `icsd config show`, and the errors for a missing model, a run folder given
as a checkpoint and a broken YAML file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from icsd import console
from icsd.cli import app, closing_lines
from icsd.config import EvaluateConfig, SummarizeConfig
from icsd.errors import UserError
from icsd.stages.evaluate import spice_asked
from icsd.stages.summarize import sample_note

runner = CliRunner()


def test_progress_off_a_terminal_is_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    bar = console.progress_bar(10, "train", "step", file=out)
    assert isinstance(bar, console.PlainProgress)
    bar.interval = 0.0  # a line on every update
    bar.update(4)
    bar.set_postfix(loss="1.234")
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2
    assert lines[0].startswith("train: 4/10 step (40%), 0:00 elapsed, about 0:00 left")
    assert lines[1].endswith("(loss 1.234)")
    monkeypatch.setenv(console.PLAIN_INTERVAL_ENV, "3600")
    quiet = console.progress_bar(10, "embed", "caption", file=out)
    quiet.update(10)
    assert len(out.getvalue().splitlines()) == 2  # nothing before the interval has passed


def test_progress_on_a_terminal_is_a_bar() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = console.progress_bar(5, "group", "cap", file=Tty())
    assert not isinstance(bar, console.PlainProgress) and bar.smoothing == 0
    bar.close()
    assert console.progress_bar(5, "x", disable=True).disable


def test_summarize_says_when_it_sends_a_sample() -> None:
    note = sample_note(600, 2958, SummarizeConfig(sample=600))
    assert note == [
        "note: summarize sends a sample: 600 of 2,958 candidate sets "
        "(summarize.sample 600; --summarize.sample null sends all)"
    ]
    assert sample_note(2958, 2958, SummarizeConfig()) == []


def test_spice_note_only_when_spice_was_asked_for() -> None:
    assert not spice_asked(EvaluateConfig())  # the default set: SPICE when its jars are found, silently
    assert spice_asked(EvaluateConfig(metrics=["CIDEr", "SPICE"]))
    assert not spice_asked(EvaluateConfig(metrics=["CIDEr"]))


def fake_run(tmp_path: Path) -> SimpleNamespace:
    root = tmp_path / "my run"
    images = tmp_path / "test images"
    images.mkdir()
    (images / "b.png").write_bytes(b"png")
    (images / "a.png").write_bytes(b"png")
    (root / "train" / "best").mkdir(parents=True)
    (root / "train" / "best" / "config.json").write_text("{}")
    (root / "eval" / "bench").mkdir(parents=True)
    (root / "eval" / "bench" / "scores.json").write_text(json.dumps({"scores": {"CIDEr": 0.5, "Bleu_4": 0.2}}))
    (root / "report.html").write_text("<html></html>")
    config = {"images": str(images), "annotations": str(tmp_path / "refs.json"), "benchmark": "bench"}
    (root / "manifest.json").write_text(json.dumps({"stages": {"evaluate": {"config": config}}}))
    return SimpleNamespace(run=SimpleNamespace(root=root), ran=["report"], skipped=["train"], seconds=1.0)


def test_closing_lines_name_scores_report_test_images_and_a_caption_command(tmp_path: Path) -> None:
    lines = closing_lines(fake_run(tmp_path), "its scores mean nothing")
    text = "\n".join(lines)
    assert "scores:" in text and "(CIDEr 0.500, Bleu_4 0.200)" in text and "report.html" in text
    assert f"test images:  {tmp_path / 'test images'}" in text
    command = next(line for line in lines if "icsd caption" in line).split("caption one:", 1)[1].strip()
    # quoted for a shell: the folders have spaces
    assert command == f"icsd caption --model '{tmp_path / 'my run' / 'train' / 'best'}' '{tmp_path / 'test images' / 'a.png'}'"
    assert lines[-1] == "note: its scores mean nothing"


def test_config_show_prints_the_test_images_folder() -> None:
    res = runner.invoke(app, ["config", "show", "--stage", "evaluate"])
    assert res.exit_code == 0, res.output
    images = next(line for line in res.stdout.splitlines() if line.startswith("evaluate.images:"))
    folder = Path(images.split(":", 1)[1].strip())
    assert folder.is_dir() and any(folder.iterdir())


def test_caption_names_a_missing_model_first(tmp_path: Path) -> None:
    res = runner.invoke(app, ["caption", "--model", str(tmp_path / "nope"), str(tmp_path / "x.png")])
    assert res.exit_code != 0 and isinstance(res.exception, UserError)
    message = str(res.exception)
    assert message.startswith(f"model not found: {tmp_path / 'nope'}")
    assert message.index("nope") < message.index("x.png")


def test_a_run_folder_given_as_checkpoint_gets_the_train_best_hint(tmp_path: Path) -> None:
    from icsd.backends.captioners import check_checkpoint

    run = tmp_path / "runs" / "quickstart"
    (run / "train" / "best").mkdir(parents=True)
    (run / "train" / "best" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"did you mean --model .*quickstart/train/best\?"):
        check_checkpoint(run)
    with pytest.raises(UserError, match=r"did you mean --model .*train/best\?"):
        check_checkpoint(run / "train")
    with pytest.raises(UserError, match="such as RUN/train/best"):
        check_checkpoint(tmp_path)


def test_yaml_errors_keep_line_and_column(tmp_path: Path) -> None:
    from icsd.config import read_yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  batch_size: 3\n  lr: [1, 2\nembed: {}\n")
    with pytest.raises(UserError) as err:
        read_yaml(bad)
    message = str(err.value)
    assert "\n" not in message
    assert f"{bad} line 5, column " in message and "(while parsing a flow sequence at line 4, column 7)" in message


def test_library_bars_are_off_and_ours_stay_on() -> None:
    # tqdm reads TQDM_* when it is imported: the CLI quiets the libraries before anything imports it
    script = (
        "import io\n"
        "from icsd.console import quiet_libraries\n"
        "quiet_libraries()\n"
        "from tqdm.auto import tqdm\n"
        "from icsd.console import progress_bar\n"
        "class Tty(io.StringIO):\n"
        "    def isatty(self): return True\n"
        "print(tqdm(total=3).disable, progress_bar(3, 'train', 'step', file=Tty()).disable)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ICSD_VERBOSE", "TQDM_DISABLE")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr[-1000:]
