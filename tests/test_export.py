"""`icsd export` gives a folder `datasets.load_dataset` reads (one row per pair, image and caption
columns, a dataset card), or webdataset shards; the model card beside each trained checkpoint
carries the test scores after `evaluate`, and the folder still loads with transformers."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from synthetic_run import coco_items, make_summary_run
from typer.testing import CliRunner

from icsd.cli import app
from icsd.config import EvaluateConfig, PairsConfig, TrainConfig
from icsd.errors import UserError
from icsd.stages import evaluate as evaluate_stage
from icsd.stages import pairs as pairs_stage
from icsd.stages import train as train_stage


@pytest.fixture()
def paired_run(tmp_path: Path, coco_captions: Path, coco_images: Path):
    items = coco_items(coco_captions, coco_images, 6)
    run = make_summary_run(tmp_path / "run", items, shard_size=4)
    pairs_stage.run(PairsConfig(kinds=["selected", "summary"]), run)
    return run, items


def test_export_loads_with_datasets_one_row_per_pair(tmp_path: Path, paired_run) -> None:
    datasets = pytest.importorskip("datasets")
    run, items = paired_run
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", "--run", str(run.root), "--out", str(out), "--shard-rows", "10"])
    assert result.exit_code == 0, result.output
    pairs = pq.read_table(run.pairs)
    n = pairs.num_rows
    assert n == sum(len(t) + 1 for _, _, t in items)  # each caption + the summary
    shards = sorted((out / "data").glob("*.parquet"))
    assert [s.name for s in shards] == [f"train-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
    assert len(shards) == -(-n // 10)
    assert f"export: {n} pairs of {len(items)} images in {len(shards)} shard(s)" in result.output

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["configs"][0]["data_files"][0]["path"] == "data/train-*"
    assert meta["license"] == "other" and "set it before publishing" in card  # a corpus of unknown licence
    assert "recipe hash" in card and f"image-caption pairs: {n:,}" in card

    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == n
    assert ds.features["image"].__class__.__name__ == "Image"
    rows = [ds[i] for i in range(ds.num_rows)]
    assert [r["caption"] for r in rows] == pairs.column("caption").to_pylist()
    by_group = {f"g{image_id}": (path, texts) for path, image_id, texts in items}
    first = rows[0]
    path, texts = by_group[first["group_id"]]
    assert first["image"].size == Image.open(path).size
    assert first["selected_captions"] == texts and first["summary"] == texts[0]
    assert first["image_model"] == "real-coco-photo" and first["llm_model"] == "test"

    again = CliRunner().invoke(app, ["export", "--run", str(run.root), "--out", str(out)])
    assert isinstance(again.exception, UserError) and "exists and is not empty" in str(again.exception)


def test_export_as_webdataset(tmp_path: Path, paired_run) -> None:
    run, items = paired_run
    out = tmp_path / "wds"
    result = CliRunner().invoke(app, ["export", "-r", str(run.root), "-o", str(out), "-f", "webdataset"])
    assert result.exit_code == 0, result.output
    with tarfile.open(out / "shard-00000.tar") as tar:
        names = tar.getnames()
        doc = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())  # type: ignore[union-attr]
    assert len([n for n in names if n.endswith(".jpg")]) == len(items)
    assert len(doc["captions"]) == len(doc["selected_captions"]) + 1 and "summary" in doc["kinds"]
    bad = CliRunner().invoke(app, ["export", "-r", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")])
    assert isinstance(bad.exception, UserError) and "no run at" in str(bad.exception)


def test_model_card_beside_checkpoints_carries_the_test_scores(
    tmp_path: Path, paired_run, coco_images: Path, one_torch_thread: None
) -> None:
    from transformers import VisionEncoderDecoderModel

    run, items = paired_run
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({
        "images": [{"id": image_id, "file_name": path.name} for path, image_id, _ in items],
        "annotations": [{"image_id": image_id, "id": image_id * 100 + i, "caption": t}
                        for path, image_id, texts in items for i, t in enumerate(texts)],
    }))  # fmt: skip
    cfg = TrainConfig(preset="tiny", batch_size=4, max_steps=2, warmup_steps=1, augment=False, num_workers=0,
                      val_fraction=0.0, save_every=2, log_every=2)  # fmt: skip
    train_stage.run(cfg, run)
    for name in ("best", "last"):
        card = (run.train / name / "README.md").read_text()
        assert "## Architecture" in card and "recipe hash" in card and "Not evaluated yet" in card
    evaluate_stage.run(
        EvaluateConfig(annotations=str(refs), images=str(coco_images), model=str(run.train / "best"),
                       limit=2, metrics=["BLEU", "CIDEr"], batch_size=2, max_new_tokens=5),  # fmt: skip
        run,
    )
    card = (run.train / "best" / "README.md").read_text()
    scores = json.loads(next((run.root / "eval").glob("*/scores.json")).read_text())
    meta = yaml.safe_load(card.split("---\n")[1])
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["CIDEr"] == round(scores["CIDEr"], 4)
    assert f"CIDEr {scores['CIDEr']:.4f}" in card and "protocol: pycocoevalcap" in card and "beam 3" in card
    assert "Not evaluated yet" in (run.train / "last" / "README.md").read_text()  # scored only best/
    model = VisionEncoderDecoderModel.from_pretrained(run.train / "best")
    assert model.config.is_encoder_decoder
