"""Grouping: faiss search against brute-force numpy, self first, duplicate sets dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from icsd.config import GroupConfig
from icsd.errors import UserError
from icsd.knn import IndexSpec, candidate_sets, put_self_first, recall_at_k, unique_set_mask
from icsd.records import Candidate, Caption, embeddings_table, from_table, to_table
from icsd.stages import group
from icsd.store import RunDir, mark_done, write_parquet


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x: np.ndarray, k: int) -> np.ndarray:
    sims = x @ x.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_flat_matches_brute_force_and_puts_self_first() -> None:
    x = unit_vectors(500, 16)
    ids, scores, keep = candidate_sets(x, 10, IndexSpec("flat"), block_size=64)
    want = brute_force(x, 10)
    assert (ids[:, 0] == np.arange(500)).all()
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(want, axis=1))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores[:, 1:], axis=1) <= 1e-6).all()
    assert keep.all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall_on_clustered_data(kind: str) -> None:
    rng = np.random.default_rng(1)
    centres = unit_vectors(40, 32, seed=2)
    x = centres[rng.integers(0, 40, 2000)] + 0.3 * rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, _, _ = candidate_sets(x, 10, IndexSpec(kind, nprobe=16, ef_search=64), block_size=300)
    assert (ids[:, 0] == np.arange(2000)).all()
    assert recall_at_k(ids, brute_force(x, 10)) > 0.9


def test_self_inserted_when_search_missed_it() -> None:
    ids = np.array([[3, 4, 5], [0, 1, 2], [1, 0, 2]])
    scores = np.array([[0.9, 0.8, 0.7], [0.95, 0.9, 0.1], [0.9, 0.8, 0.7]], dtype=np.float32)
    put_self_first(ids, scores, np.ones(3, dtype=np.float32))
    assert ids.tolist() == [[0, 3, 4], [1, 0, 2], [2, 1, 0]]
    assert scores[0].tolist() == pytest.approx([1.0, 0.9, 0.8])
    assert scores[1].tolist() == pytest.approx([1.0, 0.95, 0.1])


def test_sets_equal_to_an_earlier_one_are_dropped() -> None:
    ids = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 3], [3, 2, 0]])
    assert unique_set_mask(ids).tolist() == [True, False, True, False]


def write_run(tmp_path: Path, x: np.ndarray) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    caps = [Caption(f"c/{i}", f"text {i}", "t") for i in range(len(x))]
    write_parquet(to_table(caps, Caption), run.captions)
    for p, start in enumerate(range(0, len(x), 40)):
        part = run.embeddings / f"part-{p:05d}.parquet"
        write_parquet(embeddings_table([c.caption_id for c in caps[start : start + 40]], x[start : start + 40]), part)
        mark_done(part, {})
    return run


def test_group_stage_writes_candidates(tmp_path: Path) -> None:
    x = unit_vectors(100, 8)
    x[7] = x[3]  # identical captions: identical neighbour sets, one dropped
    run = write_run(tmp_path, x)
    res = group.run(GroupConfig(k=5, block_size=17), run)
    cands = from_table(pq.read_table(run.candidates), Candidate)
    by_head = {c.group_id: c for c in cands}
    want = brute_force(x, 5)
    sets = [frozenset(row) for row in want]
    expected = sum(1 for i, s in enumerate(sets) if s not in sets[:i])
    assert res.counts["groups"] == len(cands) == expected < 100
    assert res.counts["duplicates_dropped"] == 100 - expected
    assert "c/7" not in by_head and "c/3" in by_head
    for c in cands:
        assert c.member_ids[0] == c.group_id and len(c.member_ids) == 5 == len(set(c.member_ids))
    assert set(by_head["c/0"].member_ids) == {f"c/{j}" for j in want[0]}


def test_group_reports_recall_for_approximate_index(tmp_path: Path) -> None:
    run = write_run(tmp_path, unit_vectors(200, 8))
    res = group.run(GroupConfig(k=5, index="hnsw", recall_sample=50), run)
    assert 0.0 < res.counts["recall_at_5"] <= 1.0


def test_k_larger_than_corpus(tmp_path: Path) -> None:
    run = write_run(tmp_path, unit_vectors(6, 4))
    group.run(GroupConfig(k=30), run)
    cands = from_table(pq.read_table(run.candidates), Candidate)
    assert all(len(c.member_ids) == 6 for c in cands)


def test_incomplete_embeddings_are_refused(tmp_path: Path) -> None:
    run = write_run(tmp_path, unit_vectors(100, 8))
    (run.embeddings / "part-00001.done.json").unlink()
    with pytest.raises(UserError, match="incomplete"):
        group.run(GroupConfig(k=5), run)
