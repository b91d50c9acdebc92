"""The shapes world's language: its words, and what each task sentence means in a scene.

The task generator (`synth_tasks`) writes questions, referring expressions and statements from
templates; this module reads them back, text → meaning on a scene's objects, so every
annotation can be checked against the scene it describes (the generator asserts it, the tests
recompute it from `scenes_{split}.json`), and text-only baselines have one definition.

An object is a mapping as `scenes_{split}.json` stores it: `colour`, `shape`, `size` ("small"
or "large"), `cell` (0–8, row-major in a 3×3 grid; one object per cell) and `bbox`. SNLI-VE
scenes also have `covered` cells: hidden under a chequered cover, so what lies there is unknown.
Sentences are read case-insensitively, without their final "." or "?".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.synth.world import COLOURS, SHAPES

Obj = Mapping[str, Any]

SIZE_NAMES = ("small", "large")
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Per cell (row-major): the VQA position answer, then its synonyms as people write them.
POSITION_NAMES: tuple[tuple[str, ...], ...] = (
    ("top left", "upper left", "top-left", "top left corner"),
    ("top", "top center", "top middle", "up"),
    ("top right", "upper right", "top-right", "top right corner"),
    ("left", "middle left", "left side", "on the left"),
    ("center", "middle", "centre", "in the middle"),
    ("right", "middle right", "right side", "on the right"),
    ("bottom left", "lower left", "bottom-left", "bottom left corner"),
    ("bottom", "bottom center", "bottom middle", "down"),
    ("bottom right", "lower right", "bottom-right", "bottom right corner"),
)
# Per cell: where-phrases for captions, expressions and statements; the first is the shortest.
POSITION_PHRASES: tuple[tuple[str, ...], ...] = (
    ("at the top left", "in the top left corner", "in the upper left corner"),
    ("at the top", "at the top center", "in the upper middle"),
    ("at the top right", "in the top right corner", "in the upper right corner"),
    ("on the left", "on the left side", "at the middle left"),
    ("in the center", "in the middle"),
    ("on the right", "on the right side", "at the middle right"),
    ("at the bottom left", "in the bottom left corner", "in the lower left corner"),
    ("at the bottom", "at the bottom center", "in the lower middle"),
    ("at the bottom right", "in the bottom right corner", "in the lower right corner"),
)
# Predicates no picture can settle (material, motion, history): SNLI-VE's neutral statements
# about a visible object use them.
UNKNOWABLE = (
    "is made of wood",
    "is made of metal",
    "is made of paper",
    "is spinning",
    "is falling",
    "was drawn first",
    "is heavy",
)
RELATIONS = ("left of", "right of", "above", "below")
# VQA question types by the question's first two words (VQA's own convention; see
# `pipelines.tasks.vqa.question_type`): every template starts with exactly one of these.
VQA_QUESTION_TYPES = {
    "what color": "colour",
    "what shape": "shape",
    "how many": "count",
    "is there": "exist",
    "where is": "position",
    "is the": "size",
}


def row(obj: Obj) -> int:
    return int(obj["cell"]) // 3


def col(obj: Obj) -> int:
    return int(obj["cell"]) % 3


def relation_holds(relation: str, a: Obj, b: Obj) -> bool:
    """Whether `a` is `relation` ("left of", ...) `b`: by grid column/row, so also by pixels."""
    if relation == "left of":
        return col(a) < col(b)
    if relation == "right of":
        return col(a) > col(b)
    if relation == "above":
        return row(a) < row(b)
    if relation == "below":
        return row(a) > row(b)
    raise ValueError(f"relation {relation!r}: must be one of {RELATIONS}")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Description:
    """A noun phrase's attributes ("the small red shape": size and colour); None = not said."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    @property
    def said(self) -> int:
        return sum(v is not None for v in (self.size, self.colour, self.shape))

    def matches(self, obj: Obj) -> bool:
        return (
            (self.size is None or obj["size"] == self.size)
            and (self.colour is None or obj["colour"] == self.colour)
            and (self.shape is None or obj["shape"] == self.shape)
        )

    def words(self, plural: bool = False, noun: str = "shape") -> str:
        head = (self.shape or noun) + ("s" if plural else "")
        return " ".join([w for w in (self.size, self.colour) if w] + [head])


