"""The Ray executor writes exactly what the inline executor writes (local Ray, 2 CPUs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from icsd.config import EmbedConfig, IngestConfig
from icsd.stages import embed, ingest
from icsd.store import RunDir, read_embeddings, sha256_file

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def make_run(root: Path, corpus: Path) -> RunDir:
    run = RunDir.at(root)
    ingest.run(IngestConfig(corpus=str(corpus)), run)
    return run


def test_embed_on_ray_equals_inline_byte_for_byte(local_ray, tmp_path: Path, coco_slice: Path, tiny_sentence_model: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = EmbedConfig(model=str(tiny_sentence_model), part_size=64, device="cpu")
    inline = make_run(tmp_path / "inline", coco_slice)
    on_ray = make_run(tmp_path / "ray", coco_slice)
    embed.run(cfg, inline)
    res = embed.run(cfg.model_copy(update={"executor": "ray", "workers": 2}), on_ray)
    assert res.counts["parts_computed"] == 5
    a_parts = sorted(inline.embeddings.glob("part-*.parquet"))
    b_parts = sorted(on_ray.embeddings.glob("part-*.parquet"))
    assert [p.name for p in a_parts] == [p.name for p in b_parts]
    assert [sha256_file(p) for p in a_parts] == [sha256_file(p) for p in b_parts]
    ids_a, a = read_embeddings(inline.embeddings)
    ids_b, b = read_embeddings(on_ray.embeddings)
    assert ids_a == ids_b and np.array_equal(a, b)
    again = embed.run(cfg.model_copy(update={"executor": "ray", "workers": 2}), on_ray)
    assert again.counts["parts_computed"] == 0 and again.counts["parts_skipped"] == 5


def test_render_on_ray_equals_inline_pixel_for_pixel(local_ray, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import io

    from PIL import Image

    from icsd.backends import t2i
    from icsd.config import RenderConfig
    from icsd.records import Selection, to_table
    from icsd.stages import render
    from icsd.store import done_shards, iter_shard_samples, write_parquet

    model = t2i.build_tiny_pipeline(tmp_path / "tiny-sd")
    rows = [Selection(f"g{i}", "ok", [f"g{i}"], f"a photo of thing {i} on a table") for i in range(5)]
    cfg = RenderConfig(model=str(model), steps=2, size=32, shard_size=2, batch_size=2, devices="cpu")
    runs = {}
    for name, extra in [("inline", {}), ("ray", {"executor": "ray", "workers": 2})]:
        rd = RunDir.at(tmp_path / name)
        write_parquet(to_table(rows, Selection), rd.selections)
        render.run(cfg.model_copy(update=extra), rd)
        runs[name] = rd
    pixels = {}
    for name, rd in runs.items():
        shards, unfinished = done_shards(rd.images)
        assert len(shards) == 3 and unfinished == 0
        pixels[name] = {
            s.item_id: np.asarray(Image.open(io.BytesIO(s.image or b""))) for sh in shards for s in iter_shard_samples(sh)
        }
    assert sorted(pixels["ray"]) == [f"g{i}" for i in range(5)]
    for item, img in pixels["inline"].items():
        assert np.array_equal(img, pixels["ray"][item]), item
    a = sorted(runs["inline"].images.glob("shard-*.tar"))
    b = sorted(runs["ray"].images.glob("shard-*.tar"))
    assert [sha256_file(p) for p in a] == [sha256_file(p) for p in b]
