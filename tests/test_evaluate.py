"""Benchmark loaders (every format on small files written here), the evaluate stage and `icsd evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from icsd import jvm
from icsd.cli import app
from icsd.config import EvaluateConfig
from icsd.errors import UserError
from icsd.eval_sets import count_note, load_references
from icsd.formats import detect_format, load_predictions, predictions_json
from icsd.metrics import score_captions
from icsd.stages import evaluate as stage
from icsd.store import RunDir, sha256_file

FAST = ["BLEU", "ROUGE_L", "CIDEr"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICSD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "icsd-cache"))


def write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def sentences(*raws: str) -> list[dict[str, Any]]:
    return [{"raw": r, "tokens": r.lower().split(), "imgid": 0, "sentid": n} for n, r in enumerate(raws)]


@pytest.fixture()
def karpathy_coco(tmp_path: Path) -> Path:
    images = [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "imgid": 0,
         "split": "test", "sentences": sentences("A dog runs on the beach.", "A brown dog on the sand.")},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000043.jpg", "cocoid": 43, "imgid": 1,
         "split": "val", "sentences": sentences("A plate of broccoli.", "Food on a white plate.")},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000044.jpg", "cocoid": 44, "imgid": 2,
         "split": "train", "sentences": sentences("A man on a bike.")},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000045.jpg", "cocoid": 45, "imgid": 3,
         "split": "test", "sentences": sentences("Two cats sleep on a sofa.", "Cats sleeping on a couch.")},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000046.jpg", "cocoid": 46, "imgid": 4,
         "split": "restval", "sentences": sentences("A red bus.")},
    ]  # fmt: skip
    return write(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


@pytest.fixture()
def karpathy_flickr(tmp_path: Path) -> Path:
    images = [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test",
         "sentences": sentences("Two young guys with shaggy hair look at their hands.", "Two friends enjoy time outside.")},
        {"filename": "10002456.jpg", "imgid": 1, "split": "train", "sentences": sentences("Workers on a roof.")},
        {"filename": "1000268201.jpg", "imgid": 2, "split": "test",
         "sentences": sentences("A child in a pink dress climbs stairs.", "A little girl goes into a wooden building.")},
    ]  # fmt: skip
    return write(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})


NOCAPS_CAPTIONS = {
    1: ("in-domain", ["a dog runs on the beach", "a dog on the sand", "a brown dog running"]),
    2: ("in-domain", ["a plate of food with broccoli", "broccoli on a plate", "a meal on a table"]),
    3: ("near-domain", ["a man rides a red bicycle", "a cyclist on a red bike", "a person cycling"]),
    4: ("near-domain", ["a jellyfish in blue water", "a jellyfish swimming", "a pink jellyfish"]),
    5: ("out-domain", ["an accordion on a chair", "a red accordion", "a musical instrument on a seat"]),
    6: ("out-domain", ["a tank in a field", "a military tank on grass", "an armored vehicle outdoors"]),
}
NOCAPS_PREDICTIONS = {
    1: "a dog on the beach",
    2: "food on a plate",
    3: "a man on a bike",
    4: "a jellyfish in the water",
    5: "a red instrument",
    6: "a tank on the grass",
}


@pytest.fixture()
def nocaps(tmp_path: Path) -> Path:
    images = [
        {
            "id": i,
            "file_name": f"{i:016x}.jpg",
            "open_images_id": f"{i:016x}",
            "domain": dom,
            "height": 4,
            "width": 4,
        }
        for i, (dom, _) in NOCAPS_CAPTIONS.items()
    ]
    anns = [
        {"image_id": i, "id": 10 * i + n, "caption": c}
        for i, (_, caps) in NOCAPS_CAPTIONS.items()
        for n, c in enumerate(caps)
    ]
    return write(
        tmp_path / "nocaps_val_4500_captions.json", {"images": images, "annotations": anns, "info": {}}
    )


@pytest.fixture()
def coco_file(tmp_path: Path) -> Path:
    images = [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 8, "file_name": "000000000008.jpg"},
              {"id": 9, "file_name": "000000000009.jpg"}]  # fmt: skip
    anns = [
        {"image_id": 8, "id": 1, "caption": "A dog runs on the beach."},
        {"image_id": 7, "id": 2, "caption": "Two cats sleep on a sofa."},
        {"image_id": 8, "id": 3, "caption": "A dog on the sand."},
        {"image_id": 7, "id": 4, "caption": "Cats on a couch."},
    ]
    return write(tmp_path / "captions_tiny.json", {"images": images, "annotations": anns})


# ----------------------------------------------------------------------------- loaders


def test_karpathy_coco_splits(karpathy_coco: Path) -> None:
    refs = load_references(karpathy_coco)
    assert refs.name == "coco-karpathy-test" and refs.format == "karpathy" and refs.split == "test"
    assert [im.image_id for im in refs.images] == [42, 45]
    assert refs.images[0].key == "42"
    assert refs.images[0].file == "val2014/COCO_val2014_000000000042.jpg"
    assert refs.captions()["42"] == ["A dog runs on the beach.", "A brown dog on the sand."]
    val = load_references(karpathy_coco, split="val")
    assert val.name == "coco-karpathy-val" and [im.image_id for im in val.images] == [43]
    named = load_references(karpathy_coco, benchmark="coco-karpathy-val", split="test")
    assert [im.image_id for im in named.images] == [43]  # the benchmark name fixes the split
    assert [im.image_id for im in load_references(karpathy_coco, split="restval").images] == [46]
    assert refs.domains() == {}


def test_karpathy_flickr_ids_are_file_stems(karpathy_flickr: Path) -> None:
    refs = load_references(karpathy_flickr, benchmark="flickr30k-karpathy-test")
    assert refs.name == "flickr30k-karpathy-test"
    assert [im.image_id for im in refs.images] == [1000092795, 1000268201]
    assert refs.images[1].file == "1000268201.jpg"
    assert refs.n_captions == 4


def test_nocaps_domains(nocaps: Path) -> None:
    refs = load_references(nocaps)
    assert refs.name == "nocaps-val" and refs.format == "nocaps"
    assert refs.domains() == {"in-domain": ["1", "2"], "near-domain": ["3", "4"], "out-domain": ["5", "6"]}
    assert refs.images[0].file == f"{1:016x}.jpg"
    assert len(refs.captions()["3"]) == 3


def test_coco_captions_keep_image_order(coco_file: Path) -> None:
    refs = load_references(coco_file)
    assert refs.name == "captions_tiny" and refs.format == "coco" and refs.split is None
    assert [im.key for im in refs.images] == ["7", "8", "9"]
    assert refs.captions() == {
        "7": ["Two cats sleep on a sofa.", "Cats on a couch."],
        "8": ["A dog runs on the beach.", "A dog on the sand."],
        "9": [],
    }
    assert load_references(coco_file, benchmark="coco-captions").name == "coco-captions"


def test_real_coco_captions(coco_captions: Path) -> None:
    refs = load_references(coco_captions)
    assert len(refs.images) == 998 and refs.n_captions == 4993  # the subset in tests/data
    assert refs.images[0].file is not None and refs.images[0].file.endswith(".jpg")


def test_loader_errors(tmp_path: Path, karpathy_coco: Path, nocaps: Path, coco_file: Path) -> None:
    with pytest.raises(UserError, match="references file not found"):
        load_references(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_references(bad)
    with pytest.raises(UserError, match="not a caption annotation file"):
        load_references(write(tmp_path / "list.json", [1, 2]))
    with pytest.raises(UserError, match="neither 'sentences'"):
        load_references(write(tmp_path / "noann.json", {"images": [{"id": 1}]}))
    with pytest.raises(UserError, match="unknown benchmark 'coco-test'"):
        load_references(karpathy_coco, benchmark="coco-test")
    with pytest.raises(UserError, match="needs a nocaps file, but .* is in karpathy format"):
        load_references(karpathy_coco, benchmark="nocaps-val")
    with pytest.raises(UserError, match="needs the flickr30k Karpathy file"):
        load_references(karpathy_coco, benchmark="flickr30k-karpathy-test")
    with pytest.raises(
        UserError, match=r"no images in split 'testing' \(splits there: restval, test, train, val\)"
    ):
        load_references(karpathy_coco, split="testing")
    data = json.loads(nocaps.read_text())
    data["images"][0]["domain"] = "far-domain"
    with pytest.raises(UserError, match="unknown NoCaps domain"):
        load_references(write(tmp_path / "nc.json", data))
    data = json.loads(coco_file.read_text())
    data["annotations"].append({"image_id": 99, "id": 9, "caption": "x"})
    with pytest.raises(UserError, match="refer to images not in 'images'"):
        load_references(write(tmp_path / "c1.json", data))
    data = json.loads(coco_file.read_text())
    data["images"].append({"id": 7})
    with pytest.raises(UserError, match="listed twice"):
        load_references(write(tmp_path / "c2.json", data))
    data = json.loads(coco_file.read_text())
    data["annotations"][0].pop("caption")
    with pytest.raises(UserError, match=r"annotations\[0\] needs 'image_id' and 'caption'"):
        load_references(write(tmp_path / "c3.json", data))


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format({"images": [{"sentences": []}]}, tmp_path) == "karpathy"
    assert (
        detect_format({"images": [{"id": 1, "domain": "in-domain"}], "annotations": []}, tmp_path) == "nocaps"
    )
    assert detect_format({"images": [{"id": 1}], "annotations": []}, tmp_path) == "coco"


def test_count_note(karpathy_coco: Path) -> None:
    refs = load_references(karpathy_coco, benchmark="coco-karpathy-test")
    assert count_note(refs) == "note: coco-karpathy-test usually has 5000 images; dataset_coco.json gives 2"
    assert count_note(load_references(karpathy_coco)) is not None
    assert count_note(load_references(karpathy_coco, split="restval")) is None


def test_predictions_formats_and_errors(tmp_path: Path) -> None:
    listed = load_predictions(
        write(tmp_path / "p.json", [{"image_id": 42, "caption": "a dog"}, {"image_id": "43", "caption": "x"}])
    )
    assert listed == {"42": (42, "a dog"), "43": ("43", "x")}
    assert load_predictions(write(tmp_path / "d.json", {"42": "a dog"})) == {"42": ("42", "a dog")}
    with pytest.raises(UserError, match="predictions file not found"):
        load_predictions(tmp_path / "none.json")
    with pytest.raises(UserError, match="more than one prediction"):
        load_predictions(
            write(tmp_path / "dup.json", [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}])
        )
    with pytest.raises(UserError, match="not a string"):
        load_predictions(write(tmp_path / "ns.json", [{"image_id": 1, "caption": None}]))
    with pytest.raises(UserError, match="needs 'image_id' and 'caption'"):
        load_predictions(write(tmp_path / "nk.json", [{"id": 1, "caption": "a"}]))
    with pytest.raises(UserError, match="holds no predictions"):
        load_predictions(write(tmp_path / "empty.json", []))
    with pytest.raises(UserError, match="image id must be"):
        load_predictions(write(tmp_path / "badid.json", [{"image_id": [1], "caption": "a"}]))
    with pytest.raises(UserError, match="must be a list"):
        load_predictions(write(tmp_path / "str.json", "captions"))


def test_predictions_json_round_trip(karpathy_coco: Path) -> None:
    refs = load_references(karpathy_coco)
    out = predictions_json(refs, {"45": "two cats", "42": "a dog"})
    assert out == [{"image_id": 42, "caption": "a dog"}, {"image_id": 45, "caption": "two cats"}]


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_run_outputs(tmp_path: Path, karpathy_coco: Path) -> None:
    preds = write(tmp_path / "preds.json", [{"image_id": 45, "caption": "Two cats on a sofa."},
                                            {"image_id": 42, "caption": "A dog on the beach."}])  # fmt: skip
    cfg = EvaluateConfig(annotations=str(karpathy_coco), predictions=str(preds), metrics=FAST)
    run = RunDir.at(tmp_path / "run")
    result = stage.run(cfg, run)
    folder = run.root / "eval" / "coco-karpathy-test"
    assert result.output == folder / "scores.json"
    scores = json.loads((folder / "scores.json").read_text())
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert 0.0 <= scores[key] <= 10.0
    assert "METEOR" not in scores and "SPICE" not in scores
    assert scores["annotations_sha256"] == sha256_file(karpathy_coco)
    assert scores["predictions_sha256"] == sha256_file(preds)
    assert scores["checkpoint"] is None and scores["decoding"] is None
    assert scores["n_images"] == 2 and scores["split"] == "test"
    direct = score_captions(
        load_references(karpathy_coco).captions(),
        {"42": "A dog on the beach.", "45": "Two cats on a sofa."},
        metrics=FAST,
    )
    assert {k: scores[k] for k in direct.overall.scores} == direct.overall.scores
    predictions = json.loads((folder / "predictions.json").read_text())
    assert predictions == [
        {"image_id": 42, "caption": "A dog on the beach."},
        {"image_id": 45, "caption": "Two cats on a sofa."},
    ]
    per_image = json.loads((folder / "per_image.json").read_text())
    assert [row["image_id"] for row in per_image] == [42, 45] and "CIDEr" in per_image[0]
    manifest = run.read_manifest()["stages"]["evaluate"]
    assert manifest["benchmark"] == "coco-karpathy-test"
    assert manifest["scores"]["CIDEr"] == scores["CIDEr"]
    assert "| coco-karpathy-test | 2 |" in result.table
    assert result.table.splitlines()[0].startswith("| benchmark | images | 0-1 scale: BLEU-1 |")


def test_nocaps_per_domain_arithmetic(tmp_path: Path, nocaps: Path) -> None:
    preds = write(
        tmp_path / "preds.json", [{"image_id": i, "caption": c} for i, c in NOCAPS_PREDICTIONS.items()]
    )
    cfg = EvaluateConfig(
        annotations=str(nocaps), predictions=str(preds), metrics=["BLEU", "METEOR", "ROUGE_L", "CIDEr"]
    )
    outcome = stage.evaluate(cfg)
    doc = outcome.scores
    assert set(doc["domains"]) == {"in-domain", "near-domain", "out-domain", "overall"}
    assert sum(doc["domains"][d]["n_images"] for d in ("in-domain", "near-domain", "out-domain")) == 6
    assert doc["domains"]["overall"] == {k: v for k, v in doc.items() if k in doc["domains"]["overall"]}
    refs = load_references(nocaps).captions()
    for domain, ids in (("in-domain", [1, 2]), ("near-domain", [3, 4]), ("out-domain", [5, 6])):
        alone = score_captions({str(i): refs[str(i)] for i in ids}, {str(i): NOCAPS_PREDICTIONS[i] for i in ids},
                               metrics=["BLEU", "METEOR", "ROUGE_L", "CIDEr"])  # fmt: skip
        block = doc["domains"][domain]
        assert {k: block[k] for k in alone.overall.scores} == alone.overall.scores
    # ROUGE-L is a mean of per-image scores: the overall is the mean over images and, the domains
    # being equal in size, the mean of the domains
    per_image = stage.per_image_document(outcome)
    assert doc["ROUGE_L"] == pytest.approx(sum(row["ROUGE_L"] for row in per_image) / 6)
    rouge_domains = [doc["domains"][d]["ROUGE_L"] for d in ("in-domain", "near-domain", "out-domain")]
    assert doc["ROUGE_L"] == pytest.approx(sum(rouge_domains) / 3)
    # CIDEr-D uses each set's own document frequencies, so the overall is not the domains' mean
    cider_domains = [doc["domains"][d]["CIDEr"] for d in ("in-domain", "near-domain", "out-domain")]
    assert doc["CIDEr"] != pytest.approx(sum(cider_domains) / 3)
    table = outcome.table.splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| nocaps-val in-domain", "| nocaps-val near-domain", "| nocaps-val out-domain", "| nocaps-val overall",
    ]  # fmt: skip
    assert [row["domain"] for row in stage.per_image_document(outcome)][:2] == ["in-domain", "in-domain"]


def test_stage_config_errors(tmp_path: Path, coco_file: Path) -> None:
    with pytest.raises(UserError, match="needs the references"):
        stage.evaluate(EvaluateConfig(predictions="p.json"))
    with pytest.raises(UserError, match="either --predictions FILE or --model CKPT"):
        stage.evaluate(EvaluateConfig(annotations=str(coco_file), predictions="p.json", model="m"))
    with pytest.raises(UserError, match="needs --predictions FILE"):
        stage.evaluate(EvaluateConfig(annotations=str(coco_file)))
    with pytest.raises(UserError, match="--model needs --images DIR"):
        stage.evaluate(EvaluateConfig(annotations=str(coco_file), model="m"))
    with pytest.raises(UserError, match="images folder not found"):
        stage.evaluate(EvaluateConfig(annotations=str(coco_file), model="m", images=str(tmp_path / "nope")))
    (tmp_path / "imgs").mkdir()
    with pytest.raises(UserError, match=r"2 of 2 images of captions_tiny are not under .*000000000007.jpg"):
        stage.evaluate(EvaluateConfig(annotations=str(coco_file), model="m", images=str(tmp_path / "imgs")))


def test_out_file_without_run(tmp_path: Path, coco_file: Path) -> None:
    preds = write(
        tmp_path / "p.json",
        [{"image_id": 7, "caption": "cats on a sofa"}, {"image_id": 8, "caption": "a dog"}],
    )
    out = tmp_path / "scores.json"
    result = stage.main(
        EvaluateConfig(annotations=str(coco_file), predictions=str(preds), metrics=FAST), None, out
    )
    assert json.loads(out.read_text())["CIDEr"] == result.scores["CIDEr"]
    assert not (tmp_path / "scores.predictions.json").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_evaluate_predictions(tmp_path: Path, coco_file: Path) -> None:
    preds = write(
        tmp_path / "p.json",
        [{"image_id": 7, "caption": "cats on a sofa"}, {"image_id": 8, "caption": "a dog"}],
    )
    out = tmp_path / "s.json"
    res = CliRunner().invoke(app, ["evaluate", "--predictions", str(preds), "--references", str(coco_file),
                                   "--metrics", "bleu,cider", "--out", str(out), "--run", str(tmp_path / "run")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "| captions_tiny | 2 |" in res.output and "BLEU-4" in res.output and "CIDEr" in res.output
    assert "evaluate: images 2" in res.output
    saved = json.loads(out.read_text())
    assert saved == json.loads((tmp_path / "run" / "eval" / "captions_tiny" / "scores.json").read_text())
    assert saved["metrics"] == ["BLEU", "CIDEr"]


def test_cli_errors_are_one_line(tmp_path: Path, coco_file: Path) -> None:
    from icsd.cli import main

    preds = write(tmp_path / "p.json", [{"image_id": 7, "caption": "cats"}])
    cases = [
        (["--predictions", str(preds)], "needs the references"),
        (
            ["--predictions", str(preds), "--references", str(coco_file)],
            "reference images have no prediction",
        ),
        (
            ["--predictions", str(tmp_path / "x.json"), "--references", str(coco_file)],
            "predictions file not found",
        ),
        (
            ["--predictions", str(preds), "--references", str(coco_file), "--metrics", "blue"],
            "unknown metric",
        ),
        (
            ["--predictions", str(preds), "--references", str(coco_file), "--benchmark", "nocaps-val"],
            "needs a nocaps file",
        ),
    ]
    for args, message in cases:
        res = CliRunner().invoke(app, ["evaluate", *args], standalone_mode=False)
        assert isinstance(res.exception, UserError) and message in str(res.exception), (args, res.output)
        assert "\n" not in str(res.exception)
    import sys

    argv = sys.argv
    sys.argv = ["icsd", "evaluate", "--predictions", str(preds)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2


def test_cli_subset(tmp_path: Path, coco_file: Path) -> None:
    preds = write(tmp_path / "p.json", [{"image_id": 7, "caption": "cats on a sofa"}])
    res = CliRunner().invoke(app, ["evaluate", "--predictions", str(preds), "--references", str(coco_file),
                                   "--metrics", "BLEU", "--subset"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "| captions_tiny | 1 |" in res.output


# ----------------------------------------------------------------------------- --model


def test_model_path_captions_and_scores(tmp_path: Path, coco_captions: Path, coco_images: Path) -> None:
    """A tiny random checkpoint made by the captioner API captions the COCO test images
    (batched) and the captions are scored; decoding settings land in scores.json."""
    captioners = pytest.importorskip("icsd.backends.captioners")
    data = json.loads(coco_captions.read_text())
    have = {int(p.stem) for p in coco_images.glob("*.jpg")}
    images = [im for im in data["images"] if im["id"] in have][:6]
    keep = {im["id"] for im in images}
    refs = write(
        tmp_path / "refs.json",
        {"images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in keep]},
    )
    ckpt = tmp_path / "ckpt"
    captioners.build_caption_model(captioners.CaptionerSpec(preset="tiny")).save(ckpt)
    out = tmp_path / "scores.json"
    res = CliRunner().invoke(app, ["evaluate", "--model", str(ckpt), "--annotations", str(refs), "--images", str(coco_images),
                                   "--benchmark", "coco-captions", "--metrics", "BLEU,CIDEr", "--batch-size", "4",
                                   "--beams", "2", "--max-new-tokens", "6", "--min-new-tokens", "1",
                                   "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    scores = json.loads(out.read_text())
    assert scores["checkpoint"] == str(ckpt) and scores["n_images"] == 6
    assert scores["decoding"] == {"beams": 2, "min_new_tokens": 1, "max_new_tokens": 6, "batch_size": 4,
                                  "decode_lengths": "new", "length_norm": "as the checkpoint",
                                  "decode_dtype": "as the checkpoint"}  # fmt: skip
    preds = json.loads((tmp_path / "scores.predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [im["id"] for im in images]
    assert all(isinstance(p["caption"], str) for p in preds)
    limited = stage.evaluate(EvaluateConfig(annotations=str(refs), model=str(ckpt), images=str(coco_images), limit=2,
                                            metrics=["BLEU"], beams=1, max_new_tokens=4, min_new_tokens=1, device="cpu"))  # fmt: skip
    assert limited.evaluation.overall.n_images == 2 and limited.scores["selection"]["subset"] is True


def test_meteor_jvm_is_reused_between_evaluations() -> None:
    first = score_captions({"1": ["a dog runs"]}, {"1": "a dog"}, metrics="METEOR")
    meteor = jvm._shared
    second = score_captions({"1": ["a dog runs"]}, {"1": "a dog"}, metrics="METEOR")
    assert jvm._shared is meteor and meteor is not None and meteor.alive
    assert first.overall.scores == second.overall.scores
