"""The shapes world's vocabulary and scene graphs, and a reader of its English.

A scene is a list of :class:`SceneObject` (shape, colour, size, cell on a 3x3 grid). The
generator writes captions and questions from these words; :func:`parse_claims` reads any such
sentence back into claims, and :func:`check_caption` / :func:`answer_question` test those
claims against a scene. The same reader is the judge of generated captions and images.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
# Canonical names of the 3x3 grid cells, row-major: (row, col) -> name.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Surface words, canonical first. Plurals are listed beside singulars.
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus"),
}
SHAPE_PLURALS = {"circle": "circles", "disc": "discs", "square": "squares", "box": "boxes",
                 "triangle": "triangles", "star": "stars", "cross": "crosses", "plus": "pluses"}
COLOUR_WORDS = {
    "red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
    "purple": ("purple", "violet"), "orange": ("orange",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    0: ("in the top left", "in the upper left", "at the top left"),
    1: ("at the top", "in the top middle"),
    2: ("in the top right", "in the upper right", "at the top right"),
    3: ("on the left", "in the middle left"),
    4: ("in the center", "in the middle", "at the center"),
    5: ("on the right", "in the middle right"),
    6: ("in the bottom left", "in the lower left", "at the bottom left"),
    7: ("at the bottom", "in the bottom middle"),
    8: ("in the bottom right", "in the lower right", "at the bottom right"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "beneath", "under"),
}
TOTAL_WORDS = ("objects", "shapes", "things")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int  # 0 top .. 2 bottom
    col: int  # 0 left .. 2 right
    bbox: tuple[float, float, float, float] = (0, 0, 0, 0)  # x0, y0, x1, y1 in pixels

    @property
    def cell(self) -> int:
        return self.row * 3 + self.col

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["position"] = self.position
        d["bbox"] = [round(v, 2) for v in self.bbox]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SceneObject:
        return cls(d["shape"], d["colour"], d["size"], int(d["row"]), int(d["col"]),
                   tuple(d.get("bbox", (0, 0, 0, 0))))


def relation_holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    return {
        "left of": a.col < b.col, "right of": a.col > b.col,
        "above": a.row < b.row, "below": a.row > b.row,
    }[relation]


# ---- reading sentences back -----------------------------------------------------------------


@dataclass
class Mention:
    """An object phrase: ``[count] [size] [colour] shape`` with an optional position."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    count: int | None = None  # an explicit number ("two red circles"); None for "a" / "an"
    cell: int | None = None

    def matches(self, o: SceneObject) -> bool:
        return ((self.shape is None or o.shape == self.shape)
                and (self.colour is None or o.colour == self.colour)
                and (self.size is None or o.size == self.size)
                and (self.cell is None or o.cell == self.cell))


@dataclass
class Claims:
    mentions: list[Mention] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)  # (mention, rel, mention)
    total: int | None = None  # "three objects"


def _build_lexicon() -> list[tuple[tuple[str, ...], tuple[str, object]]]:
    entries: list[tuple[tuple[str, ...], tuple[str, object]]] = []
    for canon, words in SHAPE_WORDS.items():
        for w in words:
            entries.append(((w,), ("shape", (canon, False))))
            entries.append(((SHAPE_PLURALS[w],), ("shape", (canon, True))))
    for canon, words in COLOUR_WORDS.items():
        entries += [((w,), ("colour", canon)) for w in words]
    for canon, words in SIZE_WORDS.items():
        entries += [((w,), ("size", canon)) for w in words]
    for cell, phrases in POSITION_PHRASES.items():
        entries += [(tuple(p.split()), ("pos", cell)) for p in phrases]
    for rel, phrases in RELATION_PHRASES.items():
        entries += [(tuple(p.split()), ("rel", rel)) for p in phrases]
    entries += [((w,), ("article", 1)) for w in ("a", "an")]
    entries += [((w,), ("number", i)) for i, w in enumerate(NUMBERS)]
    entries += [((w,), ("total", None)) for w in TOTAL_WORDS]
    entries.sort(key=lambda e: -len(e[0]))  # longest phrase first
    return entries


