"""Caption-set files: one reader per format and ONE rule for image ids.

Formats (read from files the user gives; nothing is downloaded):

- **COCO captions** (``captions_train2014.json``, ...): ``images[]`` (``id``, ``file_name``) and
  ``annotations[]`` (``id``, ``image_id``, ``caption``).
- **NoCaps val** (``nocaps_val_4500_captions.json``): COCO-style, each image with a ``domain``
  (in-domain, near-domain, out-domain).
- **Karpathy split** (``dataset_coco.json``, ``dataset_flickr30k.json``): ``images[]`` with
  ``split``, ``filepath``/``filename``, ``cocoid`` (COCO only), ``imgid`` and ``sentences[].raw``.
- **Flickr token file** (``results_20130124.token``): ``1000092795.jpg#0<TAB>caption`` lines.
- **JSON lines** (validation splits): ``{"image": "a.jpg", "captions": [...]}`` (or ``"caption"``).

The image-id rule (ids are strings everywhere; the same image gets the same id from every reader,
so captions.parquet, references, predictions and image files always match):

1. An image with a numeric COCO id has that id as a decimal string: COCO/NoCaps ``images[].id``
   and ``annotations[].image_id``, Karpathy ``cocoid`` (``"391895"``).
2. Any other image is named by its file name without folder and extension: Karpathy Flickr30k
   ``filename`` (``"1000092795.jpg"`` -> ``"1000092795"``), Flickr token lines, JSON lines.
3. Karpathy's ``imgid`` is a position in one file, not an image's identity: it is never used.
4. A bare image file (``icsd caption --format coco``) gets :func:`image_id_from_file`: the
   trailing digits of its stem without leading zeros when it ends in digits
   (``COCO_val2014_000000391895.jpg`` -> ``"391895"``, ``1000092795.jpg`` -> ``"1000092795"``),
   else its stem -- the same ids as rules 1 and 2 for COCO and Flickr30k image files.

Predictions files (COCO results JSON, what pycocoevalcap's ``loadRes`` reads) carry the id as the
references file has it (an integer for COCO, NoCaps and numeric Flickr names) -- see
:attr:`RefImage.image_id` -- and are matched on the string form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

Format = Literal["karpathy", "nocaps", "coco", "jsonl"]
NOCAPS_DOMAINS: tuple[str, ...] = ("in-domain", "near-domain", "out-domain")
FLICKR_TOKEN_LINE = re.compile(r"^([^\t#]+)#(\d+)\t(.*)$")


# ----------------------------------------------------------------------------- the image-id rule


def id_string(value: Any, where: str) -> str:
    """An id as it appears in a file (integer or non-empty string) -> its string form."""
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise UserError(f"{where}: image id must be an integer or a non-empty string, got {value!r}")
    return str(value)


def file_stem(name: str) -> str:
    """``val2014/1000092795.jpg`` -> ``1000092795``."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _as_file_id(stem: str) -> int | str:
    """The id written into predictions for a file-named image: an integer when that round-trips."""
    return int(stem) if stem.isdigit() and str(int(stem)) == stem else stem


def karpathy_image_id(im: dict[str, Any], where: str) -> int | str:
    """Rules 1-3 for a Karpathy image: ``cocoid``, else the ``filename`` stem."""
    if im.get("cocoid") is not None:
        return int(im["cocoid"])
    stem = file_stem(str(im.get("filename") or ""))
    if stem:
        return _as_file_id(stem)
    raise UserError(f"{where}: Karpathy image has neither 'cocoid' nor 'filename'")


def image_id_from_file(path: str | Path) -> str:
    """Rule 4: the id of a bare image file, from its name."""
    stem = file_stem(str(path))
    m = re.search(r"(\d+)$", stem)
    return str(int(m.group(1))) if m else stem


# ----------------------------------------------------------------------------- reading files


