"""The sandbox world's vocabulary, what a sentence says (:class:`Description`), the parser that
reads any English sentence with that vocabulary, and the rules that say when two descriptions
contradict each other and how several merge into one.

A :class:`Description` holds only what a sentence states: a background or none, and per object
kind the attributes named (colour, size, count, position), plus pairwise relations. Anything left
open stays ``None``; the renderer draws it from its seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

# ----------------------------------------------------------------------------- the world's words

BACKGROUNDS: tuple[str, ...] = (
    "grass", "sand", "snow", "road", "water", "floor", "carpet", "dirt", "tiles", "ice", "gravel",
)  # fmt: skip
# phrases a caption may use for a background; the first of each is what summaries write
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on the grass", "in a grassy field", "on a lawn"),
    "sand": ("on the sand", "on a sandy beach", "on the beach"),
    "snow": ("in the snow", "on a snowy field", "on the snow"),
    "road": ("on the road", "on a street", "on the asphalt"),
    "water": ("in the water", "on a lake", "on the water"),
    "floor": ("on a wooden floor", "on the floor", "on the wooden boards"),
    "carpet": ("on a red carpet", "on the carpet", "on a rug"),
    "dirt": ("on the dirt", "on a farm", "in a muddy yard"),
    "tiles": ("on a tiled floor", "in a bathroom", "on the tiles"),
    "ice": ("on the ice", "on an ice rink", "on a frozen pond"),
    "gravel": ("on the gravel", "on a gravel path", "in a garden"),
}
# single words (after the phrase has been matched) that name a background in "a X with ..." forms
BACKGROUND_NOUNS: dict[str, tuple[str, ...]] = {
    "grass": ("a grassy field", "a lawn"),
    "sand": ("a sandy beach", "a beach"),
    "snow": ("a snowy field", "a snowfield"),
    "road": ("a street", "a road"),
    "water": ("a lake", "a calm lake"),
    "floor": ("a wooden floor", "a room with a wooden floor"),
    "carpet": ("a carpeted room", "a rug"),
    "dirt": ("a muddy yard", "a farmyard"),
    "tiles": ("a tiled bathroom", "a bathroom"),
    "ice": ("an ice rink", "a frozen pond"),
    "gravel": ("a gravel path", "a garden path"),
}

KINDS: tuple[str, ...] = (
    "ball", "box", "cone", "star", "ring", "tree", "house", "car", "boat", "kite",
    "umbrella", "cup", "bottle", "clock", "flower", "fish", "bird", "hat", "chair", "lamp",
)  # fmt: skip
# nouns (singular, plural) per kind; the first pair is the kind's own name
NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "ball": (("ball", "balls"), ("sphere", "spheres")),
    "box": (("box", "boxes"), ("crate", "crates"), ("cube", "cubes")),
    "cone": (("cone", "cones"), ("traffic cone", "traffic cones")),
    "star": (("star", "stars"),),
    "ring": (("ring", "rings"), ("hoop", "hoops")),
    "tree": (("tree", "trees"),),
    "house": (("house", "houses"), ("cabin", "cabins")),
    "car": (("car", "cars"),),
    "boat": (("boat", "boats"), ("sailboat", "sailboats")),
    "kite": (("kite", "kites"),),
    "umbrella": (("umbrella", "umbrellas"), ("parasol", "parasols")),
    "cup": (("cup", "cups"), ("mug", "mugs")),
    "bottle": (("bottle", "bottles"),),
    "clock": (("clock", "clocks"),),
    "flower": (("flower", "flowers"),),
    "fish": (("fish", "fish"),),
    "bird": (("bird", "birds"),),
    "hat": (("hat", "hats"),),
    "chair": (("chair", "chairs"),),
    "lamp": (("lamp", "lamps"),),
}
COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "orange", "purple", "white", "black", "pink", "brown", "gray",
)  # fmt: skip
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium-sized",),
    "large": ("large", "big"),
}
COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "a pair of": 2}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "middle": ("in the middle", "in the center", "in the centre"),
}
# where each position sits on the scene's 3x3 grid (column, row)
CELLS: dict[str, tuple[int, int]] = {
    "left": (0, 1),
    "right": (2, 1),
    "top": (1, 0),
    "bottom": (1, 2),
    "middle": (1, 1),
}
RELATIONS: tuple[str, ...] = ("next to", "above", "below", "left of", "right of", "on")
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "next to": ("next to", "beside", "near"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "on": ("on top of", "on", "sitting on"),
}
# kinds that something else can stand on
SUPPORTS: frozenset[str] = frozenset({"box", "chair", "car", "house", "boat"})


def relation_holds(rel: str, a: tuple[int, int], b: tuple[int, int], b_kind: str) -> bool:
    """Whether ``a REL b`` is true of objects in cells ``a`` and ``b``."""
    (ax, ay), (bx, by) = a, b
    if rel == "next to":
        return ay == by and abs(ax - bx) == 1
    if rel == "above":
        return ay < by and ax == bx
    if rel == "below":
        return ay > by and ax == bx
    if rel == "left of":
        return ax < bx and ay == by
    if rel == "right of":
        return ax > bx and ay == by
    if rel == "on":
        return b_kind in SUPPORTS and ax == bx and ay == by - 1
    raise ValueError(rel)


# ----------------------------------------------------------------------------- what a sentence says


@dataclass
class Mention:
    """One object kind as a sentence names it; ``None`` = not said."""

    kind: str
    colour: str | None = None
    size: str | None = None
    count: int | None = None
    position: str | None = None


@dataclass
class Description:
    background: str | None = None
    objects: dict[str, Mention] = field(default_factory=dict)  # kind -> what is said of it
    relations: list[tuple[str, str, str]] = field(default_factory=list)  # (kind a, relation, kind b)

    def kinds(self) -> list[str]:
        return list(self.objects)


CONFLICT_FIELDS = ("colour", "size", "count", "position")


def conflicts(a: Description, b: Description) -> list[str]:
    """What ``a`` and ``b`` say differently about the same thing (empty: they agree)."""
    out = []
    if a.background and b.background and a.background != b.background:
        out.append(f"background {a.background} vs {b.background}")
    for kind, ma in a.objects.items():
        mb = b.objects.get(kind)
        if mb is None:
            continue
        for name in CONFLICT_FIELDS:
            va, vb = getattr(ma, name), getattr(mb, name)
            if va is not None and vb is not None and va != vb:
                out.append(f"{kind} {name} {va} vs {vb}")
    return out


def merge(descriptions: list[Description]) -> Description:
    """One description saying everything the given ones say (the first wins where they disagree)."""
    out = Description()
    for d in descriptions:
        out.background = out.background or d.background
        for kind, m in d.objects.items():
            cur = out.objects.get(kind)
            if cur is None:
                out.objects[kind] = replace(m)
                continue
            for name in CONFLICT_FIELDS:
                if getattr(cur, name) is None:
                    setattr(cur, name, getattr(m, name))
        for rel in d.relations:
            if rel not in out.relations:
                out.relations.append(rel)
    return out


# ----------------------------------------------------------------------------- the parser


Table = dict[str, list[tuple[list[str], str]]]


def _pattern(phrases: list[tuple[str, str]]) -> Table:
    """Phrases as token lists by first word, longest first (so "traffic cone" wins over "cone")."""
    table: Table = {}
    for p, v in sorted(((p.split(), v) for p, v in phrases), key=lambda t: -len(t[0])):
        table.setdefault(p[0], []).append((p, v))
    return table


_NOUN_TABLE = _pattern(
    [(s, f"{k}|1") for k, forms in NOUNS.items() for s, _ in forms]
    + [(p, f"{k}|n") for k, forms in NOUNS.items() for s, p in forms if p != s]
)
_BG_TABLE = _pattern(
    [(p, b) for b, ps in BACKGROUND_PHRASES.items() for p in ps]
    + [(n.removeprefix("a ").removeprefix("the "), b) for b, ns in BACKGROUND_NOUNS.items() for n in ns]
    + [(w, b) for w, b in (("grass", "grass"), ("sand", "sand"), ("snow", "snow"), ("road", "road"),
                           ("water", "water"), ("floor", "floor"), ("carpet", "carpet"), ("beach", "sand"),
                           ("lawn", "grass"), ("street", "road"), ("lake", "water"), ("rug", "carpet"),
                           ("dirt", "dirt"), ("farm", "dirt"), ("tiles", "tiles"), ("bathroom", "tiles"),
                           ("ice", "ice"), ("rink", "ice"), ("gravel", "gravel"), ("garden", "gravel"),
                           ("tiled floor", "tiles"), ("asphalt", "road"), ("wooden boards", "floor"))]
)  # fmt: skip
_POS_TABLE = _pattern([(p, pos) for pos, ps in POSITION_PHRASES.items() for p in ps])
_REL_TABLE = _pattern([(p, rel) for rel, ps in RELATION_PHRASES.items() for p in ps])
_COLOUR = set(COLOURS)
_SIZE = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_COUNT = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "pair": 2, "couple": 2}
_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)?")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _match(toks: list[str], i: int, table: Table) -> tuple[int, str] | None:
    for words, value in table.get(toks[i], ()):
        if toks[i : i + len(words)] == words:
            return len(words), value
    return None


def parse(text: str) -> Description:
    """What ``text`` says, read with the world's lexicon; words outside it are ignored.

    Object phrases are ``[count] [size] [colour] noun`` (modifiers in any order); a position phrase
    after a noun belongs to that noun; a relation phrase between two nouns relates them; a background
    phrase anywhere sets the background. A kind named twice keeps what was said first."""
    toks = tokens(text)
    desc = Description()
    pending: dict[str, object] = {}
    last_kind: str | None = None
    pending_rel: tuple[str, str] | None = None  # (kind a, relation) waiting for kind b
    i = 0
    while i < len(toks):
        bg = _match(toks, i, _BG_TABLE)
        noun = _match(toks, i, _NOUN_TABLE)
        if bg and not noun:
            desc.background = desc.background or bg[1]
            pending.clear()
            pending_rel = None
            i += bg[0]
            continue
        pos = _match(toks, i, _POS_TABLE)
        if pos:
            if last_kind is not None and desc.objects[last_kind].position is None:
                desc.objects[last_kind].position = pos[1]
            i += pos[0]
            continue
        rel = _match(toks, i, _REL_TABLE)
        if rel and last_kind is not None and not noun:
            pending_rel = (last_kind, rel[1])
            i += rel[0]
            continue
        if noun:
            kind, number = noun[1].split("|")
            count = pending.get("count")
            if number == "n" and count == 1:
                count = None  # "a pair of" is handled above; a bare plural leaves the number open
            mention = Mention(
                kind=kind,
                colour=pending.get("colour"),  # type: ignore[arg-type]
                size=pending.get("size"),  # type: ignore[arg-type]
                count=count if isinstance(count, int) else None,
            )
            if kind in desc.objects:
                cur = desc.objects[kind]
                for name in ("colour", "size", "count"):
                    if getattr(cur, name) is None:
                        setattr(cur, name, getattr(mention, name))
            else:
                desc.objects[kind] = mention
            if pending_rel is not None and pending_rel[0] != kind:
                triple = (pending_rel[0], pending_rel[1], kind)
                if triple not in desc.relations:
                    desc.relations.append(triple)
            pending_rel = None
            last_kind = kind
            pending.clear()
            i += noun[0]
            continue
        word = toks[i]
        if word in _COUNT:
            pending["count"] = _COUNT[word]
        elif word in ("the", "another"):
            pass
        elif word in _COLOUR:
            pending["colour"] = word
        elif word in _SIZE:
            pending["size"] = _SIZE[word]
        elif word not in ("of", "and", "with", "very", "bright", "dark"):
            pending.clear()
        i += 1
    return desc


# ----------------------------------------------------------------------------- writing


def noun(kind: str, count: int, synonym: int = 0) -> str:
    forms = NOUNS[kind][synonym % len(NOUNS[kind])]
    return forms[0] if count == 1 else forms[1]


def noun_phrase(m: Mention, *, synonym: int = 0, size_word: int = 0, count: int | None = None) -> str:
    """``a small red ball``, ``two blue boxes``; attributes that are None are left out."""
    n = count if count is not None else (m.count or 1)
    words = []
    if m.size is not None and m.size != "medium":
        words.append(SIZE_WORDS[m.size][size_word % len(SIZE_WORDS[m.size])])
    elif m.size == "medium":
        words.append("medium-sized")
    if m.colour is not None:
        words.append(m.colour)
    words.append(noun(m.kind, n, synonym))
    det = NUMBER_WORDS.get(n, str(n))
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return " ".join([det, *words])


def describe(desc: Description, max_words: int = 50) -> str:
    """One sentence saying everything in ``desc`` (relations last; dropped if over ``max_words``)."""
    parts = []
    for m in desc.objects.values():
        phrase = noun_phrase(m)
        if m.position:
            phrase += " " + POSITION_PHRASES[m.position][0]
        parts.append(phrase)

    def the(kind: str) -> tuple[str, str]:
        m = desc.objects.get(kind)
        plural = m is not None and (m.count or 1) > 1
        return ("the " + NOUNS[kind][0][1 if plural else 0], "are" if plural else "is")

    rels = [f"{the(a)[0]} {the(a)[1]} {RELATION_PHRASES[r][0]} {the(b)[0]}" for a, r, b in desc.relations]
    bg = BACKGROUND_PHRASES[desc.background][0] if desc.background else ""

    def sentence(objs: list[str], rs: list[str]) -> str:
        body = objs[0] if len(objs) == 1 else ", ".join(objs[:-1]) + " and " + objs[-1]
        text = body + (f", {bg}" if bg else "")
        if rs:
            text += "; " + ", ".join(rs)
        return text

    if not parts:
        return f"an empty scene {bg}".strip()
    rels_kept = list(rels)
    text = sentence(parts, rels_kept)
    while len(text.split()) > max_words and rels_kept:
        rels_kept.pop()
        text = sentence(parts, rels_kept)
    while len(text.split()) > max_words and len(parts) > 1:
        parts.pop()
        text = sentence(parts, rels_kept)
    return text
