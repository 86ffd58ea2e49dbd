"""Bad input: a clear one-line error (exit 2) or a recorded skip, never a traceback, never lost data.

Covers what the stage tests leave out: corpora (invalid UTF-8 in every text format, NUL bytes,
1 MB fields, blank-only files, duplicate ids, mixed formats), hostile captions and summaries in
the HTML report, ids that look like paths, broken and unusual images, bad config files, and
checkpoints of another model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import QUICKSTART_IMAGES, QUICKSTART_REFERENCES
from PIL import Image
from synthetic_run import coco_items, make_summary_run, sample_meta, write_shard

from icsd.config import PairsConfig, ReportConfig
from icsd.records import Candidate, Caption, Pair, Selection, from_table, to_table
from icsd.stages import pairs, report
from icsd.store import RunDir, iter_shard_samples, read_parquet, safe_key, write_parquet


def icsd(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run the `icsd` entry point in this process: (exit code, stdout, stderr)."""
    from icsd.cli import main

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["icsd", *(str(a) for a in args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("note:", "skipped "))]
    assert code == 2, err[-3000:]
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


# ----------------------------------------------------------------------------- corpora

BAD_CORPORA = [
    ("coco.json", b'{"annotations": [{"id": 1, "image_id": 1, "caption": "a \xff\xfe dog"}]}', "not UTF-8 text"),
    ("bad.csv", b"caption\nfine\nbroken \xc3\x28 text\n", "not UTF-8 text"),
    ("bad.jsonl", b'{"caption": "fine"}\n{"caption": "broken \xe2\x82"}\n', "line 2 is not UTF-8"),
    ("nul.jsonl", b'{"caption": "a\x00b"}\n', "line 1 is malformed JSON at column"),
    ("blank.jsonl", b"\n   \n\n", "zero captions kept"),
    ("header_only.csv", b"caption\n", "zero captions kept"),
    ("empty.json", b'{"annotations": []}', "zero captions kept"),
    ("lines.json", b'{"caption": "a"}\n{"caption": "b"}\n', "malformed JSON"),
    ("mixed.txt", b'{"caption": "looks like JSON lines"}\nthen plain text\n', "line 2 is malformed JSON"),
    ("mixed.token", b"1.jpg#0\ta dog runs\njust a sentence\n", "line 2 is not 'name.jpg#i<TAB>caption'"),
    ("binary.txt", bytes(range(256)) * 4, "not UTF-8"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_CORPORA, ids=[c[0] for c in BAD_CORPORA])
def test_bad_corpus_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    corpus = tmp_path / name
    corpus.write_bytes(content)
    run = tmp_path / "run"
    code, _, err = icsd(capsys, "ingest", corpus, "--run", run)
    assert_one_line_error(code, err, message)
    assert not (run / "captions.parquet").exists() and not (run / "manifest.json").exists()


def test_odd_but_readable_corpora_are_kept_with_drops_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases: dict[str, tuple[bytes, list[str], dict[str, int]]] = {
        # NUL bytes inside a CSV field and a parquet string are removed; the caption is kept
        "nul.csv": (b"caption\nhello\x00world\nplain\n", ["hello world", "plain"], {}),
        # a 1 MB field or line is read whole and dropped as too long, not a crash
        "long.csv": (b"caption\n" + b"y" * 1_000_000 + b"\nshort one\n", ["short one"], {"dropped_too_long": 1}),
        "long.txt": (b"x" * 1_000_000 + b"\nshort one\n", ["short one"], {"dropped_too_long": 1}),
        # duplicate annotation ids: the first is kept, the rest dropped and counted
        "dup.json": (
            json.dumps({"annotations": [{"id": 7, "image_id": 1, "caption": "first"},
                                        {"id": 7, "image_id": 1, "caption": "second"},
                                        {"id": 8, "image_id": 1, "caption": "third"}]}).encode(),  # fmt: skip
            ["first", "third"],
            {"dropped_duplicate_id": 1},
        ),
    }
    for name, (content, texts, drops) in cases.items():
        corpus = tmp_path / name
        corpus.write_bytes(content)
        run = RunDir.at(tmp_path / f"run-{name}")
        code, out, err = icsd(capsys, "ingest", corpus, "--run", run.root)
        assert code == 0, err
        kept = [c.text for c in from_table(read_parquet(run.captions), Caption)]
        assert kept == texts, name
        counts = run.stage_entry("ingest")["counts"]  # type: ignore[index]
        assert all(counts[k] == v for k, v in drops.items()), (name, counts)
        assert out.strip().startswith("ingest: read")

    table = pa.table({"caption": ["tab\there", "nul\x00inside", "bell\x07 and \x1b[31mescape"]})
    pq.write_table(table, tmp_path / "ctl.parquet")
    run = RunDir.at(tmp_path / "run-parquet")
    assert icsd(capsys, "ingest", tmp_path / "ctl.parquet", "--run", run.root)[0] == 0
    texts = [c.text for c in from_table(read_parquet(run.captions), Caption)]
    assert texts == ["tab here", "nul inside", "bell and [31mescape"]
    assert not any(ch < " " for t in texts for ch in t)


# ----------------------------------------------------------------------------- the HTML report

HOSTILE = [
    "<script>alert('caption')</script>",
    "<img src=x onerror=alert(1)>",
    "**bold** _it_ [link](javascript:alert(2)) `code` # heading",
    "tab\tbell\x07 esc\x1b[31m nul\x00 del\x7f vt\x0b",
    "</td></tr></table><iframe src=//evil>",
    '" onmouseover="alert(3)',
]
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "thead", "tbody",
                "tr", "th", "td", "details", "summary", "pre", "div", "span", "ol", "li", "img",
                "section", "code", "figure", "figcaption", "b", "br", "a"}  # the report's own markup  # fmt: skip


class TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def hostile_run(root: Path) -> RunDir:
    run = RunDir.at(root)
    captions = [Caption(f"c{i}", text, "corpus") for i, text in enumerate(HOSTILE)]
    write_parquet(to_table(captions, Caption), run.captions)
    ids = [c.caption_id for c in captions]
    write_parquet(to_table([Candidate("c0", ids, [1.0] * len(ids))], Candidate), run.candidates)
    selections = [
        Selection("c0", "ok", ids[:3], HOSTILE[3] + " " + HOSTILE[1], None, HOSTILE[0], "h", HOSTILE[2]),
        Selection(HOSTILE[5], "invalid", [], None, HOSTILE[4] + HOSTILE[3], "m", "h", HOSTILE[0]),
    ]
    write_parquet(to_table(selections, Selection), run.selections)
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image, format="JPEG")
    meta = dataclasses.replace(sample_meta("c0", HOSTILE[0]), model=HOSTILE[1], seed=HOSTILE[3])
    write_shard(run.images / "shard-00000.tar", [("c0", image.getvalue(), meta)])
    run.update_manifest("summarize", {"config": {"model": HOSTILE[0], "prompt": HOSTILE[4]},
                                      "counts": {"ok": 1, HOSTILE[1]: 1}, "complete": True})  # fmt: skip
    return run


def test_report_shows_hostile_text_as_text(tmp_path: Path) -> None:
    run = hostile_run(tmp_path / "run")
    report.run(ReportConfig(), run)
    html = run.report.read_text(encoding="utf-8")
    parser = TagCollector()
    parser.feed(html)
    tags = {t for t, _ in parser.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS  # no tag came from the data
    for tag, attrs in parser.tags:
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name, value)  # no event handler came from the data
            if name == "src":
                assert (value or "").startswith("data:image/"), value
    shown = "".join(parser.text)
    for text in (HOSTILE[0], HOSTILE[1], HOSTILE[2], HOSTILE[4], HOSTILE[5]):
        assert text in shown, text  # shown as the very text it is
    controls = sorted({f"U+{ord(ch):04X}" for ch in html if (ord(ch) < 32 and ch not in "\t\n\r") or ord(ch) == 127})
    assert not controls, controls  # control characters are made visible, not emitted raw


# ----------------------------------------------------------------------------- ids that look like paths

NASTY_IDS = ["../../etc/passwd", "/abs/path", "..", ".", "a b", "a/b", "a_b", "x" * 500, "", "ünï/cødé", "a.b.json",
             "-", "con", "line\nbreak", "\x00nul"]  # fmt: skip


