"""Every shipped config validates; `base:` overlays; dotted overrides; stage selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from icsd import pipeline
from icsd.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path: Path) -> None:
    cfg = pipeline.load_config(path)
    assert cfg.name == path.stem or path.stem == "text_corpus_template"


def test_variants_overlay_the_paper_config() -> None:
    root = CONFIGS[0].parent
    paper = pipeline.load_config(root / "icsd_coco.yaml")
    uni = pipeline.load_config(root / "uni_context_coco.yaml")
    assert uni.render.prompts == "captions" and uni.pairs.kinds == ["uni"]
    assert uni.render.model == paper.render.model and uni.train == paper.train
    assert "summarize" not in pipeline.enabled_stages(uni) and "group" not in pipeline.enabled_stages(uni)
    no_selection = pipeline.load_config(root / "ablation_no_selection.yaml")
    assert no_selection.summarize.mode == "remap" and no_selection.summarize.n == 5
    assert pipeline.load_config(root / "ablation_k10.yaml").group.k == 10
    nocaps = pipeline.load_config(root / "coco_to_nocaps.yaml")
    assert nocaps.evaluate.benchmark == "nocaps-val" and nocaps.ingest.corpus == paper.ingest.corpus


def test_quickstart_resolves_packaged_files() -> None:
    cfg = pipeline.load_config(None)
    assert cfg.name == "quickstart"
    assert Path(cfg.ingest.corpus or "").is_file()
    assert Path(cfg.evaluate.images or "").is_dir()
    assert pipeline.enabled_stages(cfg) == [s for s in pipeline.order() if s != "score"]


def test_dotted_overrides_and_bad_keys(tmp_path: Path) -> None:
    cfg = pipeline.load_config(None, {"render.model": "some/model", "train.max_steps": "7", "render.tiny_random": "false"})
    assert cfg.render.model == "some/model" and cfg.train.max_steps == 7 and cfg.render.tiny_random is False
    with pytest.raises(UserError, match=r"unknown key render.bogus \(from the command line\)"):
        pipeline.load_config(None, {"render.bogus": "1"})
    with pytest.raises(UserError, match=r"train.batch_size: Input should be greater than or equal to 1 \(from the command line\)"):
        pipeline.load_config(None, {"train.batch_size": "-4"})
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="loops"):
        pipeline.load_config(loop)


def test_stage_window() -> None:
    stages = list(pipeline.order())
    assert pipeline.select_stages(stages, "render", "train") == ["render", "score", "pairs", "train"]
    with pytest.raises(UserError, match="unknown stage"):
        pipeline.select_stages(stages, "painting", None)
    with pytest.raises(UserError, match="comes after"):
        pipeline.select_stages(stages, "train", "embed")
