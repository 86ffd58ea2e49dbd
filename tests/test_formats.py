"""One image-id rule across ingest, evaluate and validation; the rendered-sample record; the one
batched captioning loop and its bad-image policy."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from icsd.caption import caption_batched, coco_image_id
from icsd.config import IngestConfig
from icsd.errors import UserError
from icsd.eval_sets import load_references
from icsd.formats import image_id_from_file, load_reference_file
from icsd.records import ImageSample, SampleMeta
from icsd.stages.ingest import read_corpus
from icsd.store import iter_shard_samples
from icsd.training.validation import ValSet, caption_valset, load_user_split


def write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def jpeg(colour: tuple[int, int, int] = (120, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, format="JPEG")
    return buf.getvalue()


def sentences(*raws: str, start: int = 0) -> list[dict[str, Any]]:
    return [{"raw": r, "sentid": start + n} for n, r in enumerate(raws)]


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "val2014").mkdir(parents=True)
    for name in ("val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000043.jpg",
                 "1000092795.jpg", "1000268201.jpg", "000000000007.jpg", "000000000008.jpg"):  # fmt: skip
        (folder / name).write_bytes(jpeg())
    return folder


CASES = {
    "karpathy-coco": {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "imgid": 0,
             "split": "val", "sentences": sentences("a dog on a beach", "a brown dog")},
            {"filepath": "val2014", "filename": "COCO_val2014_000000000043.jpg", "cocoid": 43, "imgid": 1,
             "split": "val", "sentences": sentences("two cats", start=2)},
        ],
    },  # fmt: skip
    "karpathy-flickr": {
        "dataset": "flickr30k",
        "images": [
            {"filename": "1000092795.jpg", "imgid": 0, "split": "val", "sentences": sentences("two young guys")},
            {"filename": "1000268201.jpg", "imgid": 1, "split": "val", "sentences": sentences("a child", start=1)},
        ],
    },
    "coco-captions": {
        "images": [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 8, "file_name": "000000000008.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "a red bus"},
            {"id": 2, "image_id": 8, "caption": "a green tram"},
            {"id": 3, "image_id": 7, "caption": "a bus on a street"},
        ],
    },
    "nocaps": {
        "images": [
            {"id": 7, "file_name": "000000000007.jpg", "domain": "in-domain"},
            {"id": 8, "file_name": "000000000008.jpg", "domain": "out-domain"},
        ],
        "annotations": [{"id": 1, "image_id": 7, "caption": "a red bus"}, {"id": 2, "image_id": 8, "caption": "a tram"}],
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_image_id_rule_for_ingest_evaluate_and_validation(case: str, tmp_path: Path, image_folder: Path) -> None:
    path = write(tmp_path / f"{case}.json", CASES[case])
    evaluated = [im.key for im in load_references(path, split="val").images]
    validated = load_user_split(str(image_folder), str(path), 100).ids
    assert sorted(evaluated) == validated
    if case != "nocaps":  # ingest reads COCO-style NoCaps files as coco, with the same ids
        captions, _, _ = read_corpus(path, IngestConfig(corpus=str(path), splits=["val"]))
        assert list(dict.fromkeys(c.image_id for c in captions)) == evaluated
    # predictions made from the image files (icsd caption --format coco) carry the same ids
    _, _, images = load_reference_file(path, split="val")
    assert [str(coco_image_id(Path(im.file or ""))) for im in images] == evaluated
    assert all(image_id_from_file(im.file or "") == im.key for im in images)


def test_flickr_token_file_and_karpathy_flickr_agree(tmp_path: Path) -> None:
    token = tmp_path / "results_20130124.token"
    token.write_text("1000092795.jpg#0\ttwo young guys\n1000268201.jpg#0\ta child\n")
    captions, _, fmt = read_corpus(token, IngestConfig(corpus=str(token)))
    karpathy = write(tmp_path / "dataset_flickr30k.json", CASES["karpathy-flickr"])
    assert fmt == "flickr-token"
    assert [c.image_id for c in captions] == [im.key for im in load_references(karpathy, split="val").images]
    assert [c.image_id for c in captions] == ["1000092795", "1000268201"]


def test_karpathy_imgid_is_not_an_image_id(tmp_path: Path) -> None:
    path = write(tmp_path / "k.json", {"images": [{"imgid": 3, "split": "test", "sentences": sentences("x")}]})
    with pytest.raises(UserError, match="neither 'cocoid' nor 'filename'"):
        load_references(path)


# ----------------------------------------------------------------------------- the sample record


def test_sample_meta_round_trips_and_is_strict() -> None:
    meta = SampleMeta(id="g/1 ü", summary="a dog", seed=7, model="m", steps=20, guidance=7.5, width=512,
                      height=512, nsfw=None, prompt_source="caption", scheduler="dpm++")  # fmt: skip
    data = meta.to_json()
    assert SampleMeta.from_json(data) == meta
    raw = json.loads(data)
    assert {"summary", "seed", "model", "steps", "guidance", "width", "height", "nsfw"} <= set(raw)
    assert SampleMeta.from_json({**raw, "added_later": 1}) == meta  # unknown fields are ignored
    without_id = {k: v for k, v in raw.items() if k != "id"}
    assert SampleMeta.from_json(json.dumps(without_id), key="k1").id == "k1"
    with pytest.raises(ValueError, match="lacks steps"):
        SampleMeta.from_json({k: v for k, v in raw.items() if k != "steps"})


def test_shard_samples_are_read_through_the_record(tmp_path: Path) -> None:
    meta = SampleMeta(id="a", summary="p", seed=1, model="m", steps=1, guidance=1.0, width=16, height=12, nsfw=False)
    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.jpg", jpeg()), ("a.json", meta.to_json()), ("b.jpg", jpeg()), ("b.json", b'{"id": "b"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="sample b: sample JSON lacks"):
        list(iter_shard_samples(shard))
    first = next(iter_shard_samples(shard))
    assert first == ImageSample("a", shard.name, meta, jpeg(), "jpg")
    assert first.to_json() == meta.to_json()
    assert ImageSample.from_json("a", shard.name, meta.to_json()).meta == meta


# ----------------------------------------------------------------------------- batched captioning


class Echo:
    """A stand-in captioner: says what it was shown, counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def caption(self, images: list[Image.Image], **_: Any) -> list[str]:
        self.calls.append(len(images))
        return [f"{im.mode} {im.size[0]}x{im.size[1]}" for im in images]


