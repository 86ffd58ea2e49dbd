"""Nearest-neighbour candidate sets: faiss (exact flat search, IVF or HNSW) in query blocks on the
CPU, or exact search by blocked matrix products in torch on a GPU (or the CPU, for tests).

Vectors are L2-normalised, so inner product is cosine. Each row's candidate set is its top-K
neighbours with the row itself first; sets whose members equal an earlier set's are dropped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IndexSpec:
    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128


def set_threads(threads: int | None) -> None:
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)


def default_nlist(n: int) -> int:
    return max(1, min(n // 39, int(4 * math.sqrt(n))))


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> object:
    """A faiss inner-product index over ``vectors`` of the requested kind."""
    import faiss

    n, dim = vectors.shape
    index: Any
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "ivf":
        nlist = spec.nlist or default_nlist(n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = vectors if n <= 64 * nlist else vectors[rng.choice(n, 64 * nlist, replace=False)]
        index.train(np.ascontiguousarray(train))
        index.nprobe = min(spec.nprobe, nlist)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    else:
        raise ValueError(f"unknown index kind {spec.kind!r}")
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def search_blocks(
    index: object,
    vectors: np.ndarray,
    k: int,
    block_size: int = 8192,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) for every row of ``vectors``, searched ``block_size`` rows at a time."""
    n = vectors.shape[0]
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, block_size):
        block = np.ascontiguousarray(vectors[start : start + block_size])
        d, i = index.search(block, k)  # type: ignore[attr-defined]
        scores[start : start + len(block)] = d
        ids[start : start + len(block)] = i
        if progress:
            progress(len(block))
    return scores, ids


def put_self_first(ids: np.ndarray, scores: np.ndarray, self_scores: np.ndarray, offset: int = 0) -> None:
    """In place: row ``r`` starts with its own id ``offset + r``; if the search missed it (approximate
    index), it is inserted first and the last neighbour dropped. Padding ids (-1) stay at the end."""
    n, k = ids.shape
    own = np.arange(offset, offset + n, dtype=np.int64)
    for r in np.flatnonzero(ids[:, 0] != own):
        row = ids[r]
        hits = np.flatnonzero(row == own[r])
        pos = int(hits[0]) if hits.size else k - 1
        if pos == 0 and hits.size:
            continue
        ids[r, 1 : pos + 1] = row[:pos].copy()
        scores[r, 1 : pos + 1] = scores[r, :pos].copy()
        ids[r, 0] = own[r]
        scores[r, 0] = self_scores[r]


def unique_set_mask(ids: np.ndarray) -> np.ndarray:
    """True for rows whose member set (order ignored) differs from every earlier row's."""
    seen: set[bytes] = set()
    keep = np.zeros(ids.shape[0], dtype=bool)
    ordered = np.sort(ids, axis=1)
    for r in range(ids.shape[0]):
        key = hashlib.blake2b(ordered[r].tobytes(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            keep[r] = True
    return keep


def merge_by_first_hit(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official grouping (preprocess/preprocess_for_chatgpt.py:16-19 of the ICSD code): every
    row is keyed on its first hit, and rows sharing a key are joined, in row order, into one set.
    Returns ``(rows, sizes)``: the row indices, set by set in the order of each key's first row,
    and how many rows each set joins."""
    if ids.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, first_row, inverse = np.unique(ids[:, 0], return_index=True, return_inverse=True)
    rank = np.empty(len(first_row), dtype=np.int64)
    rank[np.argsort(first_row, kind="stable")] = np.arange(len(first_row))
    set_of_row = rank[inverse.reshape(-1)]
    return np.argsort(set_of_row, kind="stable"), np.bincount(set_of_row)


def candidate_sets(
    vectors: np.ndarray,
    k: int,
    spec: IndexSpec,
    block_size: int = 8192,
    progress: Callable[[int], None] | None = None,
    self_first: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, scores, keep): top-k per row with itself first (``self_first``; else in search order),
    and the mask of non-duplicate sets."""
    k = min(k, vectors.shape[0])
    index = build_index(vectors, spec)
    scores, ids = search_blocks(index, vectors, k, block_size, progress)
    if self_first:
        put_self_first(ids, scores, np.einsum("ij,ij->i", vectors, vectors))
    return ids, scores, unique_set_mask(ids)


def torch_topk(
    vectors: np.ndarray,
    k: int,
    device: str = "cpu",
    precision: str = "fp32",
    block_size: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, ids) of every row against all rows, by blocked matrix products and
    ``torch.topk`` on ``device``. ``fp32``: scores in full fp32 (TF32 off). ``bf16``: a bf16 pass
    keeps ``4k`` candidates per row, which are re-ranked with fp32 dot products (a true neighbour is
    lost only when more than ``4k`` rows score within bf16's rounding of the k-th). Rows are sorted by
    score, equal scores by id (lower first, while fewer than 8 further rows share the k-th score):
    deterministic, but faiss may break an exact tie at the k-th place the other way."""
    import torch

    n = vectors.shape[0]
    k = min(k, n)
    keep = min(n, k + 8 if precision == "fp32" else 4 * k)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
    xs = x if dtype == torch.float32 else x.to(dtype)
    chunk = max(keep, min(n, (1 << 28) // max(1, block_size)))  # block x chunk fp32 scores <= 1 GiB
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode():
            for start in range(0, n, block_size):
                q = xs[start : start + block_size]
                best_s: torch.Tensor | None = None
                best_i: torch.Tensor | None = None
                for c0 in range(0, n, chunk):
                    sims = (q @ xs[c0 : c0 + chunk].T).float()
                    s, i = torch.topk(sims, min(keep, sims.shape[1]), dim=1)
                    i += c0
                    if best_s is not None and best_i is not None:
                        s, j = torch.topk(
                            torch.cat([best_s, s], 1), min(keep, best_s.shape[1] + s.shape[1]), dim=1
                        )
                        i = torch.gather(torch.cat([best_i, i], 1), 1, j)
                    best_s, best_i = s, i
                assert best_s is not None and best_i is not None
                if dtype != torch.float32:  # re-rank the bf16 candidates in fp32
                    best_s = torch.einsum("bd,bkd->bk", x[start : start + block_size], x[best_i])
                best_s, best_i = ranked(best_s, best_i, k)
                rows = best_s.shape[0]
                scores[start : start + rows] = best_s.cpu().numpy()
                ids[start : start + rows] = best_i.cpu().numpy()
                if progress:
                    progress(rows)
    finally:
        torch.set_float32_matmul_precision(previous)
    return scores, ids


def ranked(scores: Any, ids: Any, k: int) -> tuple[Any, Any]:
    """The first ``k`` of each row by score (descending), equal scores by id (ascending)."""
    import torch

    by_id = torch.argsort(ids, dim=1)
    scores, ids = torch.gather(scores, 1, by_id), torch.gather(ids, 1, by_id)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(scores, 1, order), torch.gather(ids, 1, order)


def torch_candidate_sets(
    vectors: np.ndarray,
    k: int,
    device: str = "cpu",
    precision: str = "fp32",
    block_size: int = 4096,
    progress: Callable[[int], None] | None = None,
    self_first: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`candidate_sets` of exact search in torch (any device)."""
    scores, ids = torch_topk(vectors, k, device, precision, block_size, progress)
    if self_first:
        put_self_first(ids, scores, np.einsum("ij,ij->i", vectors, vectors))
    return ids, scores, unique_set_mask(ids)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each exact top-k row found in the approximate row."""
    hits = [len(np.intersect1d(a, e)) / exact.shape[1] for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors))
    _, ids = index.search(np.ascontiguousarray(queries), k)
    return ids