def descriptions(obj: Obj) -> list[Description]:
    """The 8 descriptions that fit `obj`: every subset of its size, colour and shape."""
    return [
        Description(obj["size"] if s else None, obj["colour"] if c else None, obj["shape"] if h else None)
        for s in (0, 1)
        for c in (0, 1)
        for h in (0, 1)
    ]


def denote(description: Description, objects: Sequence[Obj]) -> list[int]:
    return [i for i, o in enumerate(objects) if description.matches(o)]


_SIZE_OF_WORD = {w: size for size, words in SIZE_SYNONYMS.items() for w in words}
_NOUNS = {"shape", "shapes", "object", "objects"}


def parse_description(text: str) -> Description:
    """'small red circles' → Description('small', 'red', 'circle'); 'red shape' → colour only."""
    words = text.split()
    if not words:
        raise ValueError("an empty noun phrase")
    noun, size, colour = words[-1], None, None
    if noun in _NOUNS:
        shape = None
    elif noun in SHAPES or (noun.endswith("s") and noun[:-1] in SHAPES):
        shape = noun if noun in SHAPES else noun[:-1]
    else:
        raise ValueError(f"noun phrase {text!r}: {noun!r} is no shape (known: {SHAPES}, shape, object)")
    for w in words[:-1]:
        if w in _SIZE_OF_WORD and size is None:
            size = _SIZE_OF_WORD[w]
        elif w in COLOURS and colour is None:
            colour = w
        else:
            raise ValueError(f"noun phrase {text!r}: {w!r} is no size or colour word, or said twice")
    return Description(size, colour, shape)


_PHRASE_CELL = {p: cell for cell, phrases in enumerate(POSITION_PHRASES) for p in phrases}
_PHRASES_LONGEST_FIRST = sorted(_PHRASE_CELL, key=len, reverse=True)


def split_position(text: str) -> tuple[str, int] | None:
    """'red circle at the top left' → ('red circle', 0); None when no where-phrase ends it."""
    for phrase in _PHRASES_LONGEST_FIRST:
        if text == phrase:
            return "", _PHRASE_CELL[phrase]
        if text.endswith(" " + phrase):
            return text[: -len(phrase) - 1], _PHRASE_CELL[phrase]
    return None


def number(word: str) -> int:
    if word.isdigit():
        return int(word)
    if word in NUMBER_NAMES:
        return NUMBER_NAMES.index(word)
    raise ValueError(f"{word!r} is no number (digits or {NUMBER_NAMES})")


def _normal(sentence: str) -> str:
    return " ".join(sentence.strip().lower().rstrip(".?!").split())


def _at(objects: Sequence[Obj], cell: int) -> list[int]:
    return [i for i, o in enumerate(objects) if int(o["cell"]) == cell]


def _unique_reference(text: str, objects: Sequence[Obj]) -> int:
    """'shape at the top left' or a description that fits exactly one object → its index."""
    where = split_position(text)
    if where is not None and where[0] in ("shape", "object"):
        found = _at(objects, where[1])
    else:
        found = denote(parse_description(text), objects)
    if len(found) != 1:
        raise ValueError(f"{text!r} refers to {len(found)} objects, not one")
    return found[0]