_LEXICON = _build_lexicon()


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower().replace("colour", "color"))


def _tag(words: list[str]) -> list[tuple[str, object]]:
    tags, i = [], 0
    while i < len(words):
        for phrase, tag in _LEXICON:
            if tuple(words[i : i + len(phrase)]) == phrase:
                tags.append(tag)
                i += len(phrase)
                break
        else:
            tags.append(("other", words[i]))
            i += 1
    return tags


def parse_claims(text: str) -> Claims:
    """Read a shapes-world sentence into object mentions, relations and a total count."""
    claims = Claims()
    pending = Mention()
    started = False  # a count / size / colour word has opened a mention
    last: int | None = None  # index of the last completed mention
    last_positioned = False
    pending_cell: int | None = None
    pending_rel: tuple[int, str] | None = None
    for kind, value in _tag(words_of(text)):
        if kind == "number":
            pending, started = Mention(count=value), True
        elif kind == "article":
            pending, started = Mention(), True
        elif kind == "size" and pending.colour is None:
            pending.size, started = value, True
        elif kind == "colour":
            pending.colour, started = value, True
        elif kind == "shape":
            shape, _plural = value
            pending.shape = shape
            if pending.cell is None and pending_cell is not None:
                pending.cell, pending_cell = pending_cell, None
            claims.mentions.append(pending)
            index = len(claims.mentions) - 1
            if pending_rel is not None:
                claims.relations.append((pending_rel[0], pending_rel[1], index))
                pending_rel = None
            last, last_positioned = index, pending.cell is not None
            pending, started = Mention(), False
        elif kind == "total":
            if started and pending.count is not None:
                claims.total = pending.count
            pending, started = Mention(), False
        elif kind == "pos":
            if last is not None and not last_positioned and not started:
                claims.mentions[last].cell, last_positioned = value, True
            else:
                pending_cell = value
        elif kind == "rel":
            if last is not None:
                pending_rel = (last, value)
        else:  # any other word ends an unfinished mention
            if started:
                pending, started = Mention(), False
    return claims


def check_caption(text: str, objects: list[SceneObject]) -> list[str]:
    """Every claim in ``text`` that the scene contradicts, in words; empty when all hold."""
    claims = parse_claims(text)
    problems = []
    if not claims.mentions:
        problems.append("mentions no object")
    for m in claims.mentions:
        n = sum(m.matches(o) for o in objects)
        if m.count is not None and n != m.count:
            problems.append(f"says {m.count} of {_describe(m)}, scene has {n}")
        elif m.count is None and n == 0:
            problems.append(f"says there is {_describe(m)}, scene has none")
    for a, rel, b in claims.relations:
        ma, mb = claims.mentions[a], claims.mentions[b]
        if not any(relation_holds(rel, oa, ob) for oa in objects for ob in objects
                   if oa is not ob and ma.matches(oa) and mb.matches(ob)):
            problems.append(f"says {_describe(ma)} is {rel} {_describe(mb)}: false")
    if claims.total is not None and claims.total != len(objects):
        problems.append(f"says {claims.total} objects, scene has {len(objects)}")
    return problems


INVERSE_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _fits(asked: Mention, said: Mention) -> bool | None:
    """Whether an object a caption mentions (``said``) is one a prompt asks for (``asked``):
    None when the caption leaves out its size or place and the prompt asks for one."""
    if any(a is not None and a != b for a, b in ((asked.shape, said.shape), (asked.colour, said.colour))):
        return False
    unknown = False
    for want, got in ((asked.size, said.size), (asked.cell, said.cell)):
        if want is not None and got is None:
            unknown = True
        elif want is not None and want != got:
            return False
    return None if unknown else True


