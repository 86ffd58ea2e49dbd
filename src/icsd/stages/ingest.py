"""Stage 1, ingest: read a caption corpus into ``RUN/captions.parquet``.

Readers: COCO caption annotations, Karpathy split JSON and Flickr token files (read by
:mod:`icsd.formats`, which fixes every image id), plain text, JSONL, CSV and Parquet. Every caption is whitespace-normalised; empty, over-long and duplicate-id records are
dropped and counted by reason. Bad input is one :class:`UserError` naming the file and the record,
and nothing is written.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import IngestConfig
from ..errors import UserError
from ..formats import (
    FLICKR_TOKEN_LINE,
    CaptionEntry,
    coco_caption_entries,
    detect_format,
    flickr_caption_entries,
    karpathy_caption_entries,
    read_json_file,
)
from ..records import Caption, to_table
from ..store import RunDir, write_parquet
from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage

if TYPE_CHECKING:
    from ..rehearse.hooks import Row, StageRehearsal

MAX_CAPTION_CHARS = 2000


@dataclass(frozen=True)
class RawCaption:
    """One record as read, before normalisation. ``where`` names it in error messages."""

    caption_id: str
    text: Any
    image_id: str | None
    split: str | None
    where: str


# ----------------------------------------------------------------------------- normalisation


def normalise_text(text: str) -> str:
    """Collapse whitespace and drop control characters (NUL, escape codes, ...)."""
    cleaned = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    return " ".join(cleaned.split())


# ----------------------------------------------------------------------------- format detection


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (line {line}, byte {exc.start})") from None


def _load_json(path: Path) -> Any:
    return read_json_file(path, "corpus")


def corpus_format(path: Path) -> str:
    """Guess the corpus format from the extension and, for text, the content; JSON files by
    :func:`icsd.formats.detect_format` (NoCaps captions read as COCO)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        kind = detect_format(_load_json(path), path)
        if kind == "jsonl":
            raise UserError(f"{path}: a JSON list is not a caption corpus; write it as JSON lines (.jsonl) or pass --format")
        return "coco" if kind == "nocaps" else kind
    with open(path, "rb") as fh:
        head = fh.read(65536).decode("utf-8", errors="replace")
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    if FLICKR_TOKEN_LINE.match(first):
        return "flickr-token"
    if first.lstrip().startswith("{"):
        return "jsonl"
    return "txt"


def _entries(entries: Iterator[CaptionEntry]) -> Iterator[RawCaption]:
    for e in entries:
        yield RawCaption(e.caption_id, e.text, e.image_id, e.split, e.where)


def read_coco(path: Path, cfg: IngestConfig) -> Iterator[RawCaption]:
    return _entries(coco_caption_entries(path, _load_json(path)))


def read_karpathy(path: Path, cfg: IngestConfig) -> Iterator[RawCaption]:
    return _entries(karpathy_caption_entries(path, _load_json(path), cfg.splits))


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: line {lineno} is not UTF-8") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            yield lineno, line.rstrip("\r\n")


def read_flickr_token(path: Path, cfg: IngestConfig) -> Iterator[RawCaption]:
    return _entries(flickr_caption_entries(path, _text_lines(path)))


def read_txt(path: Path, cfg: IngestConfig) -> Iterator[RawCaption]:
    for lineno, line in _text_lines(path):
        yield RawCaption(str(lineno), line, None, None, f"{path}: line {lineno}")


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise UserError(f"{where}: missing field '{name}' (choose one with --field)")
    return row[name]


def _rows_to_raw(rows: Iterator[tuple[str, Any]], cfg: IngestConfig) -> Iterator[RawCaption]:
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with field '{cfg.field}'")
        text = _field(row, cfg.field, where)
        cid = str(_field(row, cfg.id_field, where)) if cfg.id_field else str(index)
        image = row.get(cfg.image_field) if cfg.image_field else None
        yield RawCaption(cid, text, None if image is None else str(image), None, where)


def read_jsonl(path: Path, cfg: IngestConfig) -> Iterator[RawCaption]:
    def rows() -> Iterator[tuple[str, Any]]:
        for lineno, line in _text_lines(path):
            if not line.strip():
                continue
            try:
                yield f"{path}: line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {lineno} is malformed JSON at column {exc.colno}: {exc.msg}") from None

    return _rows_to_raw(rows(), cfg)


def read_csv(path: Path, cfg: IngestConfig) -> Iterator[RawCaption]:
    text = _read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # Over-long fields are read whole and then dropped as too long, as in every other format.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:
        raise UserError(f"{path}: unreadable CSV header: {exc}") from None
    if fieldnames is None:
        raise UserError(f"{path}: empty CSV (no header row)")
    if cfg.field not in fieldnames:
        raise UserError(f"{path}: no column '{cfg.field}' (columns: {', '.join(fieldnames)}); use --field")
    return _rows_to_raw(_csv_rows(reader, path), cfg)


def _csv_rows(reader: csv.DictReader[str], path: Path) -> Iterator[tuple[str, Any]]:
    try:
        for i, row in enumerate(reader):
            yield f"{path}: row {i + 2}", row
    except csv.Error as exc:
        raise UserError(f"{path}: line {reader.line_num} is not valid CSV: {exc}") from None


def read_parquet_corpus(path: Path, cfg: IngestConfig) -> Iterator[RawCaption]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file: {exc}") from None
    if cfg.field not in table.column_names:
        raise UserError(f"{path}: no column '{cfg.field}' (columns: {', '.join(table.column_names)}); use --field")
    return _rows_to_raw(((f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())), cfg)


