"""Corpus readers: every format, format detection, normalisation, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from icsd.config import IngestConfig
from icsd.errors import UserError
from icsd.records import Caption, from_table
from icsd.stages import ingest
from icsd.store import RunDir


def run_ingest(tmp_path: Path, corpus: Path, **kw: object) -> tuple[list[Caption], dict]:
    run = RunDir.at(tmp_path / "run")
    result = ingest.run(IngestConfig(corpus=str(corpus), **kw), run)
    return from_table(pq.read_table(run.captions), Caption), result.counts


def test_coco_annotations(tmp_path: Path) -> None:
    f = tmp_path / "caps.json"
    f.write_text(
        json.dumps(
            {
                "images": [{"id": 1}],
                "annotations": [
                    {"id": 10, "image_id": 1, "caption": "  A dog\non a  beach. "},
                    {"id": 11, "image_id": 1, "caption": "   "},
                ],
            }
        )
    )
    caps, counts = run_ingest(tmp_path, f)
    assert caps == [Caption("10", "A dog on a beach.", "caps.json", "1", None)]
    assert counts["read"] == 2 and counts["kept"] == 1 and counts["dropped_empty"] == 1


def test_karpathy_default_splits(tmp_path: Path) -> None:
    f = tmp_path / "dataset_coco.json"
    images = [
        {"cocoid": 5, "split": "train", "sentences": [{"sentid": 1, "raw": "a cat"}, {"sentid": 2, "raw": "a cat sits"}]},
        {"cocoid": 6, "split": "restval", "sentences": [{"sentid": 3, "raw": "two dogs"}]},
        {"cocoid": 7, "split": "test", "sentences": [{"sentid": 4, "raw": "held out"}]},
    ]
    f.write_text(json.dumps({"images": images, "dataset": "coco"}))
    caps, _ = run_ingest(tmp_path, f)
    assert [c.caption_id for c in caps] == ["1", "2", "3"]
    assert {c.split for c in caps} == {"train", "restval"}
    caps, _ = run_ingest(tmp_path, f, splits=["test"])
    assert [(c.caption_id, c.image_id, c.text) for c in caps] == [("4", "7", "held out")]


def test_flickr_token_detected(tmp_path: Path) -> None:
    f = tmp_path / "results_20130124.token"
    f.write_text("1000092795.jpg#0\tTwo young guys with shaggy hair .\n1000092795.jpg#1\tTwo friends enjoy time .\n")
    caps, _ = run_ingest(tmp_path, f)
    assert [c.caption_id for c in caps] == ["1000092795.jpg#0", "1000092795.jpg#1"]
    assert caps[0].image_id == "1000092795"  # the file name stem (icsd.formats id rule)


def test_txt_blank_lines_control_chars_and_bom(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_bytes("\ufeffa man rides a horse\n\n  \na bird\x00 on a\x1b[31m wire\r\n".encode())
    caps, counts = run_ingest(tmp_path, f)
    assert [(c.caption_id, c.text) for c in caps] == [("1", "a man rides a horse"), ("4", "a bird on a [31m wire")]
    assert counts["dropped_empty"] == 2


def test_jsonl_csv_parquet_with_fields(tmp_path: Path) -> None:
    j = tmp_path / "c.jsonl"
    j.write_text('{"id": "x1", "text": "a red bus"}\n{"id": "x2", "text": "a blue car"}\n')
    caps, _ = run_ingest(tmp_path, j, field="text", id_field="id")
    assert [(c.caption_id, c.text) for c in caps] == [("x1", "a red bus"), ("x2", "a blue car")]

    c = tmp_path / "c.csv"
    c.write_text('caption,img\n"a train, at night",t.jpg\nsnowy hill,s.jpg\n')
    caps, _ = run_ingest(tmp_path, c, image_field="img")
    assert [(c.caption_id, c.text, c.image_id) for c in caps] == [
        ("0", "a train, at night", "t.jpg"),
        ("1", "snowy hill", "s.jpg"),
    ]

    import pyarrow as pa

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"sentence": ["one", "two"]}), p)
    caps, _ = run_ingest(tmp_path, p, field="sentence")
    assert [c.text for c in caps] == ["one", "two"]


def test_duplicate_ids_and_long_lines_are_dropped_and_counted(tmp_path: Path) -> None:
    j = tmp_path / "c.jsonl"
    j.write_text(
        json.dumps({"id": 1, "caption": "first"})
        + "\n"
        + json.dumps({"id": 1, "caption": "again"})
        + "\n"
        + json.dumps({"id": 2, "caption": "x" * 1_000_000})
        + "\n"
    )
    caps, counts = run_ingest(tmp_path, j, id_field="id")
    assert [c.text for c in caps] == ["first"]
    assert counts["dropped_duplicate_id"] == 1 and counts["dropped_too_long"] == 1


def test_limit(tmp_path: Path, coco_captions: Path) -> None:
    caps, counts = run_ingest(tmp_path, coco_captions, limit=100)
    assert len(caps) == 100 and counts["kept"] == 100


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.txt", b"fine\n\xff\xfe broken\n", "line 2 is not UTF-8"),
        ("bad.json", b'{"annotations": [', "malformed JSON"),
        ("other.json", b'{"foo": 1}', "neither COCO"),
        ("nofield.json", b'{"annotations": [{"id": 1}]}', "missing field 'caption'"),
        ("nofield.jsonl", b'{"text": "x"}\n', "missing field 'caption'"),
        ("broken.jsonl", b'{"caption": "x"}\n{oops\n', "line 2 is malformed JSON"),
        ("blank.txt", b"\n\n   \n", "zero captions kept"),
        ("nocol.csv", b"text\nhello\n", "no column 'caption'"),
        ("bad.parquet", b"PAR1 not really", "not a readable parquet"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    run = RunDir.at(tmp_path / "run")
    with pytest.raises(UserError, match=message) as err:
        ingest.run(IngestConfig(corpus=str(f)), run)
    assert "\n" not in str(err.value)
    assert not run.captions.exists() and not run.manifest_json.exists()


def test_missing_corpus(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="corpus not found"):
        ingest.run(IngestConfig(corpus=str(tmp_path / "nope.json")), RunDir.at(tmp_path / "run"))


def test_manifest_and_config_written(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("a\nb\n")
    run = RunDir.at(tmp_path / "run")
    ingest.run(IngestConfig(corpus=str(f)), run)
    entry = run.stage_entry("ingest")
    assert entry and entry["counts"]["kept"] == 2 and entry["complete"]
    assert entry["inputs"]["c.txt"] and entry["versions"]["pyarrow"]
    assert "ingest:" in run.config_yaml.read_text()
