"""Exact grouping in torch (the GPU path, run here on the CPU) against faiss flat search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_group import unit_vectors, write_run

from icsd.config import GroupConfig
from icsd.errors import UserError
from icsd.knn import IndexSpec, candidate_sets, torch_candidate_sets
from icsd.stages import group

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clustered(n: int, d: int, seed: int = 0, duplicates: bool = True) -> np.ndarray:
    """Paraphrase-like clusters, with exact duplicates (identical captions) if asked."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 20, d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    if duplicates:
        x[10] = x[3]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_candidate_sets_equal_faiss_flat(precision: str) -> None:
    x = clustered(1200, 48)
    want_ids, want_scores, want_keep = candidate_sets(x, 30, IndexSpec("flat"), block_size=256)
    ids, scores, keep = torch_candidate_sets(x, 30, "cpu", precision, block_size=100)
    assert (ids[:, 0] == np.arange(len(x))).all()
    # the same member sets in every row; no exactly tied scores at the K-th place in this data
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(want_ids, axis=1))
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(keep, want_keep)
    assert not keep[10] and keep[3]  # the duplicate caption's set equals an earlier one: dropped


def test_database_chunks_merge_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    x = unit_vectors(300, 8)
    whole = torch_candidate_sets(x, 12, "cpu", "fp32", block_size=1000)
    tiny = torch_candidate_sets(x, 12, "cpu", "fp32", block_size=7)  # many query blocks and db chunks
    np.testing.assert_array_equal(np.sort(whole[0], axis=1), np.sort(tiny[0], axis=1))


def test_group_stage_through_torch_writes_the_faiss_candidates(tmp_path: Path) -> None:
    x = clustered(200, 16, duplicates=False)  # exact ties at the K-th place may break either way
    faiss_run = write_run(tmp_path / "faiss", x)
    torch_run = write_run(tmp_path / "torch", x)
    a = group.run(GroupConfig(k=8), faiss_run)
    b = group.run(GroupConfig(k=8, device="torch-cpu", block_size=33), torch_run)
    assert a.counts == b.counts
    ta, tb = pq.read_table(faiss_run.candidates).to_pylist(), pq.read_table(torch_run.candidates).to_pylist()
    assert [r["group_id"] for r in ta] == [r["group_id"] for r in tb]
    for ra, rb in zip(ta, tb, strict=True):
        assert ra["member_ids"][0] == rb["member_ids"][0] and set(ra["member_ids"]) == set(rb["member_ids"])


def test_device_settings_are_checked(tmp_path: Path) -> None:
    import torch

    run = write_run(tmp_path, unit_vectors(50, 8))
    with pytest.raises(UserError, match="exact search"):
        group.run(GroupConfig(k=5, device="torch-cpu", index="hnsw"), run)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no GPU"):
            group.run(GroupConfig(k=5, device="cuda"), run)
    with pytest.raises(ValueError):
        GroupConfig(device="tpu")
