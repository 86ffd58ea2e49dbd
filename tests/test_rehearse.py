"""``icsd run CONFIG --rehearse``: the chain of the paper's config with random-weight models at
tiny widths (the same classes, files and code path as the paper shapes), offline.

The paper-shape rehearsal itself (about 15 minutes and 6 GiB on 2 CPU cores) is selected with
``ICSD_PAPER_SHAPES=1 python -m pytest -m paper_shapes tests/test_rehearse.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icsd.cli import app
from icsd.errors import UserError
from icsd.pipeline import load_config
from icsd.rehearse import check_paths

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "icsd_coco.yaml"
STAGES = ["ingest", "embed", "group", "summarize", "render", "pairs", "train", "evaluate", "report"]


def test_rehearse_options_are_resolved_like_every_setting(tmp_path: Path) -> None:
    cfg = load_config(None, {"rehearse.captions": "40", "rehearse.scale": "tiny", "render.steps": "5"})
    assert (cfg.rehearse.captions, cfg.rehearse.scale, cfg.render.steps) == (40, "tiny", 5)
    with pytest.raises(UserError, match="unknown key rehearse.captons .*'captions'"):
        load_config(None, {"rehearse.captons": "4"})
    with pytest.raises(UserError, match="rehearse.images: .*integer"):
        load_config(None, {"rehearse.images": "many"})
    with pytest.raises(UserError, match="rehearse.scale"):
        load_config(None, {"rehearse.scale": "huge"})
    # a config file may carry its rehearsal's size; the command line wins
    (tmp_path / "c.yaml").write_text("rehearse:\n  images: 3\n  steps: 1\n")
    cfg = load_config(tmp_path / "c.yaml", {"rehearse.steps": "2"})
    assert (cfg.rehearse.images, cfg.rehearse.steps) == (3, 2)


def test_every_data_path_is_checked(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a dog\n")
    cfg = load_config(PAPER, {"ingest.corpus": str(corpus), "evaluate.images": str(tmp_path / "nowhere")})
    checks = {c.key: c.status for c in check_paths(cfg)}
    assert checks["ingest.corpus"] == "ok"
    assert checks["evaluate.images"] == "missing"
    assert checks["train.val_images"] == "missing"
    assert "summarize.prompt" not in checks  # 'official' names a bundled prompt


def rehearse(run: Path, *extra: str) -> dict:
    args = ["run", str(PAPER), "--rehearse", "--run", str(run), *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| stage | architecture |" in result.output
    return json.loads((run / "rehearsal.json").read_text())


@pytest.mark.slow
def test_rehearsal_of_the_paper_config_at_tiny_widths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the config's relative data paths point nowhere here
    run = tmp_path / "rehearsal"
    doc = rehearse(
        run, "--rehearse.scale", "tiny", "--rehearse.eval_images", "2",
        "--render.size", "64", "--train.image_size", "64",
        "--train.max_new_tokens", "8", "--evaluate.max_new_tokens", "8",
    )  # fmt: skip
    assert [s["stage"] for s in doc["stages"]] == STAGES
    missing = {line.split(":")[0] for line in doc["missing_paths"]}
    assert missing == {
        "ingest.corpus",
        "train.val_images",
        "train.val_captions",
        "evaluate.annotations",
        "evaluate.images",
    }
    models = {m["model_id"]: m for m in doc["models"]}
    assert set(models) == {"openai/clip-vit-base-patch16", "CompVis/stable-diffusion-v1-4",
                           "openai/clip-vit-base-patch32", "bert-base-uncased"}  # fmt: skip
    assert all(m["roundtrip"]["ok"] for m in models.values())
    assert set(models["CompVis/stable-diffusion-v1-4"]["classes"]) >= {
        "unet",
        "vae",
        "text_encoder",
        "safety_checker",
    }
    assert doc["captioner_checkpoint_roundtrip"]["ok"]
    rows = {s["stage"]: s for s in doc["stages"]}
    assert rows["render"]["units"] == 2 and rows["render"]["settings"]["steps"] == 20
    assert rows["render"]["settings"]["scheduler"] == "dpm++"
    assert rows["train"]["settings"]["batch_size"] == 64 and rows["train"]["units"] == 2 * 4
    assert rows["evaluate"]["full_units"] == 5000
    for stage in ("embed", "render", "train", "evaluate"):
        assert rows[stage]["projected_seconds"] > 0, stage
        assert rows[stage]["peak_rss"] > 0
    assert rows["train"]["peak_rss_configured"] > rows["train"]["peak_rss"]
    assert any("2 denoising steps" in line for line in doc["reduced"])
    # one cost model, one set of recipe sizes: with the corpus absent the rehearsal's sizes are the
    # recipe's (docs/cost.md), so are its pairs and its GPU-hours
    from icsd import cost_model

    recipe = cost_model.project({})
    cost = doc["gpu_cost_model"]
    assert cost["gpu_hours"] == recipe["gpu_hours"] and "icsd.cost_model" in cost["status"]
    assert rows["pairs"]["full_units"] == recipe["sizes"]["pairs"]["value"] == 566_747 * 7
    assert doc["sizes"]["captions"]["source"].startswith("assumed: COCO Karpathy")
    assert f"total, ungrouped training** | **{cost_model.totals(cost_model.lines(cost_model.load_inputs()), False)[0]:.1f}" in (
        REPO / "docs" / "cost.md"
    ).read_text()
    assert f"| **{recipe['gpu_hours']:.1f}** |" in (REPO / "docs" / "cost.md").read_text()
    # the stages loaded the built folders through their ordinary settings
    used = json.loads((run / "manifest.json").read_text())["stages"]
    assert used["render"]["config"]["model"].endswith("CompVis--stable-diffusion-v1-4.render.tiny")
    assert used["render"]["config"]["steps"] == 2
    # a second rehearsal reuses the built folders
    from icsd.random_models import build_folder

    again = build_folder("bert-base-uncased", "text", run / "rehearsal-models", "tiny")
    assert again.reused and again.total_parameters == models["bert-base-uncased"]["total_parameters"]


@pytest.mark.paper_shapes
@pytest.mark.skipif(
    os.environ.get("ICSD_PAPER_SHAPES") != "1", reason="paper shapes: set ICSD_PAPER_SHAPES=1"
)
def test_rehearsal_at_paper_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    doc = rehearse(tmp_path / "rehearsal")
    assert [s["stage"] for s in doc["stages"]] == STAGES
    params = {m["model_id"]: m["total_parameters"] for m in doc["models"]}
    assert params["CompVis/stable-diffusion-v1-4"] > 1_300_000_000  # UNet + VAE + text encoder + checker
    assert params["openai/clip-vit-base-patch32"] > 87_000_000
    assert params["bert-base-uncased"] > 109_000_000
    assert all(m["roundtrip"]["ok"] for m in doc["models"])
    assert doc["wall_seconds"] < 20 * 60