def _related(rel: str, a: tuple[int, Mention], b: tuple[int, Mention], stated: set) -> bool | None:
    """Whether object ``a`` is ``rel`` object ``b`` (each ``(mention index, mention)`` of a
    caption): by their places, else as the caption relates their mentions (``stated``, with
    each relation's inverse); None when it says neither."""
    (i, ma), (j, mb) = a, b
    if ma.cell is not None and mb.cell is not None:
        return relation_holds(rel, SceneObject("", "", "", ma.cell // 3, ma.cell % 3),
                              SceneObject("", "", "", mb.cell // 3, mb.cell % 3))
    if (i, rel, j) in stated:
        return True
    return False if (i, INVERSE_RELATIONS[rel], j) in stated else None


def caption_shows(caption: str, prompt: str) -> bool | None:
    """Whether the picture a caption describes shows what ``prompt`` asks for, by the caption's
    claims alone: every object the prompt names there (as many as it says; "a": at least one),
    each relation it asks for holding (by the objects' places, or as the caption relates the
    two), and, when the prompt places every object it names (written as a caption is: "a red
    circle in the top left"), no object besides. None when the caption cannot tell: it names
    an object without its shape or colour, or leaves out a size, place or relation the prompt
    asks for."""
    said, asked = parse_claims(caption), parse_claims(prompt)
    if not said.mentions or not asked.mentions or any(None in (m.shape, m.colour) for m in said.mentions):
        return None
    objects = [(i, m) for i, m in enumerate(said.mentions) for _ in range(m.count or 1)]  # (mention, its object)
    unknown = False
    for m in asked.mentions:
        verdicts = [_fits(m, o) for _, o in objects]
        sure, maybe = verdicts.count(True), verdicts.count(None)
        if (sure > m.count or sure + maybe < m.count) if m.count is not None else not sure + maybe:
            return False
        unknown |= (sure != m.count) if m.count is not None else not sure
    stated = {(a, rel, b) for a, rel, b in said.relations} | {(b, INVERSE_RELATIONS[rel], a) for a, rel, b in said.relations}
    for a, rel, b in asked.relations:
        pairs = [(x, y) for x, y in itertools.permutations(range(len(objects)), 2)
                 if _fits(asked.mentions[a], objects[x][1]) and _fits(asked.mentions[b], objects[y][1])]
        holds = [_related(rel, objects[x], objects[y], stated) for x, y in pairs]
        if True not in holds:
            if None not in holds:
                return False
            unknown = True
    placed = all(m.cell is not None for m in asked.mentions)
    if (placed and len(objects) != sum(m.count or 1 for m in asked.mentions)) or (
            asked.total is not None and asked.total != len(objects)):
        return False
    return None if unknown else True


def _describe(m: Mention) -> str:
    words = [w for w in (m.size, m.colour, m.shape) if w]
    where = f" {POSITIONS[m.cell]}" if m.cell is not None else ""
    return "a " + " ".join(words) + where


QUESTION_TYPES = ("colour", "shape", "count", "exist", "position")


def question_type(question: str) -> str:
    w = words_of(question)
    if w[:2] == ["what", "color"]:
        return "colour"
    if w[:2] == ["what", "shape"]:
        return "shape"
    if w[:2] == ["how", "many"]:
        return "count"
    if w[:2] in (["is", "there"], ["are", "there"]):
        return "exist"
    if w[:2] == ["where", "is"]:
        return "position"
    raise ValueError(f"not a shapes-world question: {question!r}")


def answer_question(question: str, objects: list[SceneObject]) -> str:
    """The true answer to a shapes-world question about ``objects``."""
    kind = question_type(question)
    tags = _tag(words_of(question))
    colours = [v for k, v in tags if k == "colour"]
    shapes = [v[0] for k, v in tags if k == "shape"]
    sizes = [v for k, v in tags if k == "size"]
    target = Mention(shape=shapes[0] if shapes else None, colour=colours[0] if colours else None,
                     size=sizes[0] if sizes else None)
    matching = [o for o in objects if target.matches(o)]
    if kind == "count":
        return NUMBERS[len(matching)]
    if kind == "exist":
        return "yes" if matching else "no"
    if len(matching) != 1:
        raise ValueError(f"{question!r} does not pick out one object ({len(matching)} match)")
    o = matching[0]
    return {"colour": o.colour, "shape": o.shape, "position": o.position}[kind]