def test_ids_that_look_like_paths_stay_keys_inside_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = [safe_key(i) for i in NASTY_IDS]
    assert len(set(keys)) == len(keys)  # distinct ids never share a key
    root = RunDir.at(tmp_path / "run").root
    for key in keys:
        assert key and len(key) <= 100 and "/" not in key and "." not in key and key not in ("..", ".")
        assert (root / key).resolve().parent == root
    for benchmark in ("../../outside", "/etc", "a b/c"):
        assert RunDir.at(root).eval_dir(benchmark).resolve().parent == root / "eval"

    # through ingest, a shard and pairs: every id survives and maps back from its key
    corpus = tmp_path / "ids.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "caption": f"caption {n}"}) + "\n" for n, i in enumerate(NASTY_IDS)))
    code, _, err = icsd(capsys, "ingest", corpus, "--run", root, "--id-field", "id")
    assert code == 0, err
    run = RunDir.at(root)
    caps = from_table(read_parquet(run.captions), Caption)
    assert [c.caption_id for c in caps] == NASTY_IDS
    jpg = (QUICKSTART_IMAGES / sorted(p.name for p in QUICKSTART_IMAGES.glob("*.jpg"))[0]).read_bytes()
    write_shard(run.images / "shard-00000.tar", [(i, jpg, sample_meta(i, f"caption {n}", source="caption"))
                                                 for n, i in enumerate(NASTY_IDS)])  # fmt: skip
    import tarfile

    with tarfile.open(run.images / "shard-00000.tar") as tar:
        names = tar.getnames()
    assert all("/" not in n and ".." not in n and n.count(".") == 1 for n in names), names
    samples = list(iter_shard_samples(run.images / "shard-00000.tar"))
    assert sorted(s.item_id for s in samples) == sorted(NASTY_IDS)
    pairs.run(PairsConfig(kinds=["uni"]), run)
    got = from_table(read_parquet(run.pairs), Pair)
    assert sorted(p.image_key for p in got) == sorted(keys)
    assert all(p.resolve().is_relative_to(root) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- images


def image_bytes(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def odd_images(folder: Path) -> dict[str, str]:
    """Files of every awkward kind; value: "ok" (must be captioned) or "skip"."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.open(sorted(QUICKSTART_IMAGES.glob("*.jpg"))[0]).convert("RGB").resize((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    gray16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    files = {
        "upright.jpg": (image_bytes(photo, "JPEG"), "ok"),
        "cmyk.jpg": (image_bytes(photo.convert("CMYK"), "JPEG"), "ok"),
        "gray16.png": (image_bytes(gray16, "PNG"), "ok"),
        "exif_rotated.jpg": (image_bytes(photo, "JPEG", exif=exif), "ok"),
        "palette.png": (image_bytes(photo.convert("P"), "PNG"), "ok"),
        "truncated.jpg": (image_bytes(photo, "JPEG")[:300], "skip"),
        "zero.jpg": (b"", "skip"),
        "text.png": (b"this is not an image at all\n", "skip"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: what for name, (_, what) in files.items()}


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from icsd.backends.captioners import CaptionerSpec, build_caption_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("captioner") / "tiny"
    build_caption_model(CaptionerSpec(preset="tiny", max_new_tokens=6)).save(folder)
    return folder


def test_caption_skips_broken_images_and_reads_unusual_ones(
    tiny_captioner: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from icsd.images import open_image

    expected = odd_images(tmp_path / "imgs")
    out = tmp_path / "caps.jsonl"
    code, stdout, err = icsd(capsys, "caption", "--model", tiny_captioner, tmp_path / "imgs", "--min-new-tokens", "1",
                             "--max-new-tokens", "4", "--device", "cpu", "--out", out)  # fmt: skip
    assert code == 0 and "Traceback" not in err, err
    captioned = {Path(json.loads(x)["image"]).name for x in out.read_text().splitlines()}
    assert captioned == {n for n, w in expected.items() if w == "ok"}
    for name in (n for n, w in expected.items() if w == "skip"):
        assert f"skipped {tmp_path / 'imgs' / name}" in err, name  # each skip recorded with its file
    assert f"{len(captioned)} images captioned, 3 skipped" in stdout

    # a 16-bit image keeps its tones (PIL's own conversion would turn it white)
    gray = np.asarray(open_image(tmp_path / "imgs" / "gray16.png"))
    assert gray.dtype == np.uint8 and gray.shape == (48, 64, 3) and 100 < gray.mean() < 155
    assert np.asarray(open_image(tmp_path / "imgs" / "cmyk.jpg")).shape == (48, 64, 3)


def test_evaluate_skips_an_unreadable_image_counts_it_and_says_so(
    tiny_captioner: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    shutil.copytree(QUICKSTART_IMAGES, images)
    victim = sorted(images.glob("*.jpg"))[2]
    victim.write_bytes(b"")
    out = tmp_path / "scores.json"
    code, _, err = icsd(capsys, "evaluate", "--model", tiny_captioner, "--images", images, "--references",
                        QUICKSTART_REFERENCES, "--metrics", "BLEU", "--min-new-tokens", "1", "--max-new-tokens", "4",
                        "--device", "cpu", "--out", out)  # fmt: skip
    assert code == 0 and "Traceback" not in err, err[-3000:]
    n = len(list(images.glob("*.jpg")))
    notes = [ln for ln in err.splitlines() if "could not be read" in ln]
    assert len(notes) == 1 and f"1 of {n} images" in notes[0] and victim.name in notes[0], err[-3000:]
    scores = json.loads(out.read_text())
    assert scores["n_images"] == n - 1  # only what was captioned is scored
    assert scores["selection"]["unreadable_images"] == 1 and scores["selection"]["subset"] is True
    assert victim.name in scores["selection"]["unreadable_examples"][0]
    predictions = json.loads(out.with_name("scores.predictions.json").read_text())
    assert len(predictions) == n - 1


def test_validation_images_of_every_kind(tmp_path: Path) -> None:
    from icsd.training.validation import ValSet, caption_valset

    class Echo:
        def caption(self, images: list[Any], **_: Any) -> list[str]:
            return [f"{im.mode} {im.size[0]}x{im.size[1]}" for im in images]

    expected = odd_images(tmp_path / "val")
    names = sorted(expected)
    valset = ValSet("user", names, [tmp_path / "val" / n for n in names], [["a caption"]] * len(names))
    done = caption_valset(Echo(), valset, range(len(valset)), beams=1, min_new_tokens=1, max_new_tokens=4, batch_size=3)
    assert sorted(names[j] for j, _ in done.skipped) == sorted(n for n, w in expected.items() if w == "skip")
    assert sorted(names[j] for j, _ in done.captions) == sorted(n for n, w in expected.items() if w == "ok")
    assert all(text.startswith("RGB ") for _, text in done.captions)
    assert done.note("validation images") is not None
    gray = np.asarray(valset.load(names.index("gray16.png")))
    assert 100 < gray.mean() < 155


# ----------------------------------------------------------------------------- config files

BAD_CONFIGS = [
    ("unknown key", "embed:\n  batch_size: 8\n  bach_size: 9\n", ["embed"], "bach_size"),
    ("wrong type", "embed:\n  batch_size: lots\n", ["embed"], "batch_size"),
    ("negative size", "embed:\n  part_size: -5\n", ["embed"], "part_size"),
    ("stage block only", "batch_size: 0\n", ["embed"], "batch_size"),
    ("not a mapping", "- just\n- a list\n", ["embed"], "mapping"),
    ("invalid yaml", "embed: [unclosed\n", ["embed"], "not valid YAML"),
    ("binary", "\x00\x01\x02", ["embed"], "config"),
    ("pipeline negative", "render:\n  size: -64\n", ["run"], "render.size"),
    ("pipeline unknown stage", "rendr:\n  size: 64\n", ["run"], "rendr"),
    ("pipeline wrong type", "train:\n  max_steps: [1, 2]\n", ["run"], "train.max_steps"),
]


@pytest.mark.parametrize(("case", "text", "command", "needle"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str, command: list[str], needle: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_bytes(text.encode("utf-8"))
    run = tmp_path / "run"
    args = ["embed", "--run", run, "--config", config] if command == ["embed"] else ["run", config]
    code, _, err = icsd(capsys, *args)
    assert_one_line_error(code, err, needle)
    assert not (run / "embeddings").exists()


def test_bad_values_on_the_command_line_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, needle in [
        (["embed", "--run", tmp_path / "r", "--batch-size", "-3"], "batch_size"),
        (["render", "--run", tmp_path / "r", "--size", "0"], "size"),
        (["summarize", "--run", tmp_path / "r", "--concurrency", "0"], "concurrency"),
        (["train", "--run", tmp_path / "r", "--lr", "-1"], "lr"),
        (["embed", "--run", tmp_path / "r", "--config", tmp_path], "config file not found"),
    ]:
        code, _, err = icsd(capsys, *args)
        assert_one_line_error(code, err, needle)


# ----------------------------------------------------------------------------- checkpoints of another model


def test_a_checkpoint_of_another_model_is_one_line(
    tiny_captioner: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_sentence_model: Path
) -> None:
    from tiny_models import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "bert")
    mixed = Path(shutil.copytree(tiny_captioner, tmp_path / "mixed"))
    shutil.copy(bert / "model.safetensors", mixed / "model.safetensors")  # right config, another model's weights
    image = sorted(QUICKSTART_IMAGES.glob("*.jpg"))[0]
    for model, needle in [(mixed, "checkpoint of another model"), (bert, "cannot load captioner"),
                          (tiny_sentence_model, "cannot load captioner")]:  # fmt: skip
        code, _, err = icsd(capsys, "caption", "--model", model, image, "--device", "cpu")
        assert_one_line_error(code, err, needle)

    # training from a vision model that is not a CLIP vision tower
    items = coco_items(QUICKSTART_REFERENCES, QUICKSTART_IMAGES, 4)
    run = make_summary_run(tmp_path / "run", items, shard_size=2)
    pairs.run(PairsConfig(), run)
    code, _, err = icsd(capsys, "train", "--run", run.root, "--vision-model", bert, "--text-model", bert,
                        "--max-steps", "1", "--device", "cpu", "--num-workers", "0")  # fmt: skip
    assert_one_line_error(code, err, "not a usable CLIP vision model")
    assert not (run.train / "last").exists()

    # embedding with a captioner folder
    code, _, err = icsd(capsys, "embed", "--run", run.root, "--model", tiny_captioner, "--device", "cpu")
    assert_one_line_error(code, err, "cannot load embedding model")
