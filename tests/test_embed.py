"""Embedding: tiny random sentence model, the packaged MiniLM, resume after an interrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from icsd.backends import embedders
from icsd.config import EmbedConfig, IngestConfig
from icsd.errors import UserError
from icsd.stages import embed, ingest
from icsd.store import RunDir, read_embeddings


def make_run(tmp_path: Path, n: int = 50) -> RunDir:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"caption number {i} shows {'a dog' if i % 2 else 'a cat'}" for i in range(n)))
    run = RunDir.at(tmp_path / "run")
    ingest.run(IngestConfig(corpus=str(corpus)), run)
    return run


def test_vectors_are_normalised_float32_in_caption_order(tmp_path: Path, tiny_sentence_model: Path) -> None:
    run = make_run(tmp_path)
    res = embed.run(EmbedConfig(model=str(tiny_sentence_model), part_size=16, batch_size=8), run)
    ids, mat = read_embeddings(run.embeddings)
    assert ids == [str(i) for i in range(1, 51)]
    assert mat.dtype == np.float32 and mat.shape == (50, 32)
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, atol=1e-5)
    assert res.counts["parts"] == 4 and res.counts["parts_computed"] == 4
    direct = embedders.load_embedder(str(tiny_sentence_model)).embed(["caption number 0 shows a cat"])
    np.testing.assert_allclose(mat[0], direct[0], atol=1e-5)
    entry = run.stage_entry("embed")
    assert entry and entry["models"]["embedder"]["dim"] == 32


def test_rerun_skips_done_parts(tmp_path: Path, tiny_sentence_model: Path) -> None:
    run = make_run(tmp_path)
    cfg = EmbedConfig(model=str(tiny_sentence_model), part_size=16)
    embed.run(cfg, run)
    again = embed.run(cfg, run)
    assert again.counts["parts_computed"] == 0 and again.counts["parts_skipped"] == 4


def test_resume_after_interrupted_embed(
    tmp_path: Path, tiny_sentence_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = make_run(tmp_path / "ref")
    cfg = EmbedConfig(model=str(tiny_sentence_model), part_size=10, batch_size=5)
    embed.run(cfg, reference)
    _, want = read_embeddings(reference.embeddings)

    run = make_run(tmp_path / "killed")
    real = embedders.SentenceTransformerEmbedder.embed
    calls = {"n": 0}

    def dying(self, texts, progress=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, texts, progress)

    monkeypatch.setattr(embedders.SentenceTransformerEmbedder, "embed", dying)
    with pytest.raises(KeyboardInterrupt):
        embed.run(cfg, run)
    monkeypatch.setattr(embedders.SentenceTransformerEmbedder, "embed", real)
    done = sorted(p.name for p in run.embeddings.glob("*.done.json"))
    assert done == ["part-00000.done.json", "part-00001.done.json"]
    assert not list(run.embeddings.glob(".*.tmp"))

    resumed = embed.run(cfg, run)
    assert resumed.counts["parts_skipped"] == 2 and resumed.counts["parts_computed"] == 3
    _, got = read_embeddings(run.embeddings)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_changed_captions_invalidate_parts(tmp_path: Path, tiny_sentence_model: Path) -> None:
    run = make_run(tmp_path, n=30)
    cfg = EmbedConfig(model=str(tiny_sentence_model), part_size=10)
    embed.run(cfg, run)
    corpus = tmp_path / "c2.txt"
    corpus.write_text("\n".join(f"caption number {i} shows a dog" for i in range(12)))
    ingest.run(IngestConfig(corpus=str(corpus)), run)
    res = embed.run(cfg, run)
    ids, mat = read_embeddings(run.embeddings)
    assert len(ids) == 12 and mat.shape[0] == 12
    assert res.counts["parts"] == 2 and res.counts["parts_computed"] == 2
    assert not (run.embeddings / "part-00002.parquet").exists()


@pytest.mark.slow
def test_process_pool_gives_the_same_vectors(tmp_path: Path, tiny_sentence_model: Path) -> None:
    inline = make_run(tmp_path / "inline", n=40)
    pooled = make_run(tmp_path / "pool", n=40)
    embed.run(EmbedConfig(model=str(tiny_sentence_model), part_size=10, device="cpu"), inline)
    embed.run(
        EmbedConfig(model=str(tiny_sentence_model), part_size=10, device="cpu", executor="process", workers=2),
        pooled,
    )
    a = read_embeddings(inline.embeddings)
    b = read_embeddings(pooled.embeddings)
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_packaged_minilm_offline(tmp_path: Path) -> None:
    run = make_run(tmp_path, n=8)
    embed.run(EmbedConfig(), run)
    _, mat = read_embeddings(run.embeddings)
    assert mat.shape == (8, 384)
    emb = embedders.load_embedder("sentence-transformers/all-MiniLM-L6-v2")
    v = emb.embed(["a dog runs on the beach", "a puppy running along the shore", "a plate of pasta"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_missing_model_path_is_user_error(tmp_path: Path) -> None:
    run = make_run(tmp_path, n=4)
    with pytest.raises(UserError, match="does not exist"):
        embed.run(EmbedConfig(model=str(tmp_path / "no_such_model")), run)


def test_embed_before_ingest_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="icsd ingest"):
        embed.run(EmbedConfig(), RunDir.at(tmp_path / "empty"))
