"""How much the sandbox world's caption corpus looks like COCO's, measured the same way on both.

The method rests on properties of a caption corpus: captions of one image are more alike than a
caption and its K-th neighbour, so a caption's nearest neighbours are mostly other views of the same
image; captions share a salient subject; objects co-occur. :func:`corpus_statistics` measures them
on any list of (image id, caption) rows with one embedder and exact search, and
:data:`TOLERANCES` says how close the world must come to COCO at the same number of captions.

Object words: the world's kinds are read with its lexicon (:func:`world_objects`); COCO's with
:data:`COCO_OBJECTS`, the 80 COCO categories and the nouns people use for them
(:func:`coco_objects`), so "a man on a surfboard" names ``person`` and ``surfboard``.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The 80 COCO categories, each with the nouns captions use for it (singular; plurals are derived).
COCO_OBJECTS: dict[str, tuple[str, ...]] = {
    "person": ("person", "man", "woman", "boy", "girl", "child", "kid", "people", "men", "women", "children",
               "player", "guy", "lady", "skier", "surfer", "skateboarder", "snowboarder", "rider", "baby",
               "tennis player", "batter", "catcher", "pitcher", "crowd", "couple", "family", "adult", "teenager",
               "someone", "chef", "officer", "soldier", "worker", "biker", "cowboy", "athlete", "gentleman"),
    "bicycle": ("bicycle", "bike", "cycle"), "car": ("car", "taxi", "suv", "vehicle", "jeep"),
    "motorcycle": ("motorcycle", "motorbike", "scooter", "moped"), "airplane": ("airplane", "plane", "jet", "aircraft", "airliner"),
    "bus": ("bus",), "train": ("train", "locomotive", "tram", "trolley"), "truck": ("truck", "pickup"),
    "boat": ("boat", "ship", "sailboat", "canoe", "kayak", "yacht", "ferry"), "traffic light": ("traffic light", "stoplight", "traffic signal"),
    "fire hydrant": ("fire hydrant", "hydrant"), "stop sign": ("stop sign",), "parking meter": ("parking meter", "meter"),
    "bench": ("bench",), "bird": ("bird", "pigeon", "seagull", "gull", "duck", "parrot", "goose", "swan"),
    "cat": ("cat", "kitten", "kitty"), "dog": ("dog", "puppy", "pup"), "horse": ("horse", "pony"),
    "sheep": ("sheep", "lamb"), "cow": ("cow", "cattle", "bull", "calf"), "elephant": ("elephant",),
    "bear": ("bear",), "zebra": ("zebra",), "giraffe": ("giraffe",), "backpack": ("backpack",),
    "umbrella": ("umbrella", "parasol"), "handbag": ("handbag", "purse", "bag"), "tie": ("tie", "necktie"),
    "suitcase": ("suitcase", "luggage"), "frisbee": ("frisbee",), "skis": ("ski", "skis"),
    "snowboard": ("snowboard",), "sports ball": ("ball", "baseball", "football", "soccer ball", "tennis ball"),
    "kite": ("kite",), "baseball bat": ("bat", "baseball bat"), "baseball glove": ("glove", "mitt"),
    "skateboard": ("skateboard",), "surfboard": ("surfboard", "surf board"), "tennis racket": ("racket", "racquet"),
    "bottle": ("bottle",), "wine glass": ("wine glass", "glass"), "cup": ("cup", "mug"), "fork": ("fork",),
    "knife": ("knife", "knives"), "spoon": ("spoon",), "bowl": ("bowl",), "banana": ("banana",), "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger"), "orange": ("orange",), "broccoli": ("broccoli",),
    "carrot": ("carrot",), "hot dog": ("hot dog", "hotdog"), "pizza": ("pizza",), "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake"), "chair": ("chair",), "couch": ("couch", "sofa"), "potted plant": ("plant", "potted plant"),
    "bed": ("bed",), "dining table": ("table", "dining table", "desk"), "toilet": ("toilet",),
    "tv": ("tv", "television", "monitor", "screen"), "laptop": ("laptop", "computer"), "mouse": ("mouse",),
    "remote": ("remote", "controller"), "keyboard": ("keyboard",), "cell phone": ("phone", "cellphone", "cell phone", "smartphone"),
    "microwave": ("microwave",), "oven": ("oven", "stove"), "toaster": ("toaster",), "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge"), "book": ("book",), "clock": ("clock",), "vase": ("vase",),
    "scissors": ("scissors",), "teddy bear": ("teddy bear", "teddy", "stuffed animal"), "hair drier": ("hair dryer", "hair drier", "blow dryer"),
    "toothbrush": ("toothbrush",),
}  # fmt: skip
# "orange" is a colour far more often than a fruit in captions: counted only as "oranges"
_AMBIGUOUS_SINGULAR = frozenset({"orange", "glass", "bat", "mouse", "meter", "screen", "bag", "plant"})


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith("fe"):
        return word[:-2] + "ves"
    return word + "s"


def _coco_table() -> dict[tuple[str, ...], str]:
    table: dict[tuple[str, ...], str] = {}
    for category, nouns in COCO_OBJECTS.items():
        for noun in nouns:
            words = noun.split()
            if noun not in _AMBIGUOUS_SINGULAR:
                table[tuple(words)] = category
            table[(*words[:-1], _plural(words[-1]))] = category
    return table


_COCO_TABLE = _coco_table()
_COCO_LONGEST = max(len(k) for k in _COCO_TABLE)
_WORD = re.compile(r"[a-z]+")


def coco_objects(caption: str) -> set[str]:
    """The COCO categories a caption names (longest phrase first: "tennis ball" is a sports ball)."""
    words = _WORD.findall(caption.lower())
    found: set[str] = set()
    i = 0
    while i < len(words):
        for n in range(_COCO_LONGEST, 0, -1):
            category = _COCO_TABLE.get(tuple(words[i : i + n]))
            if category is not None:
                found.add(category)
                i += n
                break
        else:
            i += 1
    return found


def world_objects(caption: str) -> set[str]:
    """The sandbox kinds a caption names, read with the world's lexicon."""
    from .lexicon import parse

    return set(parse(caption).objects)


