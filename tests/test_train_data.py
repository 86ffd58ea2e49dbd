"""The training data path: augmentation, stream planning, rank-invariant batches, exact skipping."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image
from synthetic_run import coco_items, make_summary_run

from icsd.backends.captioners import clip_image_processor
from icsd.training.augment import augment, random_resized_crop_box, sample_seed
from icsd.training.data import PairStreams, StreamPlan, plan_streams, processor_normalizer
from icsd.training.validation import caption_scores, holdout_keys, load_user_split


def test_random_resized_crop_box_follows_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(640, 480, rng, scale=(0.5, 1.0))
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 640 and bottom <= 480
        assert 0.5 * 640 * 480 * 0.97 <= w * h <= 640 * 480
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # an image too narrow for any sampled ratio falls back to a centred crop at the ratio limit
    assert random_resized_crop_box(10, 1000, random.Random(0), scale=(0.99, 1.0)) == (0, 493, 10, 506)


def test_augment_is_a_function_of_its_seed(coco_images):
    image = Image.open(sorted(coco_images.glob("*.jpg"))[0]).convert("RGB")
    a = augment(image, 48, random.Random(sample_seed(1, 2, 3)))
    b = augment(image, 48, random.Random(sample_seed(1, 2, 3)))
    c = augment(image, 48, random.Random(sample_seed(1, 2, 4)))
    assert a.size == (48, 48) and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert sample_seed(1, 2) != sample_seed(2, 1)


def test_plan_streams():
    assert plan_streams(None, 1, 2, 64) == (2, 32, 2)
    assert plan_streams(None, 4, 0, 64) == (4, 64, 0)
    assert plan_streams(4, 2, 8, 64) == (4, 32, 2)
    assert plan_streams(2, 1, 0, 8) == (2, 4, 0)
    with pytest.raises(ValueError):
        plan_streams(3, 2, 0, 8)
    with pytest.raises(ValueError):
        plan_streams(4, 1, 0, 6)


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory, coco_captions, coco_images):
    items = coco_items(coco_captions, coco_images, 6)
    run = make_summary_run(tmp_path_factory.mktemp("run"), items, shard_size=2)
    captions = {f"g{image_id}": texts for _, image_id, texts in items}
    urls = tuple(str(p) for p in sorted(run.images.glob("shard-*.tar")))
    return urls, captions


def streams_dataset(urls, captions, world, rank, stream_batch, augment_images=True):
    plan = StreamPlan(
        urls=urls, captions=captions, seed=5, streams=2, world=world, stream_batch=stream_batch,
        shuffle_buffer=16, image_size=32, augment=augment_images, crop_scale_min=0.5, features=False,
    )  # fmt: skip
    return PairStreams(plan, rank, processor_normalizer(clip_image_processor(32)))


def batches(ds, epoch, n, skip=0):
    ds.set_epoch(epoch, n, skip)
    return list(ds)


def test_global_batches_do_not_depend_on_how_ranks_split_the_streams(shard_run):
    urls, captions = shard_run
    one = batches(streams_dataset(urls, captions, 1, 0, 3), 0, 4)
    ranks = [batches(streams_dataset(urls, captions, 2, r, 3), 0, 4) for r in (0, 1)]
    for step, whole in enumerate(one):
        parts = [ranks[0][step], ranks[1][step]]
        assert whole["captions"] == parts[0]["captions"] + parts[1]["captions"]
        assert torch.equal(whole["images"], torch.cat([p["images"] for p in parts]))
    assert whole["images"].shape == (6, 3, 32, 32)
    pairs = {(k, c) for k, texts in captions.items() for c in texts}
    assert all((k, c) in pairs for b in one for k, c in zip(b["keys"], b["captions"], strict=True))


def test_skipping_resumes_exactly_and_epochs_differ(shard_run):
    urls, captions = shard_run
    ds = streams_dataset(urls, captions, 1, 0, 2)
    full = batches(ds, 1, 5)
    tail = batches(ds, 1, 5, skip=2)
    assert len(tail) == 3
    for a, b in zip(full[2:], tail, strict=True):
        assert a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])
    other = batches(ds, 2, 5)
    assert [b["captions"] for b in other] != [b["captions"] for b in full]


def test_holdout_keys_are_stable_and_leave_training_data():
    keys = [f"k{i}" for i in range(100)]
    held = holdout_keys(keys, 0.05, 500)
    assert len(held) == 5 and held == holdout_keys(reversed(keys), 0.05, 500)
    assert len(holdout_keys(keys, 0.5, 3)) == 3
    assert holdout_keys(["only"], 0.5, 10) == set() and len(holdout_keys(["a", "b"], 0.9, 10)) == 1


def test_reference_files_and_scores(tmp_path, coco_captions, coco_images):
    coco = load_user_split(str(coco_images), str(coco_captions), 500)
    photos = sorted(coco_images.glob("*.jpg"))
    assert coco.ids == sorted(str(int(p.stem)) for p in photos)  # COCO ids, as ingest and evaluate give them
    assert sorted(p.name for p in coco.images) == [p.name for p in photos] and all(coco.refs)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(photos[0].read_bytes())
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text('{"image": "a.jpg", "captions": ["a dog", "the dog"]}\n{"image": "b.jpg", "caption": "a cat"}\n')
    lines = load_user_split(str(folder), str(jsonl), 10)
    assert lines.ids == ["a", "b"] and lines.refs == [["a dog", "the dog"], ["a cat"]]
    perfect = caption_scores(["a dog runs on the grass", "a cat sits on a red mat"],
                             [["a dog runs on the grass"], ["a cat sits on a red mat"]])  # fmt: skip
    assert perfect["BLEU-4"] > 0.99 and perfect["score"] == perfect["CIDEr"] + perfect["BLEU-4"]
    wrong = caption_scores(["a plane in the sky", "a bowl of soup"], [["a dog runs"], ["a cat sits"]])
    assert wrong["BLEU-4"] < 0.01 and wrong["score"] < perfect["score"]


def test_data_workers_interleave_into_the_same_batches(shard_run):
    from torch.utils.data import DataLoader

    urls, captions = shard_run
    inline = batches(streams_dataset(urls, captions, 1, 0, 2), 0, 3)
    ds = streams_dataset(urls, captions, 1, 0, 2)
    ds.set_epoch(0, 3)
    loader = DataLoader(ds, batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(0))
    items = list(loader)
    assert len(items) == 6
    for step, whole in enumerate(inline):
        first, second = items[2 * step], items[2 * step + 1]
        assert whole["captions"] == first["captions"] + second["captions"]
        assert torch.equal(whole["images"], torch.cat([first["images"], second["images"]]))


def test_held_out_synthetic_images_leave_the_training_pairs(tmp_path, coco_captions, coco_images):
    from icsd.config import PairsConfig, TrainConfig
    from icsd.stages import pairs as pairs_stage
    from icsd.training.distributed import Ranks
    from icsd.training.trainer import Trainer, load_train_data

    items = coco_items(coco_captions, coco_images, 6)
    run = make_summary_run(tmp_path / "run", items, shard_size=4)
    pairs_stage.run(PairsConfig(), run)
    cfg = TrainConfig(preset="tiny", val_fraction=0.3)
    data = load_train_data(run, cfg)
    assert len(data.holdout) == 2 and not set(data.holdout) & set(data.captions)
    assert data.pairs == sum(len(t) for _, i, t in items if f"g{i}" not in data.holdout)
    valset = Trainer(cfg, run, Ranks(0, 1, 0, "cpu")).validation_set(data)
    assert valset is not None and valset.ids == sorted(data.holdout)
    assert valset.refs[0] == data.holdout[valset.ids[0]] and valset.load(0).mode == "RGB"
    assert load_train_data(run, cfg.model_copy(update={"val_fraction": 0.0})).holdout == {}
