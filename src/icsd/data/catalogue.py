"""The data sets of the paper's setting: what each is, where it comes from, and where it goes.

Every data set lands under one root (``data/`` by default) in exactly the layout the bundled
configs name (``data/dataset_coco.json``, ``data/coco/val2014/``, ``data/nocaps/validation/``, ...).
Sizes and SHA-256 sums of the COCO archives are the ones TensorFlow Datasets publishes
(``tensorflow_datasets/url_checksums/coco.txt``); the other sources publish none, so their
archives are checked by their own integrity (zip CRCs, JSON that parses, images that decode)
and the SHA-256 of what arrived is recorded in ``ROOT/.icsd-data.json``.

``ICSD_DATA_MIRROR`` (or ``--mirror``) fetches every URL from a mirror instead, laid out as
``MIRROR/<host>/<path>`` (``http://images.cocodataset.org/zips/val2014.zip`` ->
``MIRROR/images.cocodataset.org/zips/val2014.zip``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import UserError

MIRROR_ENV = "ICSD_DATA_MIRROR"
COCO_LICENCE = "annotations CC BY 4.0; images under the Flickr terms of use of each photo"
TFDS = "TensorFlow Datasets url_checksums/coco.txt"


@dataclass(frozen=True)
class Source:
    """One file to fetch. ``unpack``: zip | tar (an archive), file (kept as it is), image-list
    (a JSON whose ``images[].coco_url`` name the files to fetch, e.g. NoCaps)."""

    url: str
    unpack: str
    size: int | None = None
    sha256: str | None = None
    checksum_from: str | None = None

    @property
    def filename(self) -> str:
        return urlsplit(self.url).path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Target:
    """What a data set puts under the root: ``path`` (relative), a ``file`` or a ``folder``, and
    where it comes from inside the source (``member``: a file name, or a folder ending in ``/``)."""

    path: str
    kind: str
    member: str = ""
    images: int | None = None  # how many images a complete folder holds


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    licence: str
    homepage: str
    size: str
    sources: tuple[Source, ...]
    targets: tuple[Target, ...]
    used_by: str
    needs: tuple[str, ...] = ()  # data sets that must be in place first
    manual: str | None = None  # how to get it when it cannot be fetched automatically
    manual_archives: tuple[str, ...] = field(default=())  # archive names a user may drop in ROOT/downloads/

    @property
    def automatic(self) -> bool:
        return self.manual is None


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="karpathy-splits",
            title="Karpathy's train/val/test splits with captions for COCO, Flickr30k and Flickr8k",
            licence="captions: COCO CC BY 4.0 / Flickr30k and Flickr8k terms of use; splits published "
            "for research by A. Karpathy",
            homepage="https://cs.stanford.edu/people/karpathy/deepimagesent/",
            size="one zip of three JSON files (dataset_coco.json alone ~140 MB unpacked)",
            sources=(Source("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip", "zip"),),
            targets=(
                Target("dataset_coco.json", "file", "dataset_coco.json"),
                Target("dataset_flickr30k.json", "file", "dataset_flickr30k.json"),
                Target("dataset_flickr8k.json", "file", "dataset_flickr8k.json"),
            ),
            used_by="ingest.corpus, train.val_captions, evaluate.annotations (every COCO/Flickr30k config)",
        ),
        Dataset(
            name="coco-val2014",
            title="COCO 2014 validation images (holds the Karpathy val and test images)",
            licence=COCO_LICENCE,
            homepage="https://cocodataset.org/#download",
            size="6.6 GB",
            sources=(Source("http://images.cocodataset.org/zips/val2014.zip", "zip", 6_645_013_297,
                            "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0", TFDS),),  # fmt: skip
            targets=(Target("coco/val2014", "folder", "val2014/", images=40_504),),
            used_by="train.val_images, evaluate.images (coco-karpathy-test / -val)",
        ),
        Dataset(
            name="coco-train2014",
            title="COCO 2014 training images (Karpathy train/restval images; not needed to train on synthetic data)",
            licence=COCO_LICENCE,
            homepage="https://cocodataset.org/#download",
            size="13.5 GB",
            sources=(Source("http://images.cocodataset.org/zips/train2014.zip", "zip", 13_510_573_713,
                            "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775", TFDS),),  # fmt: skip
            targets=(Target("coco/train2014", "folder", "train2014/", images=82_783),),
            used_by="real-data baselines and CLIP scores on real photos",
        ),
        Dataset(
            name="coco2017-captions",
            title="COCO 2017 caption annotations (train and val)",
            licence=COCO_LICENCE,
            homepage="https://cocodataset.org/#download",
            size="253 MB download (the trainval2017 annotations archive); only the two caption files are kept",
            sources=(Source("http://images.cocodataset.org/annotations/annotations_trainval2017.zip", "zip",
                            252_907_541, "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
                            TFDS),),  # fmt: skip
            targets=(
                Target("coco/annotations/captions_train2017.json", "file", "captions_train2017.json"),
                Target("coco/annotations/captions_val2017.json", "file", "captions_val2017.json"),
            ),
            used_by="ingest.corpus (format coco), evaluate --benchmark coco-captions",
        ),
        Dataset(
            name="nocaps-val-annotations",
            title="NoCaps validation captions (4,500 images, 10 captions each, in/near/out-domain)",
            licence="CC BY 2.0 (nocaps.org)",
            homepage="https://nocaps.org/download",
            size="one JSON file, a few MB",
            sources=(Source("https://nocaps.s3.amazonaws.com/nocaps_val_4500_captions.json", "file"),),
            targets=(Target("nocaps_val_4500_captions.json", "file", "nocaps_val_4500_captions.json"),),
            used_by="evaluate.annotations (coco_to_nocaps.yaml)",
        ),
        Dataset(
            name="nocaps-val-images",
            title="NoCaps validation images (Open Images), each fetched from the URL its annotation names",
            licence="Open Images: CC BY 2.0 per image (see each image's Flickr page)",
            homepage="https://nocaps.org/download",
            size="4,500 files (Open Images photos, a few GB)",
            sources=(Source("https://nocaps.s3.amazonaws.com/nocaps_val_4500_captions.json", "image-list"),),
            targets=(Target("nocaps/validation", "folder", images=4_500),),
            used_by="evaluate.images (coco_to_nocaps.yaml)",
            needs=("nocaps-val-annotations",),
        ),
        Dataset(
            name="flickr30k-images",
            title="Flickr30k images (31,783 photos)",
            licence="Flickr terms of use; non-commercial research (request form)",
            homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
            size="4.4 GB",
            sources=(),
            targets=(Target("flickr30k/images", "folder", "flickr30k-images/", images=31_783),),
            used_by="train.val_images, evaluate.images (coco_to_flickr30k.yaml)",
            manual="the Flickr30k images are given out after a request form: fill it in at "
            "https://shannon.cs.illinois.edu/DenotationGraph/ (or take flickr30k-images.tar.gz from the "
            "link its answer gives), then either put the archive in ROOT/downloads/ and run "
            "`icsd data download flickr30k-images` again (it is checked and unpacked into "
            "ROOT/flickr30k/images/), or unpack it yourself so the .jpg files lie in ROOT/flickr30k/images/; "
            "`icsd data check configs/coco_to_flickr30k.yaml` verifies them",
            manual_archives=("flickr30k-images.tar.gz", "flickr30k-images.tar", "flickr30k-images.zip",
                             "flickr30k.tar.gz"),  # fmt: skip
        ),
    )
}

GROUPS: dict[str, tuple[str, ...]] = {
    "coco": ("karpathy-splits", "coco-val2014", "coco-train2014"),
    "flickr30k": ("karpathy-splits", "flickr30k-images"),
    "nocaps": ("nocaps-val-annotations", "nocaps-val-images"),
    "all": tuple(DATASETS),
}

# the images each evaluation set reads (icsd.eval_sets names)
BENCHMARK_IMAGES = {
    "coco-karpathy-test": "coco-val2014",
    "coco-karpathy-val": "coco-val2014",
    "flickr30k-karpathy-test": "flickr30k-images",
    "flickr30k-karpathy-val": "flickr30k-images",
    "nocaps-val": "nocaps-val-images",
}


def resolve_names(names: list[str]) -> list[Dataset]:
    """Data set and group names -> the data sets, each once, what one needs before it."""
    from ..registry import closest

    if not names:
        raise UserError(f"name at least one data set: {', '.join([*DATASETS, *GROUPS])} (icsd data list)")
    out: list[str] = []

    def add(name: str) -> None:
        if name in out:
            return
        for need in DATASETS[name].needs:
            add(need)
        out.append(name)

    for name in names:
        if name in GROUPS:
            for member in GROUPS[name]:
                add(member)
        elif name in DATASETS:
            add(name)
        else:
            raise UserError(f"unknown data set {name!r}{closest(name, [*DATASETS, *GROUPS])}; see icsd data list")
    return [DATASETS[n] for n in out]


def mirror_url(url: str, mirror: str | None = None) -> str:
    """``url`` as fetched: from ``mirror`` (or ``$ICSD_DATA_MIRROR``) as ``MIRROR/<host>/<path>``."""
    base = mirror or os.environ.get(MIRROR_ENV)
    if not base:
        return url
    parts = urlsplit(url)
    return f"{base.rstrip('/')}/{parts.netloc}{parts.path}"


def dataset_for_path(rel: str) -> tuple[Dataset, Target] | None:
    """The data set whose target is ``rel`` (a path relative to a data root)."""
    for d in DATASETS.values():
        for t in d.targets:
            if t.path == rel:
                return d, t
    return None