READERS = {
    "coco": read_coco,
    "karpathy": read_karpathy,
    "flickr-token": read_flickr_token,
    "txt": read_txt,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_parquet_corpus,
}


# ----------------------------------------------------------------------------- the stage


def read_corpus(path: Path, cfg: IngestConfig) -> tuple[list[Caption], Counter[str], str]:
    """All kept captions, the drop counts by reason, and the format used."""
    if not path.exists():
        raise UserError(f"corpus not found: {path}")
    if path.is_dir():
        raise UserError(f"corpus is a folder, not a file: {path}")
    fmt = corpus_format(path) if cfg.format == "auto" else cfg.format
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    kept: list[Caption] = []
    source = path.name
    for raw in READERS[fmt](path, cfg):
        if raw.text is None:
            dropped["empty"] += 1
            continue
        if not isinstance(raw.text, str):
            raise UserError(f"{raw.where}: caption is {type(raw.text).__name__}, not text")
        text = normalise_text(raw.text)
        if not text:
            dropped["empty"] += 1
        elif len(text) > MAX_CAPTION_CHARS:
            dropped["too_long"] += 1
        elif raw.caption_id in seen:
            dropped["duplicate_id"] += 1
        else:
            seen.add(raw.caption_id)
            kept.append(Caption(raw.caption_id, text, source, raw.image_id, raw.split))
            if cfg.limit is not None and len(kept) >= cfg.limit:
                break
    return kept, dropped, fmt


def run(cfg: IngestConfig, run: RunDir) -> StageResult:
    timer = Timer()
    if not cfg.corpus:
        raise UserError("no corpus given: icsd ingest CORPUS --run RUN")
    path = Path(cfg.corpus).expanduser()
    captions, dropped, fmt = read_corpus(path, cfg)
    read = len(captions) + sum(dropped.values())
    if not captions:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.items()) or "no records"
        raise UserError(f"{path}: zero captions kept ({reasons})")
    write_parquet(to_table(captions, Caption), run.captions)
    counts: dict[str, Any] = {"read": read, "kept": len(captions), "dropped": sum(dropped.values())}
    counts.update({f"dropped_{why}": n for why, n in sorted(dropped.items())})
    return finish_stage(
        run,
        "ingest",
        cfg,
        counts=counts,
        seconds=timer.seconds,
        output=run.captions,
        extra={"format": fmt},
    )


def _inputs(cfg: IngestConfig, run: RunDir) -> list[Path]:
    return [Path(cfg.corpus).expanduser()] if cfg.corpus else []


# ----------------------------------------------------------------------------- rehearsal


def _rehearsal_reduce(ctx: StageRehearsal) -> None:
    """A slice of the corpus, or of the bundled captions when the corpus is not here."""
    from ..config import package_file

    if not ctx.exists("corpus"):
        ctx.config.corpus = str(package_file("data/quickstart/captions.json"))
        ctx.config.format = "coco"
        ctx.substituted("ingest.corpus: the bundled COCO captions (the configured corpus is not here)")
    k = int(getattr(getattr(ctx.full, "group", None), "k", 12))
    wanted = ctx.options.captions or max(24, 2 * k)  # more than K, so candidate sets differ
    ctx.config.limit = min(ctx.configured.limit or wanted, wanted)
    ctx.reduced(f"the first {ctx.config.limit} captions")


def _rehearsal_project(ctx: StageRehearsal) -> Row:
    """The full corpus: counted (and read once, timed) when it is here, else the cost model's recipe."""
    import time

    from ..cost_model import load_inputs
    from ..rehearse.hooks import Size, parquet_rows, per

    seconds = None
    if ctx.options.corpus_size:
        size = Size(ctx.options.corpus_size, "--rehearse.corpus_size")
    elif ctx.exists("corpus"):
        start = time.perf_counter()
        kept, _, _ = read_corpus(Path(ctx.configured.corpus or "").expanduser(), ctx.configured)
        seconds = time.perf_counter() - start
        size = Size(len(kept), "counted in the configured corpus")
    else:
        recipe = load_inputs()["recipe"]["captions"]
        size = Size(recipe["value"], f"assumed: {recipe['source']}; set --rehearse.corpus_size N")
    ctx.sizes["captions"] = size
    assert ctx.record is not None
    captions = parquet_rows(ctx.run.captions) or 1
    return ctx.row(settings={"format": ctx.config.format, "splits": ctx.configured.splits}, unit="caption",
                   units=captions, seconds_per_unit=per(ctx.record.seconds, captions), full_units=int(size.value),
                   projected_seconds=seconds, projection="the full corpus read once now" if seconds is not None
                   else "not projected (corpus not here; reading is minor)")  # fmt: skip


SPEC = StageSpec(
    name="ingest",
    report_counts=(("kept", "captions kept"), ("dropped", "dropped")),
    rehearsal=RehearsalHooks(reduce=_rehearsal_reduce, project=_rehearsal_project),
    config=IngestConfig,
    run=run,
    inputs=_inputs,
    outputs=lambda run: [run.captions],
    summary="Read a caption corpus into RUN/captions.parquet (format auto-detected).",
    examples=(
        "icsd ingest ../data/captions_train2017.json --run runs/coco",
        "icsd ingest dataset_coco.json --run runs/coco --format karpathy",
        "icsd ingest corpus.txt --run runs/ss1m",
        "icsd ingest captions.jsonl --run runs/x --field text",
    ),
    arguments=("corpus",),
)
