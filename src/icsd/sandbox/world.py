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


def random_scene(rng: random.Random) -> Scene:
    n = rng.choices(OBJECTS_PER_SCENE, OBJECT_WEIGHTS)[0]
    kinds = rng.sample(KINDS, n)
    cells = rng.sample(POSITIONS, n)
    objects = tuple(
        Placed(kind, rng.choice(COLOURS), rng.choice(SIZES), rng.choices((1, 2, 3), COUNT_WEIGHTS)[0], cell)
        for kind, cell in zip(kinds, cells, strict=True)
    )
    return Scene(rng.choice(BACKGROUNDS), objects)


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


def _mention(obj: Placed, rng: random.Random, *, position: bool = False) -> Mention:
    return Mention(
        kind=obj.kind,
        colour=obj.colour if rng.random() < 0.75 else None,
        size=obj.size if obj.size != "medium" and rng.random() < 0.35 else None,
        count=obj.count,
        position=obj.position if position else None,
    )


def _np(m: Mention, rng: random.Random) -> str:
    return noun_phrase(m, synonym=rng.randrange(3), size_word=rng.randrange(3))


def _pos(m: Mention, rng: random.Random) -> str:
    return rng.choice(POSITION_PHRASES[m.position]) if m.position else ""


def _bg(scene: Scene, rng: random.Random) -> str:
    return rng.choice(BACKGROUND_PHRASES[scene.background])


def _be(m: Mention) -> str:
    return "is" if (m.count or 1) == 1 else "are"


Pattern = Callable[[Scene, random.Random], str | None]


def _pick(scene: Scene, rng: random.Random, n: int) -> list[Placed] | None:
    return rng.sample(scene.objects, n) if len(scene.objects) >= n else None


def _one(scene: Scene, rng: random.Random) -> Placed | None:
    return rng.choice(scene.objects) if scene.objects else None


def p_object_on_background(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    return f"{_np(_mention(o, r), r)} {_bg(s, r)}" if o else None


def p_there_is_at(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    if o is None:
        return None
    m = _mention(o, r, position=True)
    return f"there {_be(m)} {_np(m, r)} {_pos(m, r)}"


def p_two_objects(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, 2)
    if not objs:
        return None
    a, b = (_np(_mention(o, r), r) for o in objs)
    return f"{a} and {b}" + (f" {_bg(s, r)}" if r.random() < 0.4 else "")


def p_three_objects(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, 3)
    if not objs:
        return None
    a, b, c = (_np(_mention(o, r), r) for o in objs)
    return f"{a}, {b} and {c}" + (f" {_bg(s, r)}" if r.random() < 0.3 else "")


def p_picture_of(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    if o is None:
        return None
    lead = r.choice(("a picture of", "a photo of", "an image of", "a photo showing"))
    return f"{lead} {_np(_mention(o, r), r)}" + (f" {_bg(s, r)}" if r.random() < 0.5 else "")


def p_background_with(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, min(len(s.objects), r.choice((1, 2))))
    if not objs:
        return None
    nps = [_np(_mention(o, r), r) for o in objs]
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
    return f"{_np(_mention(a, r), r)} {r.choice(RELATION_PHRASES[rel])} {_np(_mention(b, r), r)}" + (
        f" {_bg(s, r)}" if r.random() < 0.3 else ""
    )


def p_there_is_relation(s: Scene, r: random.Random) -> str | None:
    found = _related(s, r, ("next to", "above", "below", "on"))
    if found is None:
        return None
    a, rel, b = found
    ma = _mention(a, r)
    return f"there {_be(ma)} {_np(ma, r)} {r.choice(RELATION_PHRASES[rel])} {_np(_mention(b, r), r)}"


def p_close_up(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    return f"a close up of {_np(_mention(o, r), r)}" if o else None


def p_sitting(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    if o is None:
        return None
    verb = r.choice(("sitting", "lying", "standing", "resting"))
    return f"{_np(_mention(o, r), r)} {verb} {_bg(s, r)}"


def p_scene_with(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, 2)
    if not objs:
        return None
    a, b = (_np(_mention(o, r), r) for o in objs)
    return f"{r.choice(('a scene with', 'a view of', 'a colorful scene with'))} {a} and {b}"


def p_two_positions(s: Scene, r: random.Random) -> str | None:
    objs = _pick(s, r, 2)
    if not objs:
        return None
    ma, mb = (_mention(o, r, position=True) for o in objs)
    return f"{_np(ma, r)} {_pos(ma, r)} and {_np(mb, r)} {_pos(mb, r)}"


def p_position_first(s: Scene, r: random.Random) -> str | None:
    o = _one(s, r)
    if o is None:
        return None
    m = _mention(o, r, position=True)
    return f"{_np(m, r)} {_pos(m, r)} of the picture" + (f" {_bg(s, r)}" if r.random() < 0.3 else "")


PATTERNS: tuple[Pattern, ...] = (
    p_object_on_background, p_there_is_at, p_two_objects, p_three_objects, p_picture_of,
    p_background_with, p_relation, p_there_is_relation, p_close_up, p_sitting, p_scene_with,
    p_two_positions, p_position_first,
)  # fmt: skip
PATTERN_WEIGHTS = (3, 2, 3, 1, 2, 2, 2, 1, 1, 2, 2, 1, 1)


def scene_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct partial captions of ``scene`` (true, COCO-like, 1-3 objects each)."""
    out: list[str] = []
    tries = 0
    while len(out) < n and tries < 200:
        tries += 1
        pattern = rng.choices(PATTERNS, PATTERN_WEIGHTS)[0]
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


def realise(desc: Description, rng: random.Random, extra_objects: float = 0.0) -> Scene:
    """A scene showing everything ``desc`` says; what it leaves open comes from ``rng``. With
    ``extra_objects`` > 0, each free cell holds an unmentioned object with that probability."""
    background = desc.background or rng.choice(BACKGROUNDS)
    kinds = list(desc.objects)[: len(POSITIONS)]
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