def read_json_file(path: str | Path, what: str) -> Any:
    """Parsed JSON; a missing file, non-UTF-8 bytes or bad JSON is one :class:`UserError`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{what} is not UTF-8 text ({p}: line {line}, byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{what} is not valid JSON ({p}): malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def detect_format(data: Any, path: Path) -> Format:
    """The format of a caption file's parsed JSON, one rule for every reader (ingest, evaluation,
    selection): a list is ``jsonl`` records (``{"image", "captions"}``); an object whose first image
    has ``sentences`` is ``karpathy``; an object with an ``annotations`` list is ``nocaps`` when its
    images carry a ``domain``, else ``coco`` (the images list is optional: a captions-only COCO file
    is a corpus, though not a reference set). Anything else is a one-line error."""
    if isinstance(data, list):
        return "jsonl"
    if not isinstance(data, dict) or not isinstance(data.get("images", []), list) or not data.keys() & {"images", "annotations"}:
        raise UserError(
            f"{path} is not a caption annotation file: its JSON is neither COCO or NoCaps captions "
            "(annotations[].caption) nor a Karpathy split (images[].sentences[].raw)"
        )
    images = data.get("images", [])
    if images and isinstance(images[0], dict) and "sentences" in images[0]:
        return "karpathy"
    if not isinstance(data.get("annotations"), list):
        raise UserError(
            f"{path} has neither 'sentences' in its images (Karpathy) nor an 'annotations' list (COCO)"
        )
    if any(isinstance(im, dict) and "domain" in im for im in images[:50]):
        return "nocaps"
    return "coco"


# ----------------------------------------------------------------------------- caption records


@dataclass(frozen=True)
class CaptionEntry:
    """One caption as a caption-set file holds it (``text`` unchecked); ``where`` names it in errors."""

    caption_id: str
    text: Any
    image_id: str | None
    split: str | None
    where: str


def coco_caption_entries(path: Path, data: Any) -> Iterator[CaptionEntry]:
    """Every annotation of a COCO (or NoCaps) captions file; caption id = the annotation ``id``."""
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise UserError(f"{path}: no 'annotations' list (COCO caption format expected)")
    for i, ann in enumerate(anns):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "caption" not in ann:
            raise UserError(f"{where}: missing field 'caption'")
        image_id = ann.get("image_id")
        key = None if image_id is None else id_string(image_id, where)
        yield CaptionEntry(str(ann.get("id", i)), ann["caption"], key, None, where)


def karpathy_caption_entries(path: Path, data: Any, splits: Iterable[str] = ()) -> Iterator[CaptionEntry]:
    """Every sentence of a Karpathy split file (of ``splits`` when given); caption id = ``sentid``."""
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{path}: no 'images' list (Karpathy split format expected)")
    wanted = set(splits)
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("sentences"), list):
            raise UserError(f"{where}: missing field 'sentences'")
        split = img.get("split")
        if wanted and split not in wanted:
            continue
        key = str(karpathy_image_id(img, where))
        for j, sent in enumerate(img["sentences"]):
            if not isinstance(sent, dict) or "raw" not in sent:
                raise UserError(f"{where}.sentences[{j}]: missing field 'raw'")
            sid = sent.get("sentid", f"{key}-{j}")
            yield CaptionEntry(str(sid), sent["raw"], key, None if split is None else str(split), where)


def flickr_caption_entries(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[CaptionEntry]:
    """Flickr token lines ``name.jpg#i<TAB>caption``; caption id = ``name.jpg#i``, image id = stem."""
    for lineno, line in lines:
        if not line.strip():
            continue
        m = FLICKR_TOKEN_LINE.match(line)
        if not m:
            raise UserError(f"{path}: line {lineno} is not 'name.jpg#i<TAB>caption'")
        name, idx, text = m.groups()
        yield CaptionEntry(f"{name}#{idx}", text, file_stem(name), None, f"{path}: line {lineno}")


# ----------------------------------------------------------------------------- reference sets


