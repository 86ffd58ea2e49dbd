"""Hidden scenes, the partial captions people would write of them, and how a description becomes a
drawable scene.

A :class:`Scene` is a background and 1-5 object groups (distinct kinds), each with a colour, a
size, a count (1-3) and its own grid cell. :func:`scene_captions` writes five captions of a scene,
COCO style: each names 1-3 of its objects with some of their attributes, sometimes the background
or a true relation, never anything false (:func:`agrees` checks a description against a scene).
:func:`realise` turns what a sentence says into a scene, drawing what it leaves open from an rng.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .draw import Placed
from .lexicon import (
    BACKGROUND_NOUNS,
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CELLS,
    COLOURS,
    KINDS,
    NOUNS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SIZES,
    Description,
    Mention,
    noun_phrase,
    relation_holds,
)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Placed, ...]

    def get(self, kind: str) -> Placed | None:
        return next((o for o in self.objects if o.kind == kind), None)

    def to_json(self) -> dict[str, object]:
        return {"background": self.background, "objects": [o.__dict__ for o in self.objects]}

    @staticmethod
    def from_json(data: dict[str, object]) -> Scene:
        objects: Any = data["objects"]
        return Scene(str(data["background"]), tuple(Placed(**o) for o in objects))


OBJECTS_PER_SCENE = (1, 2, 3, 4, 5)
OBJECT_WEIGHTS = (0.05, 0.15, 0.3, 0.3, 0.2)  # cluttered, as photos are
COUNT_WEIGHTS = (0.7, 0.2, 0.1)  # one, two or three of a kind

# Scene types: where a photo is taken decides what is in it (COCO: a kitchen has a sink and a cup, a
# beach an umbrella and a kite). Each type has a background and the kinds found there, most likely
# first; an object is of the type's kinds with probability 1 - OFF_TYPE, else of any kind.
SCENE_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "beach": ("sand", ("umbrella", "ball", "kite", "boat", "hat", "bird", "chair", "bottle")),
    "park": ("grass", ("tree", "kite", "flower", "ball", "bird", "house", "chair", "umbrella")),
    "snowfield": ("snow", ("tree", "house", "hat", "car", "star", "cone", "bird", "box")),
    "street": ("road", ("car", "cone", "house", "lamp", "tree", "clock", "box", "bird")),
    "lake": ("water", ("boat", "fish", "bird", "ring", "ball", "kite", "house", "tree")),
    "kitchen": ("floor", ("cup", "bottle", "clock", "chair", "box", "lamp", "flower", "star")),
    "living room": ("carpet", ("chair", "lamp", "box", "ball", "hat", "clock", "star", "ring")),
    "farm": ("dirt", ("house", "car", "tree", "box", "bird", "hat", "flower", "cone")),
    "bathroom": ("tiles", ("bottle", "cup", "lamp", "clock", "ring", "box", "fish", "flower")),
    "rink": ("ice", ("hat", "star", "cone", "ball", "ring", "house", "tree", "bird")),
    "garden": ("gravel", ("flower", "tree", "chair", "umbrella", "bird", "house", "lamp", "cup")),
}
TYPE_KIND_WEIGHTS = (8, 5, 3, 2, 1, 1, 1, 1)  # the i-th kind of a type, relative to the others
OFF_TYPE = 0.03
# The subject: COCO photos have one (86 % of an image's captions name its most-named object, the
# calibration table); it is the first object of a scene, drawn larger and more often in the middle.
SUBJECT_SIZE_WEIGHTS = (0.1, 0.3, 0.6)  # small, medium, large
SUBJECT_MIDDLE = 0.5


def _kinds(rng: random.Random, scene_type: str, n: int) -> list[str]:
    kinds: list[str] = []
    typical, weights = list(SCENE_TYPES[scene_type][1]), list(TYPE_KIND_WEIGHTS)
    while len(kinds) < n:
        pool = [k for k in KINDS if k not in kinds]
        own = [(k, w) for k, w in zip(typical, weights, strict=True) if k not in kinds]
        if own and rng.random() >= OFF_TYPE:
            kinds.append(rng.choices([k for k, _ in own], [w for _, w in own])[0])
        else:
            kinds.append(rng.choice(pool))
    return kinds


def random_scene(rng: random.Random) -> Scene:
    """A scene of a random type: its background, a subject and 0-4 more objects that go with it."""
    scene_type = rng.choice(sorted(SCENE_TYPES))
    n = rng.choices(OBJECTS_PER_SCENE, OBJECT_WEIGHTS)[0]
    kinds = _kinds(rng, scene_type, n)
    subject_cell = "middle" if rng.random() < SUBJECT_MIDDLE else rng.choice(POSITIONS)
    cells = [subject_cell] + rng.sample([p for p in POSITIONS if p != subject_cell], n - 1)
    objects = tuple(
        Placed(
            kind,
            rng.choice(COLOURS),
            rng.choices(SIZES, SUBJECT_SIZE_WEIGHTS)[0] if i == 0 else rng.choice(SIZES),
            rng.choices((1, 2, 3), COUNT_WEIGHTS)[0],
            cell,
        )
        for i, (kind, cell) in enumerate(zip(kinds, cells, strict=True))
    )
    return Scene(SCENE_TYPES[scene_type][0], objects)


def true_relations(scene: Scene) -> list[tuple[str, str, str]]:
    out = []
    for a, b in itertools.permutations(scene.objects, 2):
        for rel in RELATIONS:
            if relation_holds(rel, CELLS[a.position], CELLS[b.position], b.kind):
                out.append((a.kind, rel, b.kind))
    return out


def agrees(desc: Description, scene: Scene) -> list[str]:
    """What ``desc`` states that is false of ``scene`` (empty: nothing)."""
    wrong = []
    if desc.background is not None and desc.background != scene.background:
        wrong.append(f"background {desc.background}")
    for kind, m in desc.objects.items():
        obj = scene.get(kind)
        if obj is None:
            wrong.append(f"no {kind} in the scene")
            continue
        for name in ("colour", "size", "count", "position"):
            said = getattr(m, name)
            if said is not None and said != getattr(obj, name):
                wrong.append(f"{kind} {name} {said}")
    truths = set(true_relations(scene))
    wrong += [f"relation {r}" for r in desc.relations if r not in truths]
    return wrong


# ----------------------------------------------------------------------------- captions


COLOUR_MENTION = 0.95
SETTING_SCALE = 3.0


def _mention(obj: Placed, rng: random.Random, *, position: bool = False) -> Mention:
    return Mention(
        kind=obj.kind,
        colour=obj.colour if rng.random() < COLOUR_MENTION else None,
        size=obj.size if obj.size != "medium" and rng.random() < 0.35 else None,
        count=obj.count,
        position=obj.position if position else None,
    )


# People who caption one photo mostly agree on what to call a thing (a sailboat is a "sailboat" to
# most of them): each object of a scene has a preferred noun, used with this probability.
NOUN_AGREEMENT = 0.95


def _preferred_noun(scene: Scene, kind: str) -> int:
    obj = scene.get(kind)
    key = f"{scene.background}|{kind}|{obj.colour if obj else ''}|{obj.position if obj else ''}"
    return zlib.crc32(key.encode())


def _np(m: Mention, rng: random.Random, scene: Scene) -> str:
    synonym = _preferred_noun(scene, m.kind) if rng.random() < NOUN_AGREEMENT else rng.randrange(3)
    size_word = synonym if rng.random() < NOUN_AGREEMENT else rng.randrange(3)
    return noun_phrase(m, synonym=synonym, size_word=size_word)


def _pos(m: Mention, rng: random.Random) -> str:
    return rng.choice(POSITION_PHRASES[m.position]) if m.position else ""


def _bg(scene: Scene, rng: random.Random) -> str:
    phrases = BACKGROUND_PHRASES[scene.background]
    if rng.random() < NOUN_AGREEMENT:
        return phrases[zlib.crc32(repr(scene).encode()) % len(phrases)]
    return rng.choice(phrases)


def _setting(scene: Scene, rng: random.Random, p: float) -> str:
    """`` on the beach`` with probability ``p`` * :data:`SETTING_SCALE`, else nothing."""
    return f" {_bg(scene, rng)}" if rng.random() < min(1.0, p * SETTING_SCALE) else ""


def _be(m: Mention) -> str:
    return "is" if (m.count or 1) == 1 else "are"


Pattern = Callable[[Scene, random.Random], str | None]


# How people pick what to name: the subject first (most captions name it), the other objects by
# how prominent they are (the scene's order), each less often than the one before.
SUBJECT_MENTION = 0.9
OTHER_DECAY = 0.25


def _salience_order(scene: Scene, rng: random.Random) -> list[Placed]:
    """The scene's objects in the order a caption writer reaches for them."""
    rest = list(scene.objects[1:])
    order = []
    weights = [OTHER_DECAY**i for i in range(len(rest))]
    while rest:
        i = rng.choices(range(len(rest)), weights)[0]
        order.append(rest.pop(i))
        weights.pop(i)
    subject = scene.objects[:1]
    if subject and rng.random() < SUBJECT_MENTION:
        return [*subject, *order]
    return [*order, *subject]


