"""The official data order: each pair once per epoch, one global shuffle, rank-count invariant, resumable."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from synthetic_run import coco_items, make_summary_run

from icsd.backends.captioners import clip_image_processor
from icsd.training.data import processor_normalizer
from icsd.training.epochs import (
    EpochPlan,
    OfficialPairs,
    epoch_permutation,
    index_shards,
    join_parts,
    micro_batches,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, coco_captions, coco_images):
    items = coco_items(coco_captions, coco_images, 5)
    run = make_summary_run(tmp_path_factory.mktemp("run"), items, shard_size=2)
    captions = {f"g{image_id}": texts for _, image_id, texts in items}
    urls = [str(p) for p in sorted(run.images.glob("shard-*.tar"))]
    return index_shards(urls, set(captions)), captions


def dataset(shards, world, rank, unit_batch, grouped=False, seed=3):
    members, captions = shards
    plan = EpochPlan(
        keys=tuple(sorted(captions)), captions=captions, members=members, seed=seed, world=world,
        unit_batch=unit_batch, grouped=grouped, image_size=32, augment=True, crop_scale_min=0.5, features=False,
    )  # fmt: skip
    return OfficialPairs(plan, rank, processor_normalizer(clip_image_processor(32)))


def epoch(ds, epoch_no, skip=0):
    _, batches = micro_batches(len(ds.units), ds.plan.unit_batch, ds.plan.world, 1)
    ds.set_epoch(epoch_no, batches, skip)
    return list(ds)


def test_one_epoch_visits_every_pair_exactly_once(shards):
    _, captions = shards
    every = Counter((k, c) for k, texts in captions.items() for c in texts)
    ds = dataset(shards, 1, 0, 4)
    got = epoch(ds, 0)
    seen = Counter(
        (k, c) for b in got for k, c, p in zip(b["keys"], b["captions"], b["pad"], strict=True) if not p
    )
    assert seen == every and not any(p for b in got for p in b["pad"])
    assert len(got) == -(-sum(every.values()) // 4) and got[0]["images"].shape == (4, 3, 32, 32)
    order = [(k, c) for b in got for k, c in zip(b["keys"], b["captions"], strict=True)]
    assert order != sorted(order) and order != [
        (k, c) for b in epoch(ds, 1) for k, c in zip(b["keys"], b["captions"], strict=True)
    ]
    # DistributedSampler's permutation: randperm seeded with seed + epoch
    g = torch.Generator()
    g.manual_seed(3 + 1)
    assert (
        epoch_permutation(len(ds.units), 3, 1).tolist() == torch.randperm(len(ds.units), generator=g).tolist()
    )


def test_the_global_order_is_the_same_on_one_and_two_ranks(shards):
    one = epoch(dataset(shards, 1, 0, 4), 2)
    two = [epoch(dataset(shards, 2, r, 2), 2) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1])
    for whole, a, b in zip(one, two[0], two[1], strict=True):
        real = [x for x in (a, b) if not all(x["pad"])]
        # rank r holds the interleaved slice [r::2] of every global batch
        for r, part in enumerate((a, b)):
            if not all(part["pad"]):
                assert part["captions"] == whole["captions"][r::2]
                assert torch.equal(part["images"], whole["images"][r::2])
        assert sum(len(x["captions"]) for x in real) == len(whole["captions"])
    # a short last batch: the rank without a share gets one pad unit, masked out of the loss
    units = len(dataset(shards, 1, 0, 4).units)
    if units % 4 == 1:
        assert all(two[1][-1]["pad"]) and len(two[1][-1]["captions"]) == 1


def test_resuming_mid_epoch_continues_the_same_sequence(shards):
    ds = dataset(shards, 1, 0, 3)
    full = epoch(ds, 1)
    tail = epoch(dataset(shards, 1, 0, 3), 1, skip=4)
    assert len(tail) == len(full) - 4
    for a, b in zip(full[4:], tail, strict=True):
        assert a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])


def test_data_workers_split_each_batch_and_join_back(shards):
    from torch.utils.data import DataLoader

    inline = epoch(dataset(shards, 1, 0, 3, grouped=True), 0)
    ds = dataset(shards, 1, 0, 3, grouped=True)
    _, n = micro_batches(len(ds.units), 3, 1, 1)
    ds.set_epoch(0, n)
    items = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(items) == 2 * len(inline)
    for step, whole in enumerate(inline):
        joined = join_parts(items[2 * step : 2 * step + 2])
        assert joined["captions"] == whole["captions"] and torch.equal(joined["images"], whole["images"])
        assert torch.equal(joined["image_index"], whole["image_index"])


def test_grouped_units_are_images_with_all_their_captions(shards):
    _, captions = shards
    got = epoch(dataset(shards, 1, 0, 2, grouped=True), 0)
    keys = [k for b in got for k in dict.fromkeys(b["keys"])]
    assert sorted(keys) == sorted(captions)
    for b in got:
        assert len(b["images"]) == len(set(b["keys"])) and len(b["image_index"]) == len(b["captions"])
        for key, caption, i in zip(b["keys"], b["captions"], b["image_index"].tolist(), strict=True):
            assert caption in captions[key] and b["keys"][b["image_index"].tolist().index(i)] == key
        assert sum(len(captions[k]) for k in set(b["keys"])) == len(b["captions"])


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("grouped", [False, True])
def test_trainer_runs_in_the_official_order(tmp_path, coco_captions, coco_images, grouped):
    import json

    from icsd.config import PairsConfig, TrainConfig
    from icsd.stages import pairs as pairs_stage
    from icsd.stages import train as train_stage

    run = make_summary_run(tmp_path / "run", coco_items(coco_captions, coco_images, 4), shard_size=2)
    pairs_stage.run(PairsConfig(), run)
    cfg = TrainConfig(preset="tiny", batch_size=6, max_steps=4, num_workers=0, val_fraction=0, log_every=1,
                      save_every=2, data_order="official", group_captions=grouped)  # fmt: skip
    result = train_stage.run(cfg, run)
    assert result.counts["steps"] == 4
    records = [json.loads(x) for x in (run.train / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in records)
    state = json.loads((run.train / "last" / "trainer_state.json").read_text())
    assert state["identity"]["data_order"] == "official" and state["identity"]["group_captions"] is grouped


def test_grouped_steps_need_the_official_order(tmp_path, coco_captions, coco_images):
    from icsd.config import PairsConfig, TrainConfig
    from icsd.errors import UserError
    from icsd.stages import pairs as pairs_stage
    from icsd.stages import train as train_stage

    run = make_summary_run(tmp_path / "run", coco_items(coco_captions, coco_images, 2), shard_size=2)
    pairs_stage.run(PairsConfig(), run)
    with pytest.raises(UserError, match="data_order official"):
        train_stage.run(TrainConfig(preset="tiny", max_steps=1, group_captions=True, val_fraction=0), run)


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True])
def test_two_gloo_ranks_follow_the_single_process_loss_curve(tmp_path, coco_captions, coco_images, grouped):
    """Across an epoch boundary; grouped: 3 images over 2 ranks, so one rank gets a pad unit per epoch."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from icsd.config import PairsConfig, TrainConfig
    from icsd.stages import pairs as pairs_stage
    from icsd.stages import train as train_stage

    items = coco_items(coco_captions, coco_images, 3)
    runs = {}
    for name in ("one", "two"):
        runs[name] = make_summary_run(tmp_path / name, items, shard_size=2)
        pairs_stage.run(PairsConfig(), runs[name])
    batch = 5 if grouped else 4
    flags = ["--preset", "tiny", "--device", "cpu", "--max-steps", "4", "--log-every", "1", "--save-every", "4",
             "--num-workers", "0", "--val-fraction", "0", "--lr", "2e-3", "--data-order", "official",
             "--group-captions" if grouped else "--no-group-captions"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "icsd.cli", "train", "-r", str(tmp_path / "two"), "--batch-size", str(batch), *flags]  # fmt: skip
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = TrainConfig(preset="tiny", device="cpu", max_steps=4, log_every=1, save_every=4, num_workers=0,
                      val_fraction=0, lr=2e-3, data_order="official", group_captions=grouped, batch_size=2 * batch)  # fmt: skip
    train_stage.run(cfg, runs["one"])

    def losses(run):
        return [json.loads(x)["loss"] for x in (run.train / "metrics.jsonl").read_text().splitlines()]

    one, two = losses(runs["one"]), losses(runs["two"])
    assert len(one) == len(two) == 4 and one[0] != one[-1]
    assert torch.allclose(torch.tensor(one), torch.tensor(two), rtol=1e-4, atol=1e-5), (one, two)
    w1 = load_file(str(runs["one"].train / "last" / "model.safetensors"))
    w2 = load_file(str(runs["two"].train / "last" / "model.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