@dataclass(frozen=True)
class RefImage:
    """One image of a reference set: ``key``, its id by the rule above (the matching key); ``image_id``,
    the id written into predictions.json (as the file has it); its file path relative to the images
    folder, its reference captions and, for NoCaps, its domain."""

    key: str
    image_id: int | str
    file: str | None
    captions: tuple[str, ...]
    domain: str | None = None


@dataclass(frozen=True)
class References:
    name: str
    path: Path
    format: Format
    split: str | None
    images: tuple[RefImage, ...]

    def captions(self) -> dict[str, list[str]]:
        """``{key: [caption, ...]}`` in file order (the evaluation order)."""
        return {im.key: list(im.captions) for im in self.images}

    def domains(self) -> dict[str, list[str]]:
        """NoCaps: ``{domain: [key, ...]}`` in the standard domain order; empty for other formats."""
        out: dict[str, list[str]] = {}
        for domain in NOCAPS_DOMAINS:
            keys = [im.key for im in self.images if im.domain == domain]
            if keys:
                out[domain] = keys
        return out

    @property
    def n_captions(self) -> int:
        return sum(len(im.captions) for im in self.images)


def load_karpathy(path: str | Path, split: str = "test", data: Any = None) -> tuple[str, list[RefImage]]:
    """``(dataset name, images of split)`` from a Karpathy split file (``restval`` is its own split)."""
    p = Path(path)
    data = read_json_file(p, "Karpathy split file") if data is None else data
    dataset = str(data.get("dataset") or p.stem.removeprefix("dataset_"))
    images = []
    splits_seen: set[str] = set()
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise UserError(f"{p}: images[{n}] is not an object")
        splits_seen.add(str(im.get("split")))
        if im.get("split") != split:
            continue
        sentences = im.get("sentences") or []
        captions = tuple(str(s["raw"]) for s in sentences if isinstance(s, dict) and "raw" in s)
        image_id = karpathy_image_id(im, f"{p}: images[{n}]")
        filepath, filename = im.get("filepath"), im.get("filename")
        file = "/".join(x for x in (filepath, filename) if x) or None
        images.append(RefImage(key=str(image_id), image_id=image_id, file=file, captions=captions))
    if not images:
        raise UserError(
            f"{p} has no images in split {split!r} (splits there: {', '.join(sorted(splits_seen))})"
        )
    return dataset, images


def _coco_images(p: Path, data: dict[str, Any], what: str) -> list[RefImage]:
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise UserError(f"{p}: 'annotations' must be a list")
    by_image: dict[str, list[str]] = {}
    for n, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise UserError(f"{p}: annotations[{n}] needs 'image_id' and 'caption'")
        by_image.setdefault(id_string(a["image_id"], str(p)), []).append(str(a["caption"]))
    if not isinstance(data.get("images"), list):
        raise UserError(f"{p}: no 'images' list: a COCO {what} file lists its images")
    images: list[RefImage] = []
    seen: set[str] = set()
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise UserError(f"{p}: images[{n}] needs an 'id'")
        key = id_string(im["id"], str(p))
        if key in seen:
            raise UserError(f"{p}: image id {im['id']!r} is listed twice")
        seen.add(key)
        domain = im.get("domain")
        images.append(
            RefImage(
                key=key,
                image_id=im["id"],
                file=im.get("file_name"),
                captions=tuple(by_image.get(key, ())),
                domain=str(domain) if domain is not None else None,
            )
        )
    unknown = set(by_image) - seen
    if unknown:
        raise UserError(
            f"{p}: {len(unknown)} {what} annotations refer to images not in 'images' (e.g. {sorted(unknown)[:3]})"
        )
    return images


def load_coco_captions(path: str | Path, data: Any = None) -> list[RefImage]:
    p = Path(path)
    data = read_json_file(p, "COCO caption file") if data is None else data
    return _coco_images(p, data, "caption")


