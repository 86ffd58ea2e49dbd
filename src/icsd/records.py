"""The record types every stage reads and writes, and their Arrow schemas.

These are the contract of the run directory (see docs/architecture.md). A stage never reads
another stage's files except through the readers here and in :mod:`icsd.store`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa

SelectionStatus = Literal["ok", "parse_error", "invalid", "failed"]
PairKind = Literal["selected", "summary", "uni"]
SELECTION_STATUSES: tuple[str, ...] = ("ok", "parse_error", "invalid", "failed")
PAIR_KINDS: tuple[str, ...] = ("selected", "summary", "uni")


@dataclass(frozen=True)
class Caption:
    caption_id: str
    text: str
    source: str
    image_id: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Candidate:
    group_id: str
    member_ids: list[str]
    scores: list[float]


@dataclass(frozen=True)
class Selection:
    group_id: str
    status: str
    selected_ids: list[str] = field(default_factory=list)
    summary: str | None = None
    error: str | None = None
    model: str = ""
    prompt_hash: str = ""
    raw: str = ""


@dataclass(frozen=True)
class Score:
    image_key: str
    text: str
    clip_score: float


@dataclass(frozen=True)
class Pair:
    image_key: str
    shard: str
    caption: str
    kind: str


@dataclass(frozen=True)
class SampleMeta:
    """The ``<key>.json`` member of a rendered sample in ``images/shard-*.tar``: what was drawn
    (``summary``: the prompt; ``prompt_source``: summary | caption) and how (seed, model,
    scheduler, steps, guidance, size, negative prompt), and the NSFW flag (``None`` when no
    safety checker ran). Written only by :meth:`to_json`, read only by :meth:`from_json`."""

    id: str
    summary: str
    seed: int
    model: str
    steps: int
    guidance: float
    width: int
    height: int
    nsfw: bool | None
    prompt_source: str = "summary"
    scheduler: str | None = None
    negative_prompt: str | None = None
    safety_checker: bool = False
    untrained: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any], key: str | None = None) -> SampleMeta:
        """Parse a sample's JSON; ``key`` (the sample's ``__key__``) stands in for a missing ``id``.
        Unknown fields are ignored; a missing required one is a :class:`ValueError`."""
        raw = data if isinstance(data, dict) else json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError(f"sample JSON is not an object: {str(raw)[:80]}")
        if "id" not in raw and key is not None:
            raw = {**raw, "id": key}
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in raw and f.default is MISSING]
        if missing:
            raise ValueError(f"sample JSON lacks {', '.join(missing)}")
        values = {k: v for k, v in raw.items() if k in names}
        values["id"] = str(values["id"])
        values["summary"] = "" if values["summary"] is None else str(values["summary"])
        return cls(**values)


@dataclass(frozen=True)
class ImageSample:
    """One rendered sample of an ``images/shard-*.tar`` webdataset shard: its key, its shard, its
    :class:`SampleMeta` and (when read) the encoded image."""

    key: str
    shard: str
    meta: SampleMeta
    image: bytes | None = None
    image_ext: str | None = None

    @property
    def item_id(self) -> str:
        return self.meta.id

    def to_json(self) -> bytes:
        """The sample's ``.json`` member."""
        return self.meta.to_json()

    @classmethod
    def from_json(
        cls, key: str, shard: str, data: bytes | str, image: bytes | None = None, image_ext: str | None = None
    ) -> ImageSample:
        return cls(key, shard, SampleMeta.from_json(data, key), image, image_ext)


CAPTIONS_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("image_id", pa.string()),
        ("split", pa.string()),
    ]
)

CANDIDATES_SCHEMA = pa.schema(
    [
        ("group_id", pa.string()),
        ("member_ids", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
    ]
)

SELECTIONS_SCHEMA = pa.schema(
    [
        ("group_id", pa.string()),
        ("status", pa.string()),
        ("selected_ids", pa.list_(pa.string())),
        ("summary", pa.string()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("prompt_hash", pa.string()),
        ("raw", pa.string()),
    ]
)

SCORES_SCHEMA = pa.schema([("image_key", pa.string()), ("text", pa.string()), ("clip_score", pa.float32())])

PAIRS_SCHEMA = pa.schema(
    [("image_key", pa.string()), ("shard", pa.string()), ("caption", pa.string()), ("kind", pa.string())]
)


def embeddings_schema(dim: int) -> pa.Schema:
    """Schema of an embeddings part: one L2-normalised float32 vector per caption."""
    return pa.schema([("caption_id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


R = TypeVar("R", Caption, Candidate, Selection, Score, Pair)

SCHEMAS: dict[type, pa.Schema] = {
    Caption: CAPTIONS_SCHEMA,
    Candidate: CANDIDATES_SCHEMA,
    Selection: SELECTIONS_SCHEMA,
    Score: SCORES_SCHEMA,
    Pair: PAIRS_SCHEMA,
}


def to_table(records: Sequence[Any], cls: type) -> pa.Table:
    """Turn records of one type into an Arrow table with that type's schema."""
    schema = SCHEMAS[cls]
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for rec in records:
        for name, value in asdict(rec).items():
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=schema)


def from_table(table: pa.Table, cls: type[R]) -> list[R]:
    """Turn an Arrow table (with at least the type's columns) back into records."""
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing} needed for {cls.__name__}")
    cols = {n: table.column(n).to_pylist() for n in names}
    return [cls(**{n: cols[n][i] for n in names}) for i in range(table.num_rows)]


def embeddings_table(caption_ids: Sequence[str], vectors: np.ndarray) -> pa.Table:
    """An embeddings part from ids and an (n, dim) float32 matrix."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n != len(caption_ids):
        raise ValueError(f"{len(caption_ids)} ids but {n} vectors")
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    vec = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_arrays([pa.array(list(caption_ids), type=pa.string()), vec], schema=embeddings_schema(dim))


def embeddings_from_table(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """Ids and an (n, dim) float32 matrix from an embeddings table, without copying row by row."""
    ids = table.column("caption_id").to_pylist()
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, values.reshape(-1, dim)


def iter_batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """Consecutive lists of at most ``size`` items."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
