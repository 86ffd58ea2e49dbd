"""CLIP scoring of rendered images, and the CLIP text tower as an embedder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from icsd.backends.embedders import load_embedder
from icsd.config import ScoreConfig
from icsd.errors import UserError
from icsd.records import Caption, SampleMeta, Selection, to_table
from icsd.stages import score
from icsd.store import RunDir, mark_done, write_parquet


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_run(tmp_path: Path, coco_images: Path) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    caps = [Caption(str(i), f"caption {i}", "t") for i in range(6)]
    write_parquet(to_table(caps, Caption), run.captions)
    sels = [Selection("0", "ok", ["0", "1", "2"], "a summary of zero"), Selection("3", "ok", ["3", "4"], "summary three")]
    write_parquet(to_table(sels, Selection), run.selections)
    jpgs = sorted(coco_images.glob("*.jpg"))[:3]
    shard = run.images / "shard-00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for key, src, jpg in [("0", "summary", jpgs[0]), ("3", "summary", jpgs[1]), ("5", "caption", jpgs[2])]:
            add(tar, f"{key}.jpg", jpg.read_bytes())
            meta = SampleMeta(key, "p", 0, "m", 1, 7.5, 64, 64, None, prompt_source=src)
            add(tar, f"{key}.json", meta.to_json())
    mark_done(shard, {"count": 3})
    (run.images / "shard-00001.tar").write_bytes(b"truncated, no marker")
    return run


def test_scores_per_image_and_text(tmp_path: Path, coco_images: Path, tiny_clip_model: Path) -> None:
    run = make_run(tmp_path, coco_images)
    res = score.run(ScoreConfig(model=str(tiny_clip_model), batch_size=2, device="cpu"), run)
    rows = pq.read_table(run.scores).to_pylist()
    by_key: dict[str, list[str]] = {}
    for r in rows:
        by_key.setdefault(r["image_key"], []).append(r["text"])
        assert -1.0 <= r["clip_score"] <= 1.0
    assert by_key == {
        "0": ["a summary of zero", "caption 0", "caption 1", "caption 2"],
        "3": ["summary three", "caption 3", "caption 4"],
        "5": ["caption 5"],
    }
    assert res.counts["images"] == 3 and res.counts["unfinished_shards"] == 1
    assert len({r["clip_score"] for r in rows}) > 1


def test_score_needs_model_and_images(tmp_path: Path, tiny_clip_model: Path) -> None:
    with pytest.raises(UserError, match="no CLIP model"):
        score.run(ScoreConfig(), RunDir.at(tmp_path / "a"))
    with pytest.raises(UserError, match="no finished image shards"):
        score.run(ScoreConfig(model=str(tiny_clip_model)), RunDir.at(tmp_path / "b"))


def test_clip_text_tower_embedder(tiny_clip_model: Path) -> None:
    emb = load_embedder(str(tiny_clip_model), device="cpu", batch_size=2)
    assert emb.describe()["kind"] == "clip"
    texts = ["a dog on a beach", "two cats", "a very long caption " * 30]
    vecs = emb.embed(texts)
    assert vecs.shape == (3, 16) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb.embed(texts[:1])[0], vecs[0], atol=1e-5)