# ----------------------------------------------------------------------------- the statistics


@dataclass(frozen=True)
class Corpus:
    """Captions with the image each was written about (same length, same order)."""

    image_ids: list[str]
    captions: list[str]

    def __post_init__(self) -> None:
        if len(self.image_ids) != len(self.captions):
            raise ValueError("one image id per caption")

    def sample_images(self, n_images: int, per_image: int, seed: int) -> Corpus:
        """``n_images`` random images with ``per_image`` captions each (their first ones)."""
        by_image: dict[str, list[str]] = defaultdict(list)
        for image, caption in zip(self.image_ids, self.captions, strict=True):
            by_image[image].append(caption)
        eligible = sorted(i for i, cs in by_image.items() if len(cs) >= per_image)
        if n_images > len(eligible):
            raise ValueError(f"{n_images} images asked, {len(eligible)} have {per_image} captions")
        chosen = random.Random(seed).sample(eligible, n_images)
        ids = [i for i in chosen for _ in range(per_image)]
        return Corpus(ids, [c for i in chosen for c in by_image[i][:per_image]])


def coco_corpus(path: Path) -> Corpus:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    anns = data["annotations"]
    return Corpus([str(a["image_id"]) for a in anns], [" ".join(a["caption"].split()) for a in anns])


def world_corpus(world_dir: Path) -> Corpus:
    """The world's text-only train corpus with its hidden scene ids (read for measurement only)."""
    data = json.loads((Path(world_dir) / "train_scenes.json").read_text(encoding="utf-8"))
    ids, captions = [], []
    for k, entry in enumerate(data["scenes"]):
        for caption in entry["captions"]:
            ids.append(str(k))
            captions.append(caption)
    return Corpus(ids, captions)


def neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` neighbours of every row by cosine (rows L2-normalised), itself excluded:
    (indices ``[n, k]``, similarities ``[n, k]``), nearest first."""
    n = len(vectors)
    idx = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, 2048):
        block = vectors[start : start + 2048] @ vectors.T
        rows = np.arange(len(block))
        block[rows, start + rows] = -np.inf
        top = np.argpartition(-block, k, axis=1)[:, :k]
        top_sims = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        idx[start : start + len(block)] = np.take_along_axis(top, order, axis=1)
        sims[start : start + len(block)] = np.take_along_axis(top_sims, order, axis=1)
    return idx, sims


def _npmi(pair: int, a: int, b: int, n: int) -> float:
    p_ab, p_a, p_b = pair / n, a / n, b / n
    if p_ab >= 1.0:
        return 1.0
    return math.log(p_ab / (p_a * p_b)) / -math.log(p_ab)


def corpus_statistics(
    corpus: Corpus, vectors: np.ndarray, objects: Callable[[str], set[str]], k: int = 29
) -> dict[str, float]:
    """The calibration statistics of one corpus (``vectors``: its captions' normalised embeddings).

    - ``same_image_in_top_k``: of a caption's other captions of the same image, the share among its
      ``k`` nearest neighbours (K = 30 candidate sets hold the caption and 29 others);
    - ``nn_same_image``: the share of captions whose nearest neighbour is of the same image;
    - ``within_minus_kth``: the mean cosine between two captions of one image, minus the mean cosine
      between a caption and its ``k``-th neighbour;
    - ``objects_per_caption``: object words (distinct categories) a caption names;
    - ``objects_per_image``: distinct categories an image's captions name together;
    - ``salience``: the share of an image's captions that name its most-named category;
    - ``cooccurrence_npmi``: how predictable one object of an image is from another: the mean
      normalised PMI, over images, of every pair of categories named in one image (0: independent)."""
    ids = np.asarray(corpus.image_ids)
    idx, sims = neighbours(vectors, k)
    same = ids[idx] == ids[:, None]
    group_size = Counter(corpus.image_ids)
    others = np.asarray([group_size[i] - 1 for i in corpus.image_ids], dtype=np.float64)
    has_others = others > 0
    same_in_top = float(np.mean(same[has_others].sum(axis=1) / others[has_others]))
    nn_same = float(np.mean(same[has_others, 0]))

    rows_of: dict[str, list[int]] = defaultdict(list)
    for row, image in enumerate(corpus.image_ids):
        rows_of[image].append(row)
    within = []
    for rows in rows_of.values():
        if len(rows) > 1:
            block = vectors[rows] @ vectors[rows].T
            within.append(float(block[np.triu_indices(len(rows), 1)].mean()))
    within_minus_kth = float(np.mean(within) - sims[:, k - 1].mean())

    named = [objects(c) for c in corpus.captions]
    per_image: dict[str, list[set[str]]] = defaultdict(list)
    for image, found in zip(corpus.image_ids, named, strict=True):
        per_image[image].append(found)
    unions = {image: set().union(*sets) for image, sets in per_image.items()}
    salience = [
        max(Counter(o for s in sets for o in s).values()) / len(sets)
        for image, sets in per_image.items()
        if unions[image]
    ]
    presence = Counter(o for u in unions.values() for o in u)
    pairs = Counter((a, b) for u in unions.values() for a in u for b in u if a < b)
    n_images = len(unions)
    npmi = [
        float(np.mean([_npmi(pairs[(a, b)], presence[a], presence[b], n_images) for a in u for b in u if a < b]))
        for u in unions.values()
        if len(u) > 1
    ]
    return {
        "captions": float(len(corpus.captions)),
        "images": float(len(per_image)),
        "same_image_in_top_k": same_in_top,
        "nn_same_image": nn_same,
        "within_minus_kth": within_minus_kth,
        "objects_per_caption": float(np.mean([len(s) for s in named])),
        "objects_per_image": float(np.mean([len(u) for u in unions.values()])),
        "salience": float(np.mean(salience)),
        "cooccurrence_npmi": float(np.mean(npmi)) if npmi else 0.0,
    }


# How close the world must come to COCO, per statistic: ("relative", r) = within r of COCO's value
# as a share of it; ("absolute", a) = within a. The neighbour shares are the method's premise
# (25 %); counts of object words depend on the lexicon that reads them (30 %); the similarity gap
# and the co-occurrence score can be near 0, so their tolerances are absolute.
TOLERANCES: dict[str, tuple[str, float]] = {
    "same_image_in_top_k": ("relative", 0.25),
    "nn_same_image": ("relative", 0.25),
    "within_minus_kth": ("absolute", 0.05),
    "objects_per_caption": ("relative", 0.30),
    "objects_per_image": ("relative", 0.30),
    "salience": ("relative", 0.15),
    "cooccurrence_npmi": ("absolute", 0.10),
}
LABELS: dict[str, str] = {
    "same_image_in_top_k": "share of a caption's same-image captions among its top-29 neighbours",
    "nn_same_image": "nearest neighbour from the same image",
    "within_minus_kth": "mean cosine within an image minus mean cosine of the 29th neighbour",
    "objects_per_caption": "object words per caption",
    "objects_per_image": "distinct object words per image (union over its captions)",
    "salience": "share of an image's captions naming its most-named object",
    "cooccurrence_npmi": "co-occurrence: mean NPMI of two objects of one image",
}


def within_tolerance(name: str, world: float, coco: float) -> bool:
    kind, bound = TOLERANCES[name]
    if kind == "relative":
        return abs(world - coco) <= bound * abs(coco)
    return abs(world - coco) <= bound


def tolerance_text(name: str) -> str:
    kind, bound = TOLERANCES[name]
    return f"±{bound:.0%} of COCO" if kind == "relative" else f"±{bound:g}"


def comparison_rows(world: dict[str, float], coco: dict[str, float]) -> list[dict[str, Any]]:
    return [
        {
            "statistic": name,
            "label": LABELS[name],
            "world": world[name],
            "coco": coco[name],
            "tolerance": tolerance_text(name),
            "ok": within_tolerance(name, world[name], coco[name]),
        }
        for name in TOLERANCES
    ]


def markdown_table(columns: Sequence[tuple[str, dict[str, float]]], coco_column: int = 1) -> str:
    """A table with one row per statistic and one column per measured corpus; the last column says
    whether the first column is within tolerance of column ``coco_column``."""
    head = "| statistic | " + " | ".join(name for name, _ in columns) + " | tolerance | within |"
    lines = [head, "|---" * (len(columns) + 3) + "|"]
    for name in TOLERANCES:
        values = " | ".join(f"{stats[name]:.3f}" for _, stats in columns)
        ok = within_tolerance(name, columns[0][1][name], columns[coco_column][1][name])
        lines.append(f"| {LABELS[name]} | {values} | {tolerance_text(name)} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)
