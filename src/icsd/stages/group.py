"""Stage 3, group: each caption's top-K neighbours by cosine form a candidate set.

The head caption comes first; sets whose members equal an earlier set's are dropped
(``duplicates: drop``), or, as the official code does (``duplicates: merge``), each set is keyed on
its first hit and sets sharing it are joined into one. faiss does
the search on the CPU: exact ``flat`` by default, ``ivf`` or ``hnsw``, with their recall@K against
exact search measured on a sample when ``recall_sample`` > 0. ``device: cuda`` searches exactly by
blocked matrix products in torch on the GPU, the path for large corpora (``torch-cpu``: the same
code on the CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..config import GroupConfig
from ..console import progress_bar
from ..errors import UserError
from ..knn import (
    IndexSpec,
    candidate_sets,
    exact_topk,
    merge_by_first_hit,
    recall_at_k,
    set_threads,
    torch_candidate_sets,
)
from ..records import CANDIDATES_SCHEMA
from ..store import RunDir, read_embeddings, read_parquet, write_parquet
from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage, multi_context

if TYPE_CHECKING:
    from ..rehearse.hooks import Row, StageRehearsal


def candidates_table(
    ids: list[str], member_idx: np.ndarray, scores: np.ndarray, rows: np.ndarray, sizes: np.ndarray | None = None
) -> pa.Table:
    """Arrow table of the candidate sets, built column-wise (no per-row Python lists): the search
    rows ``rows``, one set per row, or with ``sizes`` set ``g`` joining the next ``sizes[g]`` rows
    (members concatenated, the set named by its first row's first hit)."""
    sizes = np.ones(len(rows), dtype=np.int64) if sizes is None else sizes
    members = member_idx[rows]
    valid = members >= 0
    starts = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    counts = np.add.reduceat(valid.sum(axis=1), starts) if len(rows) else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    id_array = pa.array(ids, type=pa.string())
    flat_members = id_array.take(pa.array(members[valid]))
    flat_scores = pa.array(scores[rows][valid].astype(np.float32))
    return pa.Table.from_arrays(
        [
            id_array.take(pa.array(members[starts, 0] if len(rows) else np.zeros(0, dtype=np.int64))),
            pa.ListArray.from_arrays(pa.array(offsets), flat_members),
            pa.ListArray.from_arrays(pa.array(offsets), flat_scores),
        ],
        schema=CANDIDATES_SCHEMA,
    )


def measure_recall(vectors: np.ndarray, approx_ids: np.ndarray, k: int, sample: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(vectors.shape[0], min(sample, vectors.shape[0]), replace=False))
    exact = exact_topk(vectors, vectors[rows], k)
    return recall_at_k(np.sort(approx_ids[rows], axis=1), np.sort(exact, axis=1))


def search_device(setting: str) -> str | None:
    """The torch device of an exact search, or None for faiss on the CPU."""
    if setting == "cpu":
        return None
    if setting == "torch-cpu":
        return "cpu"
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else None
    if not torch.cuda.is_available():
        raise UserError(f"--device {setting} was asked for but no GPU is visible (--device cpu uses faiss)")
    return setting


def run(cfg: GroupConfig, run: RunDir) -> StageResult:
    timer = Timer()
    set_threads(cfg.threads)
    captions = read_parquet(run.captions, "captions.parquet (run `icsd ingest` first)")
    ids, vectors = read_embeddings(run.embeddings)
    if ids != captions.column("caption_id").to_pylist():
        raise UserError("embeddings do not match captions.parquet (run `icsd embed` again)")
    spec = IndexSpec(
        kind=cfg.index,
        nlist=cfg.nlist,
        nprobe=cfg.nprobe,
        hnsw_m=cfg.hnsw_m,
        ef_construction=cfg.ef_construction,
        ef_search=cfg.ef_search,
    )
    device = search_device(cfg.device)
    if device is not None and cfg.index != "flat":
        raise UserError(f"--device {cfg.device} runs exact search; --index {cfg.index} is a faiss index for --device cpu")
    label = cfg.index if device is None else f"exact, torch on {device}, {cfg.precision}"
    merge = cfg.duplicates == "merge"
    with progress_bar(len(ids), f"group ({label})", "cap") as bar:
        if device is None:
            member_idx, scores, keep = candidate_sets(vectors, cfg.k, spec, cfg.block_size, bar.update, not merge)
        else:
            member_idx, scores, keep = torch_candidate_sets(
                vectors, cfg.k, device, cfg.precision, cfg.block_size, bar.update, not merge
            )
    if merge:
        rows, sizes = merge_by_first_hit(member_idx)
        table = candidates_table(ids, member_idx, scores, rows, sizes)
        joined = {"sets_merged": int(len(rows) - len(sizes))}
    else:
        table = candidates_table(ids, member_idx, scores, np.flatnonzero(keep))
        joined = {"duplicates_dropped": int((~keep).sum())}
    write_parquet(table, run.candidates)
    counts: dict[str, Any] = {"captions": len(ids), "groups": table.num_rows, **joined, "k": int(member_idx.shape[1])}
    if cfg.index != "flat" and cfg.recall_sample > 0:
        counts[f"recall_at_{counts['k']}"] = round(
            measure_recall(vectors, member_idx, counts["k"], cfg.recall_sample), 4
        )
    return finish_stage(
        run,
        "group",
        cfg,
        counts=counts,
        seconds=timer.seconds,
        output=run.candidates,
    )


# ----------------------------------------------------------------------------- rehearsal


def _rehearsal_project(ctx: StageRehearsal) -> Row:
    """Exact search at full size: 2 N^2 d FLOP at this machine's matmul rate, measured now."""
    from ..rehearse.hooks import parquet_rows, per
    from ..rehearse.measure import matmul_flops_per_s

    assert ctx.record is not None
    captions = parquet_rows(ctx.run.captions) or 1
    full = int(ctx.size("captions") or 0)
    dim = 512
    try:
        _, vectors = read_embeddings(ctx.run.embeddings)
        dim = int(vectors.shape[1])
    except Exception:  # noqa: BLE001 - the projection keeps CLIP's width
        pass
    cfg = ctx.configured
    work = 2.0 * full * full * dim if cfg.index == "flat" else None
    flops = matmul_flops_per_s() if work else None
    return ctx.row(settings={"k": cfg.k, "index": cfg.index}, unit="caption", units=captions,
                   seconds_per_unit=per(ctx.record.seconds, captions), full_units=full,
                   projected_seconds=(work / flops) if work and flops else None,
                   projection=f"exact search: 2 N^2 x {dim} FLOP at this machine's matmul rate "
                              f"({flops / 1e9:.0f} GFLOP/s)" if work and flops else "approximate index: not projected")  # fmt: skip


SPEC = StageSpec(
    name="group",
    wanted=multi_context,
    report_counts=(("groups", "candidate sets"), ("duplicates_dropped", "duplicate sets dropped")),
    rehearsal=RehearsalHooks(project=_rehearsal_project),
    config=GroupConfig,
    run=run,
    inputs=lambda cfg, run: [run.captions, run.embeddings],
    outputs=lambda run: [run.candidates],
    summary="Form candidate sets: each caption's top-K neighbours by cosine, duplicates dropped.",
    examples=(
        "icsd group --run runs/coco --k 30",
        "icsd group --run runs/big --index hnsw --recall-sample 2000",
        "icsd group --run runs/big --index ivf --nlist 4096 --nprobe 64",
        "icsd group --run runs/big --device cuda            # exact, on the GPU: large corpora",
    ),
)