def vqa_answer(question: str, objects: Sequence[Obj]) -> str:
    """The correct (canonical) answer to a shapes-world question: a colour, shape, digit,
    yes/no, position name or size. Raises ValueError on a question outside the templates."""
    q = _normal(question)
    if m := re.fullmatch(r"what color is the (.+)", q):
        return objects[_unique_reference(m[1], objects)]["colour"]
    if m := re.fullmatch(r"what shape is the (.+)", q):
        return objects[_unique_reference(m[1], objects)]["shape"]
    if m := re.fullmatch(r"what shape is (.+)", q):
        where = split_position(m[1])
        found = _at(objects, where[1]) if where is not None and where[0] == "" else []
        if len(found) != 1:
            raise ValueError(f"question {question!r}: no single object at that position")
        return objects[found[0]]["shape"]
    if m := re.fullmatch(r"how many (.+) are there", q):
        return str(len(denote(parse_description(m[1]), objects)))
    if m := re.fullmatch(r"is there an? (.+)", q):
        return "yes" if denote(parse_description(m[1]), objects) else "no"
    if m := re.fullmatch(r"where is the (.+)", q):
        return POSITION_NAMES[int(objects[_unique_reference(m[1], objects)]["cell"])][0]
    if m := re.fullmatch(r"is the (.+) small or large", q):
        return objects[_unique_reference(m[1], objects)]["size"]
    raise ValueError(f"question {question!r} fits no shapes-world question template")


def vqa_question_type(question: str) -> str:
    """The question's type ("colour", "count", ...) from its first two words."""
    prefix = " ".join(question.lower().split()[:2])
    if prefix not in VQA_QUESTION_TYPES:
        raise ValueError(
            f"question {question!r}: first words {prefix!r} name no question type; known: {sorted(VQA_QUESTION_TYPES)}"
        )
    return VQA_QUESTION_TYPES[prefix]


def resolve_referring(expression: str, objects: Sequence[Obj]) -> list[int]:
    """Indices of the objects a referring expression can mean: one for an unambiguous
    expression, several for an ambiguous one, none when nothing fits (or when a relation's
    anchor, "the square" in "the circle left of the square", is not unique)."""
    text = _normal(expression)
    if not text.startswith("the "):
        raise ValueError(f"expression {expression!r}: must start with 'the'")
    text = text[4:]
    if m := re.fullmatch(r"(larger|smaller) of the two (.+)", text):
        group = denote(parse_description(m[2]), objects)
        sizes = {objects[i]["size"] for i in group}
        if len(group) != 2 or len(sizes) != 2:
            return group
        wanted = "large" if m[1] == "larger" else "small"
        return [i for i in group if objects[i]["size"] == wanted]
    if m := re.fullmatch(r"(.+) furthest to the (left|right)", text):
        group = denote(parse_description(m[1]), objects)
        if not group:
            return []
        best = (min if m[2] == "left" else max)(col(objects[i]) for i in group)
        return [i for i in group if col(objects[i]) == best]
    if m := re.fullmatch(r"(highest|lowest) (.+)", text):
        group = denote(parse_description(m[2]), objects)
        if not group:
            return []
        best = (min if m[1] == "highest" else max)(row(objects[i]) for i in group)
        return [i for i in group if row(objects[i]) == best]
    if m := re.fullmatch(r"(.+?) (left of|right of|above|below) the (.+)", text):
        anchors = denote(parse_description(m[3]), objects)
        if len(anchors) != 1:
            return []
        a = anchors[0]
        return [
            i
            for i in denote(parse_description(m[1]), objects)
            if i != a and relation_holds(m[2], objects[i], objects[a])
        ]
    where = split_position(text)
    if where is not None:
        return [
            i for i in denote(parse_description(where[0]), objects) if int(objects[i]["cell"]) == where[1]
        ]
    return denote(parse_description(text), objects)


