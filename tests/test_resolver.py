"""One resolver for every command: RUN/config.yaml <- -c FILE (base: chain) <- --stage.key <- flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from icsd import config, pipeline
from icsd.cli import app
from icsd.errors import UserError
from icsd.stages import stage_names, stage_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
runner = CliRunner()


def icsd(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a child process (exit codes and one-line errors as users see them)."""
    return subprocess.run(
        [sys.executable, "-c", "from icsd.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_stage_command_reads_the_config_base_chain() -> None:
    cfg = config.stage_config("embed", CONFIGS / "ablation_k10.yaml", {})
    assert cfg.model == "openai/clip-vit-base-patch16" and cfg.kind == "clip"
    train = config.stage_config("train", CONFIGS / "ablation_k10.yaml", {})
    assert train.preset == "icsd" and train.val_captions, "train settings come from the base config"


def test_layers_in_order_and_origins(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"group": {"k": 12, "index": "hnsw"}, "train": {"restart": True}}))
    block = tmp_path / "group.yaml"
    block.write_text("k: 20\n")  # a file holding one stage's block
    r = config.resolve(block, {"group.nprobe": "8"}, run, stage="group", flags={"block_size": 64, "k": None})
    g = r.config.group
    assert (g.k, g.index, g.nprobe, g.block_size) == (20, "hnsw", 8, 64)
    assert r.origin("group.k") == str(block) or r.origin("group.k").endswith("group.yaml")
    assert r.origin("group.index").endswith("config.yaml")
    assert r.origin("group.nprobe") == config.COMMAND_LINE == r.origin("group.block_size")
    assert r.origin("group.hnsw_m") == config.DEFAULT_SOURCE
    assert r.config.train.restart is False, "one-invocation settings are not read back from the run"


def test_bad_keys_name_their_source_and_the_closest_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown key render.stepz \(from the command line\).*'steps'"):
        config.resolve(None, {"render.stepz": "5"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(CONFIGS / "icsd_coco.yaml") + "\ngroup:\n  kk: 3\n")
    with pytest.raises(UserError, match=r"unknown key group.kk \(from .*bad.yaml\).*'k'"):
        config.resolve(bad)
    with pytest.raises(UserError, match=r"unknown section 'rendr'.*'render'"):
        config.resolve(None, {"rendr.steps": "5"})
    bad.write_text("group:\n  k: -1\n")
    with pytest.raises(UserError, match=r"group.k: .*greater than or equal to 1 \(from .*bad.yaml\)"):
        config.resolve(bad)


def test_config_show_cli() -> None:
    out = icsd("config", "show", "-c", str(CONFIGS / "ablation_k10.yaml"))
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["group"]["k"] == 10 and shown["embed"]["model"] == "openai/clip-vit-base-patch16"
    origin = runner.invoke(app, ["config", "show", "-c", str(CONFIGS / "ablation_k10.yaml"), "--origin",
                                 "--stage", "group", "--group.nprobe", "4"])  # fmt: skip
    assert origin.exit_code == 0, origin.output
    assert "group.k: 10  # configs/ablation_k10.yaml" in origin.output or "ablation_k10.yaml" in origin.output
    assert "group.nprobe: 4  # the command line" in origin.output
    bad = icsd("run", "--render.stepz", "5")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown key render.stepz (from the command line)")
    assert "'steps'" in bad.stderr and "Traceback" not in bad.stderr


def test_every_field_is_an_option_and_old_flags_still_work() -> None:
    for stage in stage_names():
        spec = stage_spec(stage)
        help_text = runner.invoke(app, [stage, "--help"], terminal_width=200).output
        for name in spec.config.model_fields:
            if name in spec.arguments:
                continue
            flags = (spec.config.model_fields[name].json_schema_extra or {}).get("cli_flags")  # type: ignore[union-attr]
            flag = flags[0].split("/")[0] if flags else f"--{name.replace('_', '-')}"
            assert flag in help_text, f"{stage}: {flag} missing from --help"
    # flags users already type keep their names and meaning
    cases = {
        "render": (["--no-safety-checker", "--format", "webp", "--device", "cpu", "--tiny-random"],
                   {"safety_checker": False, "image_format": "webp", "devices": "cpu", "tiny_random": True}),
        "pairs": (["--kinds", "selected,summary", "--exclude-nsfw"], {"kinds": ["selected", "summary"], "include_nsfw": False}),
        "train": (["--restart", "--no-bf16", "--weight-decay", "0.1"], {"restart": True, "bf16": False, "weight_decay": 0.1}),
        "group": (["--nlist", "64", "--hnsw-m", "16"], {"nlist": 64, "hnsw_m": 16}),
        "summarize": (["--base-url", "http://a/v1,http://b/v1", "--retry"], {"base_url": ["http://a/v1", "http://b/v1"], "retry": True}),
    }  # fmt: skip
    seen: dict[str, object] = {}

    def fake_run(cfg: object, run: object) -> object:
        seen["cfg"] = cfg
        raise UserError("stop here")

    for stage, (args, expected) in cases.items():
        spec = stage_spec(stage)
        original = spec.run
        object.__setattr__(spec, "run", fake_run)
        try:
            result = runner.invoke(app, [stage, "-r", "/tmp/icsd-never-created", *args])
        finally:
            object.__setattr__(spec, "run", original)
        assert isinstance(result.exception, UserError), result.output
        cfg = seen.pop("cfg")
        for key, value in expected.items():
            assert getattr(cfg, key) == value, (stage, key)
        assert not Path("/tmp/icsd-never-created").exists(), "a failed command leaves no empty run directory"


def test_unknown_flag_on_a_stage_command_is_one_line() -> None:
    out = icsd("group", "-r", "/tmp/icsd-nope", "--nprob", "3")
    assert out.returncode == 2 and "unknown option --nprob" in out.stderr and "--nprobe" in out.stderr
    assert not Path("/tmp/icsd-nope").exists()


def test_report_on_a_missing_run_is_an_error(tmp_path: Path) -> None:
    out = icsd("report", "--run", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "no run at" in out.stderr
    assert not (tmp_path / "nothing").exists()


def test_pipeline_reruns_a_stage_whose_outputs_were_deleted(tmp_path: Path) -> None:
    from icsd.store import RunDir

    spec = stage_spec("group")
    rd = RunDir.at(tmp_path / "r")
    cfg = pipeline.load_config(None)
    stage_cfg = pipeline.prepared(spec, cfg, rd)
    rd.update_manifest("group", {"complete": True})
    pipeline.record_fingerprint(spec, stage_cfg, rd)
    rd.candidates.write_bytes(b"x")
    assert pipeline.is_current(spec, cfg, rd)
    rd.candidates.unlink()
    assert not pipeline.is_current(spec, cfg, rd), "outputs gone: the stage must run again"