def _pick(scene: Scene, rng: random.Random, n: int) -> list[Placed] | None:
    return _salience_order(scene, rng)[:n] if len(scene.objects) >= n else None


def _one(scene: Scene, rng: random.Random) -> Placed | None:
    return _salience_order(scene, rng)[0] if scene.objects else None


def p_object_on_background(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    return f"{_np(_mention(o, r), r, s)} {_bg(s, r)}" if o else None


def p_there_is_at(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    if o is None:
        return None
    m = _mention(o, r, position=True)
    return f"there {_be(m)} {_np(m, r, s)} {_pos(m, r)}"


def p_two_objects(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, 2)
    if not objs:
        return None
    a, b = (_np(_mention(o, r), r, s) for o in objs)
    return f"{a} and {b}" + _setting(s, r, 0.4)


def p_three_objects(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, 3)
    if not objs:
        return None
    a, b, c = (_np(_mention(o, r), r, s) for o in objs)
    return f"{a}, {b} and {c}" + _setting(s, r, 0.3)


def p_picture_of(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    if o is None:
        return None
    lead = r.choice(("a picture of", "a photo of", "an image of", "a photo showing"))
    return f"{lead} {_np(_mention(o, r), r, s)}" + _setting(s, r, 0.5)


def p_background_with(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, min(len(s.objects), r.choice((1, 2))))
    if not objs:
        return None
    nps = [_np(_mention(o, r), r, s) for o in objs]
    return f"{r.choice(BACKGROUND_NOUNS[s.background])} with " + " and ".join(nps)


def _related(s: Scene, r: random.Random, rels: tuple[str, ...]) -> tuple[Placed, str, Placed] | None:
    truths = [t for t in true_relations(s) if t[1] in rels]
    if not truths:
        return None
    a, rel, b = r.choice(truths)
    return s.get(a), rel, s.get(b)  # type: ignore[return-value]


def p_relation(s: Scene, r: random.Random) -> str | None:
    found = _related(s, r, RELATIONS)
    if found is None:
        return None
    a, rel, b = found
    return f"{_np(_mention(a, r), r, s)} {r.choice(RELATION_PHRASES[rel])} {_np(_mention(b, r), r, s)}" + _setting(s, r, 0.3)


def p_there_is_relation(s: Scene, r: random.Random) -> str | None:
    found = _related(s, r, ("next to", "above", "below", "on"))
    if found is None:
        return None
    a, rel, b = found
    ma = _mention(a, r)
    return f"there {_be(ma)} {_np(ma, r, s)} {r.choice(RELATION_PHRASES[rel])} {_np(_mention(b, r), r, s)}"


def p_close_up(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    return f"a close up of {_np(_mention(o, r), r, s)}" if o else None


def p_sitting(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    if o is None:
        return None
    verb = r.choice(("sitting", "lying", "standing", "resting"))
    return f"{_np(_mention(o, r), r, s)} {verb} {_bg(s, r)}"


def p_scene_with(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, 2)
    if not objs:
        return None
    a, b = (_np(_mention(o, r), r, s) for o in objs)
    return f"{r.choice(('a scene with', 'a view of', 'a colorful scene with'))} {a} and {b}"


def p_two_positions(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, 2)
    if not objs:
        return None
    ma, mb = (_mention(o, r, position=True) for o in objs)
    return f"{_np(ma, r, s)} {_pos(ma, r)} and {_np(mb, r, s)} {_pos(mb, r)}"


def p_position_first(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    if o is None:
        return None
    m = _mention(o, r, position=True)
    return f"{_np(m, r, s)} {_pos(m, r)} of the picture" + _setting(s, r, 0.3)


PATTERNS: tuple[Pattern, ...] = (
    p_object_on_background, p_there_is_at, p_two_objects, p_three_objects, p_picture_of,
    p_background_with, p_relation, p_there_is_relation, p_close_up, p_sitting, p_scene_with,
    p_two_positions, p_position_first,
)  # fmt: skip
PATTERN_AGREEMENT = 0.7
PATTERN_WEIGHTS = (3, 2, 3, 1, 2, 2, 2, 1, 1, 2, 2, 1, 1)


def scene_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct partial captions of ``scene`` (true, COCO-like, 1-3 objects each)."""
    out: list[str] = []
    tries = 0
    preferred = PATTERNS[zlib.crc32(repr(scene).encode()) % len(PATTERNS)]
    while len(out) < n and tries < 200:
        tries += 1
        pattern = preferred if rng.random() < PATTERN_AGREEMENT else rng.choices(PATTERNS, PATTERN_WEIGHTS)[0]
        text = pattern(scene, rng)
        if text and text not in out:
            out.append(text)
    return out


# ----------------------------------------------------------------------------- from words to a scene


def _layout(desc: Description, kinds: list[str], rng: random.Random) -> dict[str, str]:
    """A cell per kind: stated positions kept where free, the rest chosen so the stated relations
    hold when some arrangement makes them hold."""
    cells: dict[str, str] = {}
    for k in kinds:
        pos = desc.objects[k].position if k in desc.objects else None
        if pos and pos not in cells.values():
            cells[k] = pos
    free_kinds = [k for k in kinds if k not in cells]
    free_cells = [p for p in POSITIONS if p not in cells.values()]
    rels = [t for t in desc.relations if t[0] in kinds and t[2] in kinds]
    perms = list(itertools.permutations(free_cells, len(free_kinds)))
    rng.shuffle(perms)
    best, best_ok = None, -1
    for perm in perms[:200]:
        trial = {**cells, **dict(zip(free_kinds, perm, strict=True))}
        ok = sum(relation_holds(r, CELLS[trial[a]], CELLS[trial[b]], b) for a, r, b in rels)
        if ok > best_ok:
            best, best_ok = trial, ok
        if ok == len(rels):
            break
    return best or cells


def realise(
    desc: Description, rng: random.Random, extra_objects: float = 0.0, capacity: int = len(POSITIONS)
) -> Scene:
    """A scene showing what ``desc`` says of its first ``capacity`` kinds; what it leaves open
    comes from ``rng``. With ``extra_objects`` > 0, each free cell holds an unmentioned object with
    that probability."""
    background = desc.background or rng.choice(BACKGROUNDS)
    kinds = list(desc.objects)[: min(capacity, len(POSITIONS))]
    free = [k for k in KINDS if k not in kinds]
    n_extra = sum(rng.random() < extra_objects for _ in range(len(POSITIONS) - len(kinds)))
    extra = rng.sample(free, n_extra)
    cells = _layout(desc, kinds + extra, rng)
    objects = []
    for k in kinds + extra:
        m = desc.objects.get(k, Mention(k))
        objects.append(
            Placed(
                k,
                m.colour or rng.choice(COLOURS),
                m.size or rng.choice(SIZES),
                m.count or 1,
                cells[k],
            )
        )
    return Scene(background, tuple(objects))


def scene_description(scene: Scene) -> Description:
    """Everything true of ``scene`` as a description (for tests and the camera's summaries)."""
    objs = {o.kind: Mention(o.kind, o.colour, o.size, o.count, o.position) for o in scene.objects}
    return Description(scene.background, objs, [])


__all__ = ["NOUNS", "Scene", "agrees", "random_scene", "realise", "scene_captions", "true_relations"]
