"""Nearest-neighbour candidate sets with faiss: exact flat search, IVF or HNSW, in query blocks.

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


def candidate_sets(
    vectors: np.ndarray,
    k: int,
    spec: IndexSpec,
    block_size: int = 8192,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, scores, keep): top-k per row with itself first, and the mask of non-duplicate sets."""
    k = min(k, vectors.shape[0])
    index = build_index(vectors, spec)
    scores, ids = search_blocks(index, vectors, k, block_size, progress)
    self_scores = np.einsum("ij,ij->i", vectors, vectors)
    put_self_first(ids, scores, self_scores)
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