def test_caption_batched_skips_and_counts_unreadable_images(tmp_path: Path) -> None:
    files = []
    for n in range(5):
        f = tmp_path / f"{n}.jpg"
        f.write_bytes(b"not a jpeg" if n in (1, 3) else jpeg())
        files.append(f)

    def load(p: Path) -> Image.Image:
        with Image.open(p) as im:
            return im.convert("RGB")

    heard: list[Path] = []
    echo = Echo()
    done = caption_batched(echo, files, load, batch_size=2, on_skip=lambda p, _: heard.append(p))
    assert [p.name for p, _ in done.captions] == ["0.jpg", "2.jpg", "4.jpg"]
    assert [p.name for p, _ in done.skipped] == ["1.jpg", "3.jpg"] == [p.name for p in heard]
    assert echo.calls == [1, 1, 1]
    note = done.note()
    assert note is not None and note.startswith("note: 2 of 5 images could not be read") and "1.jpg" in note


def test_validation_skips_a_broken_image(tmp_path: Path) -> None:
    valset = ValSet("held-out", ["a", "b", "c"], [jpeg(), b"broken", jpeg()], [["x"], ["y"], ["z"]])
    done = caption_valset(Echo(), valset, [0, 1, 2], beams=1, min_new_tokens=1, max_new_tokens=4)
    assert [j for j, _ in done.captions] == [0, 2] and [j for j, _ in done.skipped] == [1]