def load_nocaps(path: str | Path, data: Any = None) -> list[RefImage]:
    p = Path(path)
    data = read_json_file(p, "NoCaps file") if data is None else data
    images = _coco_images(p, data, "NoCaps")
    bad = sorted({im.domain for im in images if im.domain not in NOCAPS_DOMAINS}, key=str)
    if bad:
        raise UserError(f"{p}: unknown NoCaps domain(s) {bad}; expected {', '.join(NOCAPS_DOMAINS)}")
    return images


def load_jsonl_records(path: Path, records: Iterable[tuple[str, Any]]) -> list[RefImage]:
    """``{"image": NAME, "captions": [...]}`` (or ``"caption"``, ``"file_name"``, ``"filename"``)
    records; an image named twice collects the captions of both."""
    by_key: dict[str, RefImage] = {}
    for where, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{where}: each caption record must be an object with 'image' and 'caption(s)'")
        name = record.get("image") or record.get("file_name") or record.get("filename")
        texts = record.get("captions") or ([record["caption"]] if "caption" in record else [])
        if not name or not texts:
            raise UserError(f"{where}: caption record lacks an image name or captions: {str(record)[:80]}")
        stem = file_stem(str(name))
        old = by_key.get(stem)
        captions = (old.captions if old else ()) + tuple(str(t) for t in texts)
        by_key[stem] = RefImage(key=stem, image_id=_as_file_id(stem), file=str(name), captions=captions)
    return list(by_key.values())


def load_jsonl(path: str | Path) -> list[RefImage]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"captions file not found: {p}")

    def records() -> Iterator[tuple[str, Any]]:
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    yield f"{p}: line {lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{p}: line {lineno} is malformed JSON at column {exc.colno}: {exc.msg}"
                    ) from None

    return load_jsonl_records(p, records())


def load_reference_file(path: str | Path, split: str = "test") -> tuple[Format, str, list[RefImage]]:
    """``(format, dataset or file stem, images)`` of any caption-set file with images: COCO,
    NoCaps, Karpathy (``split`` only) or JSON lines."""
    p = Path(path).expanduser()
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl", p.stem, load_jsonl(p)
    data = read_json_file(p, "references file")
    fmt = detect_format(data, p)
    if fmt == "karpathy":
        dataset, images = load_karpathy(p, split, data)
        return fmt, dataset, images
    if fmt == "nocaps":
        return fmt, "nocaps", load_nocaps(p, data)
    if fmt == "jsonl":
        return fmt, p.stem, load_jsonl_records(p, ((f"{p}: item {n}", r) for n, r in enumerate(data)))
    return fmt, p.stem, load_coco_captions(p, data)


# ----------------------------------------------------------------------------- predictions


def load_predictions(path: str | Path) -> dict[str, tuple[int | str, str]]:
    """COCO results JSON -> ``{key: (image_id, caption)}``; also accepts ``{image_id: caption}``."""
    p = Path(path).expanduser()
    data = read_json_file(p, "predictions file")
    rows: Iterable[tuple[Any, Any]]
    if isinstance(data, dict):
        rows = data.items()
    elif isinstance(data, list):
        pairs = []
        for n, item in enumerate(data):
            if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
                raise UserError(f"{p}: item {n} needs 'image_id' and 'caption' (COCO results format)")
            pairs.append((item["image_id"], item["caption"]))
        rows = pairs
    else:
        raise UserError(f"{p}: predictions must be a list of {{image_id, caption}} objects")
    out: dict[str, tuple[int | str, str]] = {}
    for image_id, caption in rows:
        key = id_string(image_id, str(p))
        if not isinstance(caption, str):
            raise UserError(f"{p}: caption for image {image_id!r} is not a string")
        if key in out:
            raise UserError(f"{p}: image {image_id!r} has more than one prediction")
        out[key] = (image_id, caption)
    if not out:
        raise UserError(f"{p} holds no predictions")
    return out


def predictions_json(refs: References, captions: dict[str, str]) -> list[dict[str, Any]]:
    """COCO results format in reference order, with the ids as the references file has them."""
    return [
        {"image_id": im.image_id, "caption": captions[im.key]} for im in refs.images if im.key in captions
    ]
