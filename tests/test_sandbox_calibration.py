"""The sandbox world's corpus stays calibrated to COCO's (docs/sandbox.md, "Calibration"): the same
statistics, the same packaged embedder, real COCO captions from tests/data at the same size."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from icsd.sandbox.calibrate import (
    TOLERANCES,
    Corpus,
    coco_corpus,
    coco_objects,
    comparison_rows,
    corpus_statistics,
    neighbours,
    within_tolerance,
    world_objects,
)
from icsd.sandbox.experiment import decide, paired_difference
from icsd.sandbox.world import random_scene, scene_captions

COCO = Path(__file__).parent / "data" / "coco" / "captions_val2017_subset.json"
SCENES = 300  # 1,500 captions a side: the statistics at this size stay within tolerance of COCO's


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    from icsd.backends.embedders import load_embedder

    return load_embedder("sentence-transformers/all-MiniLM-L6-v2", batch_size=256)


def world_sample(seed: int, scenes: int) -> Corpus:
    rng = random.Random(seed)
    ids, captions = [], []
    for k in range(scenes):
        scene = random_scene(rng)
        for caption in scene_captions(scene, rng):
            ids.append(str(k))
            captions.append(caption)
    return Corpus(ids, captions)


def test_coco_object_words() -> None:
    assert coco_objects("A man riding a wave on top of a surfboard.") == {"person", "surfboard"}
    assert coco_objects("Two tennis balls and an orange cat") == {"sports ball", "cat"}  # orange: a colour
    assert coco_objects("a kitchen with a stove and two oranges") == {"oven", "orange"}
    assert world_objects("two red kites and a tree on the grass") == {"kite", "tree"}


def test_statistics_on_a_corpus_built_to_known_values() -> None:
    """Three images whose captions are identical within an image and orthogonal across images."""
    ids = [str(i) for i in range(3) for _ in range(2)]
    captions = ["a dog", "a dog", "a cat and a dog", "a cat and a dog", "a pizza", "a pizza"]
    vectors = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)
    stats = corpus_statistics(Corpus(ids, captions), vectors, coco_objects, k=2)
    assert stats["same_image_in_top_k"] == 1.0 and stats["nn_same_image"] == 1.0
    assert stats["within_minus_kth"] == pytest.approx(1.0)  # within 1, the 2nd neighbour 0
    assert stats["objects_per_caption"] == pytest.approx(8 / 6) and stats["salience"] == 1.0
    idx, sims = neighbours(vectors, 2)
    assert idx[0, 0] == 1 and sims[0, 0] == pytest.approx(1.0)


def test_the_world_corpus_stays_within_tolerance_of_coco(embedder) -> None:  # type: ignore[no-untyped-def]
    """Fails when a change of the world moves any statistic out of its stated tolerance."""
    world = world_sample(0, SCENES)
    coco = coco_corpus(COCO).sample_images(SCENES, 5, seed=0)
    w = corpus_statistics(world, embedder.embed(world.captions), world_objects)
    c = corpus_statistics(coco, embedder.embed(coco.captions), coco_objects)
    rows = comparison_rows(w, c)
    assert [r["statistic"] for r in rows] == list(TOLERANCES)
    assert all(r["ok"] for r in rows), [(r["statistic"], round(r["world"], 3), round(r["coco"], 3)) for r in rows]
    # and the old, uncalibrated property is gone: a caption's own scene beats its 29th neighbour
    assert w["within_minus_kth"] > 0 and w["same_image_in_top_k"] > 0.5


def test_tolerance_rules() -> None:
    assert within_tolerance("same_image_in_top_k", 0.6, 0.75) and not within_tolerance("same_image_in_top_k", 0.5, 0.75)
    assert within_tolerance("within_minus_kth", 0.07, 0.116) and not within_tolerance("within_minus_kth", 0.0, 0.116)


def test_paired_difference_and_decision() -> None:
    a = {0: 0.60, 1: 0.62, 2: 0.61, 3: 0.63, 4: 0.64}
    b = {0: 0.50, 1: 0.51, 2: 0.52, 3: 0.50, 4: 0.53}
    diff = paired_difference(a, b)
    assert diff["seeds"] == [0, 1, 2, 3, 4] and diff["mean"] == pytest.approx(0.108)
    lo, hi = diff["ci"]
    assert 0 < lo < diff["mean"] < hi and decide(diff) == "ICSD better"
    assert decide(paired_difference(b, a)) == "uni-context better"
    assert decide(paired_difference({0: 0.5, 1: 0.6}, {0: 0.55, 1: 0.55})) == "no difference shown"
    with pytest.raises(ValueError):
        paired_difference({0: 1.0}, {0: 0.5})