def nlvr2_truth(sentence: str, left: Sequence[Obj], right: Sequence[Obj]) -> bool:
    """Whether an NLVR2 statement holds for the pair (left image's objects, right image's)."""
    s = _normal(sentence)
    side = {"left": left, "right": right}

    def has(objects: Sequence[Obj], phrase: str) -> bool:
        return bool(denote(parse_description(phrase), objects))

    if m := re.fullmatch(r"both images contain an? (.+)", s):
        return has(left, m[1]) and has(right, m[1])
    if m := re.fullmatch(r"neither image contains an? (.+)", s):
        return not has(left, m[1]) and not has(right, m[1])
    if m := re.fullmatch(r"only one image contains an? (.+)", s):
        return has(left, m[1]) != has(right, m[1])
    if m := re.fullmatch(r"the (left|right) image contains exactly (\w+) (.+)", s):
        return len(denote(parse_description(m[3]), side[m[1]])) == number(m[2])
    if m := re.fullmatch(r"the (left|right) image contains an? (.+)", s):
        return has(side[m[1]], m[2])
    if m := re.fullmatch(r"the (left|right) image has more (.+) than the (left|right) image", s):
        d = parse_description(m[2])
        return len(denote(d, side[m[1]])) > len(denote(d, side[m[3]]))
    if m := re.fullmatch(r"there are exactly (\w+) shapes in total", s):
        return len(left) + len(right) == number(m[1])
    if m := re.fullmatch(r"both images contain the same number of (.+)", s):
        d = parse_description(m[1])
        return len(denote(d, left)) == len(denote(d, right))
    raise ValueError(f"NLVR2 statement {sentence!r} fits no shapes-world template")


def snli_ve_label(sentence: str, objects: Sequence[Obj], covered: Sequence[int] = ()) -> str:
    """'entailment', 'contradiction' or 'neutral' for a hypothesis about a scene whose
    `covered` cells hide whatever lies there."""
    s = _normal(sentence)
    hidden, covered_cells = len(covered), {int(c) for c in covered}
    if m := re.fullmatch(r"there is an? (.+) in the picture", s):
        if denote(parse_description(m[1]), objects):
            return "entailment"
        return "neutral" if hidden else "contradiction"
    if m := re.fullmatch(r"the picture shows (exactly|at least) (\w+) shapes?", s):
        n, visible = number(m[2]), len(objects)
        if m[1] == "exactly":
            if hidden == 0:
                return "entailment" if visible == n else "contradiction"
            return "neutral" if visible <= n <= visible + hidden else "contradiction"
        if visible >= n:
            return "entailment"
        return "neutral" if visible + hidden >= n else "contradiction"
    if m := re.fullmatch(r"there are no (.+) in the picture", s):
        if denote(parse_description(m[1]), objects):
            return "contradiction"
        return "neutral" if hidden else "entailment"
    if m := re.fullmatch(r"there is an? (.+)", s):
        where = split_position(m[1])
        if where is None:
            raise ValueError(f"SNLI-VE hypothesis {sentence!r}: no position phrase")
        if where[1] in covered_cells:
            return "neutral"
        d = parse_description(where[0])
        return "entailment" if any(d.matches(objects[i]) for i in _at(objects, where[1])) else "contradiction"
    for predicate in UNKNOWABLE:
        if s.startswith("the ") and s.endswith(" " + predicate):
            found = denote(parse_description(s[4 : -len(predicate) - 1]), objects)
            if len(found) > 1:
                raise ValueError(f"SNLI-VE hypothesis {sentence!r}: refers to {len(found)} objects")
            return "neutral" if found or hidden else "contradiction"
    raise ValueError(f"SNLI-VE hypothesis {sentence!r} fits no shapes-world template")


_POSITION_WORDS = {"left", "right", "top", "bottom", "center", "centre", "middle", "upper", "lower", "corner"}


def text_template(text: str) -> str:
    """A sentence with its world words masked: colours, shapes, sizes, numbers, position words
    ('there is a {colour} {shape} {pos}'). Sentences of one template differ only in what they
    say about the picture, so a text-only model cannot tell them apart by anything else."""
    out: list[str] = []
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        if w in COLOURS:
            tag = "{colour}"
        elif w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES):
            tag = "{shape}"
        elif w in _SIZE_OF_WORD:
            tag = "{size}"
        elif w.isdigit() or w in NUMBER_NAMES:
            tag = "{n}"
        elif w in _POSITION_WORDS:
            tag = "{pos}"
        else:
            tag = w
        if not (tag == "{pos}" and out and out[-1] == "{pos}"):
            out.append(tag)
    return " ".join(out)
