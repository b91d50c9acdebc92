"""The finetuning tasks over the shapes world: images and the official annotation files of VQA,
captioning (COCO Karpathy), retrieval, grounding (RefCOCO), NLVR2 and SNLI-VE, plus the
model-free baselines a model trained on them must beat.

Scenes hold 1–4 shapes (2–4 for grounding) in distinct cells of a 3×3 grid, small (18% of the
side) or large (30%), so a small star is still a star at 64 px. Like the real data sets, tasks
share images where the originals do: VQA, captioning and retrieval use one pool of "coco"
images; grounding ("refcoco"), NLVR2 (pairs) and SNLI-VE ("snli_ve", whose scenes also hide
0–2 cells under a chequered cover, so some statements are undecidable) have their own. Every
image is rendered from its own seed (base seed, pool, split, index) and its text from another
(… , task), so a split is the same whatever `num` or `tasks` say otherwise.

Written under `output_uri` (the image root; every annotation's image path is relative to it):

    {pool}/{split}/{key}.jpg                  images
    vqa_{split}.json                          [{image, question, answer: [10], question_id, dataset}]
    vqa_answer_list.json                      every canonical answer (for answer-list ranking)
    dataset_coco.json                         Karpathy's {"images": [...], "dataset": "coco"}
    caption_{split}.json                      train: one entry per caption; val/test: 5 per entry
    retrieval_{split}.json                    the same captions, ALBEF's retrieval layout
    grounding_{split}.json                    [{image, bbox: [x, y, w, h], text, ref_id}]
    nlvr2_{split}.json                        [{images: [left, right], sentence, label, identifier}]
    snli_ve_{split}.json                      [{image, sentence, label}]
    scenes_{split}.json                       {image: {objects: [...], covered: [...]}}: the truth

`synth_language` gives every sentence its meaning, so labels can be recomputed from
`scenes_{split}.json`.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipelines import storage
from pipelines.synth import language as lang
from pipelines.synth.world import (
    COLOURS,
    SHAPES,
    SPLITS,
    ShapeObject,
    draw_shape,
    noisy_background,
    split_counts,
)

TASKS = ("vqa", "caption", "retrieval", "grounding", "nlvr2", "snli_ve")
TASK_SIZES = {"small": 0.18, "large": 0.30}  # object extent as a fraction of the image side
CAPTION_MAX_WORDS = 30  # the pretraining recipe cuts captions there


@dataclass(frozen=True)
class SceneLayout:
    min_objects: int
    max_objects: int
    share: float  # chance an object copies the shape or colour of an earlier one: distractors
    cover_probs: tuple[float, ...] = (1.0,)  # P(0 covered cells), P(1), ...


POOLS: dict[str, SceneLayout] = {
    "coco": SceneLayout(1, 4, 0.3),
    "refcoco": SceneLayout(2, 4, 0.6),
    "nlvr2": SceneLayout(1, 4, 0.3),
    "snli_ve": SceneLayout(1, 4, 0.3, cover_probs=(0.2, 0.5, 0.3)),
}
POOL_OF_TASK = {
    "vqa": "coco", "caption": "coco", "retrieval": "coco",
    "grounding": "refcoco", "nlvr2": "nlvr2", "snli_ve": "snli_ve",
}  # fmt: skip
# Random stream ids: images by pool, text by task (retrieval reuses the captions).
_IMAGE_STREAM = {"coco": 101, "refcoco": 102, "nlvr2": 103, "snli_ve": 104}
_TEXT_STREAM = {"vqa": 201, "caption": 202, "grounding": 204, "nlvr2": 205, "snli_ve": 206}
_COVER_DARK, _COVER_LIGHT = 35, 225
_BACKGROUND_TINT = 15  # near-grey backgrounds: colour must stay the easiest thing to see at 64 px


@dataclass(frozen=True)
class TaskScene:
    image: str  # path relative to the image root
    jpeg: bytes
    objects: tuple[ShapeObject, ...]  # in reading order (by cell)
    covered: tuple[int, ...] = ()  # cells under a cover: what lies there is unknown

    def object_meta(self) -> list[dict]:
        return [
            {"colour": o.colour, "shape": o.shape, "size": o.size, "cell": o.cell,
             "position": lang.POSITION_NAMES[o.cell][0], "bbox": list(o.bbox)}
            for o in self.objects
        ]  # fmt: skip

    def meta(self) -> dict:
        return {"objects": self.object_meta(), "covered": list(self.covered)}


def _paint_cover(pixels: np.ndarray, cell: int, image_size: int) -> None:
    """A chequered cell: unlike any solid shape, so 'something is hidden here' is visible."""
    side = image_size / 3
    y0, y1 = round(cell // 3 * side), round((cell // 3 + 1) * side)
    x0, x1 = round(cell % 3 * side), round((cell % 3 + 1) * side)
    tile = max(3, image_size // 16)
    yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
    light = (yy // tile + xx // tile) % 2 == 0
    pixels[y0:y1, x0:x1] = np.where(light[..., None], _COVER_LIGHT, _COVER_DARK)


def render_task_scene(
    image: str, rng: np.random.Generator, image_size: int, layout: SceneLayout
) -> TaskScene:
    """One scene from `rng`: noisy background, covers, then shapes jittered inside their cells."""
    pixels = noisy_background(rng, image_size, tint=_BACKGROUND_TINT)
    count = int(rng.integers(layout.min_objects, layout.max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=count, replace=False))
    attributes: list[tuple[str, str, str]] = []
    for j in range(count):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        size = str(rng.choice(list(TASK_SIZES)))
        if j and rng.random() < layout.share:
            source = attributes[int(rng.integers(j))]
            colour, shape = (source[0], shape) if rng.random() < 0.5 else (colour, source[1])
        while (colour, shape, size) in attributes:  # no identical twins: each object has a full name
            colour = str(rng.choice(list(COLOURS)))
        attributes.append((colour, shape, size))
    free = [c for c in range(9) if c not in cells]
    n_covers = int(rng.choice(len(layout.cover_probs), p=layout.cover_probs))
    covered = (
        tuple(sorted(int(c) for c in rng.choice(free, size=n_covers, replace=False))) if n_covers else ()
    )
    for cell in covered:
        _paint_cover(pixels, cell, image_size)
    im = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(im)
    side = image_size / 3
    objects = []
    for cell, (colour, shape, size) in zip(cells, attributes):
        extent = TASK_SIZES[size] * image_size
        slack = max(0.0, side - extent)  # stay inside the cell: positions stay unambiguous
        x = (cell % 3) * side + rng.uniform(0, slack)
        y = (cell // 3) * side + rng.uniform(0, slack)
        bbox = (round(float(x), 1), round(float(y), 1), round(extent, 1), round(extent, 1))
        draw_shape(draw, shape, bbox, COLOURS[colour])
        objects.append(ShapeObject(colour, shape, size, cell, bbox))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return TaskScene(image=image, jpeg=buf.getvalue(), objects=tuple(objects), covered=covered)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


# ---- VQA: six question types, ten human answers each ------------------------------------------
_COLOUR_SYNONYMS = {
    "red": "crimson", "green": "dark green", "blue": "navy", "yellow": "gold",
    "purple": "violet", "orange": "amber", "black": "dark", "white": "light",
}  # fmt: skip
_SHAPE_SYNONYMS = {
    "circle": ("round", "dot"), "square": ("box", "rectangle"), "triangle": ("pyramid",),
    "diamond": ("rhombus",), "star": ("star shape",),
}  # fmt: skip
# Attribute patterns of a described object ("is there a red circle?"), with their weights.
_PATTERNS = (("colour", "shape"), ("shape",), ("colour",), ("size", "colour", "shape"))
_PATTERN_WEIGHTS = (0.45, 0.25, 0.15, 0.15)
_VALUES = {"size": lang.SIZE_NAMES, "colour": tuple(COLOURS), "shape": SHAPES}


def _answer_variants(kind: str, answer: str) -> list[str]:
    """How else people write `answer`: case, punctuation, article and number forms (which the
    VQA evaluator folds into the answer) and synonyms (which it does not)."""
    if kind == "count":
        n = int(answer)
        return [lang.NUMBER_NAMES[n], lang.NUMBER_NAMES[n].capitalize(), f"{n}."] + (
            ["none"] if n == 0 else []
        )
    if kind == "exist":
        return ["Yes", "yes.", "yeah", "yep"] if answer == "yes" else ["No", "no.", "nope"]
    forms = [answer.capitalize(), answer + "."]
    if kind == "colour":
        forms.append(_COLOUR_SYNONYMS[answer])
    elif kind == "shape":
        forms += [f"a {answer}", *_SHAPE_SYNONYMS[answer]]
    elif kind == "position":
        cell = next(c for c, names in enumerate(lang.POSITION_NAMES) if names[0] == answer)
        forms += list(lang.POSITION_NAMES[cell][1:])
    elif kind == "size":
        forms += list(lang.SIZE_SYNONYMS[answer][1:])
    return forms


def _wrong_answers(kind: str, answer: str) -> list[str]:
    if kind == "colour":
        return [c for c in COLOURS if c != answer]
    if kind == "shape":
        return [s for s in SHAPES if s != answer]
    if kind == "count":
        return [str(int(answer) + 1)] + ([str(int(answer) - 1)] if int(answer) > 0 else [])
    if kind == "exist":
        return ["no" if answer == "yes" else "yes"]
    if kind == "position":
        cell = next(c for c, names in enumerate(lang.POSITION_NAMES) if names[0] == answer)
        return [
            lang.POSITION_NAMES[c][0]
            for c in range(9)
            if abs(c // 3 - cell // 3) + abs(c % 3 - cell % 3) == 1
        ]
    return [s for s in lang.SIZE_NAMES if s != answer]


def human_answers(rng: np.random.Generator, kind: str, answer: str) -> list[str]:
    """Ten answers: 0–3 wrong, 0–3 written differently, the rest (≥ 4) exactly `answer`, so the
    most common answer is always the right one."""
    n_wrong = int(rng.choice(4, p=(0.35, 0.35, 0.2, 0.1)))
    n_variant = int(rng.integers(0, 4))
    variants, wrong = _answer_variants(kind, answer), _wrong_answers(kind, answer)
    answers = (
        [answer] * (10 - n_wrong - n_variant)
        + [_pick(rng, variants) for _ in range(n_variant)]
        + [_pick(rng, wrong) for _ in range(n_wrong)]
    )
    return [answers[i] for i in rng.permutation(10)]


def _unique_references(objs: Sequence[Mapping], i: int, exclude: str | None) -> list[lang.Description]:
    """Descriptions that pick object `i` alone without naming its `exclude` attribute."""
    return [
        d
        for d in lang.descriptions(objs[i])
        if d.said and (exclude is None or getattr(d, exclude) is None) and lang.denote(d, objs) == [i]
    ]


def _reference(rng: np.random.Generator, objs: Sequence[Mapping], i: int, exclude: str, noun: str) -> str:
    """'the small circle', or by position 'the shape at the top left' (always unique)."""
    unique = _unique_references(objs, i, exclude)
    if unique and rng.random() < 0.6:
        return "the " + _pick(rng, unique).words(noun=noun)
    return f"the {noun} {_pick(rng, lang.POSITION_PHRASES[objs[i]['cell']])}"


def _described(rng: np.random.Generator, objs: Sequence[Mapping], present: bool) -> lang.Description:
    """A description that fits some object (present) or none; patterns weighted like _PATTERNS."""
    for k in _weighted_order(rng, _PATTERN_WEIGHTS):
        pattern = _PATTERNS[k]
        if present:
            o = _pick(rng, objs)
            return lang.Description(**{a: o[a] for a in pattern})
        absent = [
            d
            for values in itertools.product(*(_VALUES[a] for a in pattern))
            if not lang.denote(d := lang.Description(**dict(zip(pattern, values))), objs)
        ]
        if absent:
            return _pick(rng, absent)
    raise AssertionError(f"no absent description for {objs}")  # 4 objects cannot cover 8 colours


def _weighted_order(rng: np.random.Generator, weights: Sequence[float]) -> list[int]:
    """Indices in a random order where heavier ones tend to come first (sampling without replacement)."""
    p = np.asarray(weights, dtype=float)
    return [int(i) for i in rng.choice(len(p), size=len(p), replace=False, p=p / p.sum())]


def vqa_questions(
    rng: np.random.Generator, objs: Sequence[Mapping], exists: bool
) -> list[tuple[str, str, str]]:
    """(question, type, correct answer) for one scene: one of each type it allows; the
    existence question's answer is `exists` (alternated over images: yes/no stay balanced)."""
    out: list[tuple[str, str, str]] = []
    i = int(rng.integers(len(objs)))
    out.append((f"what color is {_reference(rng, objs, i, 'colour', 'shape')}?", "colour", objs[i]["colour"]))
    i = int(rng.integers(len(objs)))
    unique = _unique_references(objs, i, "shape")
    if unique and rng.random() < 0.6:
        question = f"what shape is the {_pick(rng, unique).words(noun='object')}?"
    else:
        question = f"what shape is {_pick(rng, lang.POSITION_PHRASES[objs[i]['cell']])}?"
    out.append((question, "shape", objs[i]["shape"]))
    counted = _pick(rng, (("shape",), ("colour",), ("size",), ()))
    if counted:
        source = _pick(rng, objs)
        value = source[counted[0]] if rng.random() < 0.75 else _pick(rng, _VALUES[counted[0]])
        d = lang.Description(**{counted[0]: value})
    else:
        d = lang.Description()
    out.append((f"how many {d.words(plural=True)} are there?", "count", str(len(lang.denote(d, objs)))))
    d = _described(rng, objs, exists)
    out.append((f"is there {lang.with_article(d.words())}?", "exist", "yes" if exists else "no"))
    i = int(rng.integers(len(objs)))
    unique = _unique_references(objs, i, None)
    if unique:
        question = f"where is the {_pick(rng, unique).words()}?"
        out.append((question, "position", lang.POSITION_NAMES[objs[i]["cell"]][0]))
    i = int(rng.integers(len(objs)))
    out.append((f"is {_reference(rng, objs, i, 'size', 'shape')} small or large?", "size", objs[i]["size"]))
    for question, _, answer in out:
        assert lang.vqa_answer(question, objs) == answer, (question, answer, objs)
    return [(_capitalised(q), kind, a) for q, kind, a in out]


def _vqa_entries(scenes: Sequence[TaskScene], seed: int, split_index: int) -> list[dict]:
    entries = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, _IMAGE_STREAM["coco"], split_index, i, _TEXT_STREAM["vqa"]])
        objs = scene.object_meta()
        for j, (question, kind, answer) in enumerate(vqa_questions(rng, objs, exists=i % 2 == 0)):
            entries.append({
                "image": scene.image, "question": question, "answer": human_answers(rng, kind, answer),
                "question_id": (split_index + 1) * 10_000_000 + i * 10 + j, "dataset": "vqa",
            })  # fmt: skip
    return entries


def vqa_answer_list() -> list[str]:
    """Every canonical answer of the world (mPLUG's answer_list.json for answer ranking)."""
    answers = [*COLOURS, *SHAPES, *(str(n) for n in range(5)), "yes", "no", *lang.SIZE_NAMES]
    return answers + [names[0] for names in lang.POSITION_NAMES]


# ---- captions: five references per image ------------------------------------------------------
def _object_words(rng: np.random.Generator, o: Mapping, size_p: float) -> str:
    """'big red circle', the size said with probability `size_p` (in one of its synonyms)."""
    size = [_pick(rng, lang.SIZE_SYNONYMS[o["size"]])] if rng.random() < size_p else []
    return " ".join([*size, o["colour"], o["shape"]])


def _noun_phrase(rng: np.random.Generator, o: Mapping, size_p: float, article: str | None = None) -> str:
    words = _object_words(rng, o, size_p)
    return f"{article} {words}" if article else lang.with_article(words)


def _where(rng: np.random.Generator, o: Mapping, style: str) -> str:
    """Where `o` is: "canonical" ("at the top left"), "varied" (any of its phrases) or "terse"
    ("at top left", for four-object captions that must stay within CAPTION_MAX_WORDS)."""
    if style == "terse":
        return "at " + lang.POSITION_NAMES[o["cell"]][0]
    phrases = lang.POSITION_PHRASES[o["cell"]]
    return phrases[0] if style == "canonical" else _pick(rng, phrases)


def _listing(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _shuffled(rng: np.random.Generator, objs: Sequence[Mapping]) -> list[Mapping]:
    return [objs[i] for i in rng.permutation(len(objs))]


def _caption(template: int, rng: np.random.Generator, objs: Sequence[Mapping], brevity: int) -> str:
    """One reference in one of six styles; `brevity` 1 drops sizes, 2 also says positions tersely."""
    size_p = 1.0 if brevity == 0 else 0.0
    canonical, varied = ("terse", "terse") if brevity == 2 else ("canonical", "varied")
    n = len(objs)
    if template == 0:  # full detail, reading order
        head = f"{lang.NUMBER_NAMES[n]} shapes: " if n > 1 else ""
        return head + _listing([f"{_noun_phrase(rng, o, size_p)} {_where(rng, o, canonical)}" for o in objs])
    if template == 1:  # "there is ...", any order, varied wording
        parts = [f"{_noun_phrase(rng, o, size_p / 2)} {_where(rng, o, varied)}" for o in _shuffled(rng, objs)]
        return "there is " + _listing(parts)
    if template == 2:  # position first
        return "; ".join(
            f"{_pick(rng, lang.POSITION_NAMES[o['cell']][:3])}: {_noun_phrase(rng, o, size_p / 2, 'one')}"
            for o in objs
        )
    if template == 3:  # what, not where
        if n == 1:
            return "a single " + _object_words(rng, objs[0], size_p * 0.6)
        return _listing([_noun_phrase(rng, o, size_p * 0.3) for o in _shuffled(rng, objs)])
    if template == 4:  # one relation, then the rest
        if n == 1:
            return f"a picture of {_noun_phrase(rng, objs[0], size_p / 2)} {_where(rng, objs[0], varied)}"
        a, b, *rest = _shuffled(rng, objs)
        relation = _pick(rng, [r for r in lang.RELATIONS if lang.relation_holds(r, a, b)])
        text = f"{_noun_phrase(rng, a, size_p / 2)} {relation} {_noun_phrase(rng, b, size_p / 2)}"
        if rest:
            text += ", with " + _listing(
                [f"{_noun_phrase(rng, o, 0.0)} {_where(rng, o, canonical)}" for o in rest]
            )
        return text
    parts = [f"{_noun_phrase(rng, o, size_p / 2)} {_where(rng, o, canonical)}" for o in _shuffled(rng, objs)]
    return f"an image with {lang.NUMBER_NAMES[n]} shape{'s' if n > 1 else ''}: " + _listing(parts)


def caption_references(rng: np.random.Generator, objs: Sequence[Mapping]) -> list[str]:
    """Five distinct references in five of the six styles, as people write them (capitalised,
    some with a full stop), each at most CAPTION_MAX_WORDS words."""
    refs = []
    for template in rng.permutation(6)[:5]:
        for brevity in range(3):  # the most detail that fits
            text = _caption(int(template), rng, objs, brevity)
            if len(text.split()) <= CAPTION_MAX_WORDS:
                break
        refs.append(_capitalised(text) + ("." if rng.random() < 0.6 else ""))
    assert len({r.lower().rstrip(".") for r in refs}) == 5, refs
    assert max(len(r.split()) for r in refs) <= CAPTION_MAX_WORDS, refs
    return refs


def karpathy_tokens(raw: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", raw.lower())


# ---- grounding: one referring expression per object -------------------------------------------
_FAMILIES = ("relation", "attributes", "position", "comparative", "extreme")
_FAMILY_WEIGHTS = (0.35, 0.2, 0.15, 0.15, 0.15)


def _expression_candidates(objs: Sequence[Mapping], i: int) -> dict[str, tuple[list[str], list[str]]]:
    """Unambiguous expressions for object `i`, by family: (hard, easy), hard ones naming what
    alone also fits another object ("the circle" among two circles, then "left of the star")."""
    o = objs[i]
    out: dict[str, tuple[list[str], list[str]]] = {f: ([], []) for f in _FAMILIES}
    for d in lang.descriptions(o):
        group = lang.denote(d, objs)
        ambiguous = len(group) > 1
        if d.said and not ambiguous:
            out["attributes"][1].append(f"the {d.words()}")
        if d.said:
            out["position"][0 if ambiguous else 1].extend(
                f"the {d.words()} {p}" for p in lang.POSITION_PHRASES[o["cell"]]
            )
        if d.size is None and len(group) == 2 and len({objs[k]["size"] for k in group}) == 2:
            word = "larger" if o["size"] == "large" else "smaller"
            out["comparative"][0].append(f"the {word} of the two {d.words(plural=True)}")
        if ambiguous:
            for extreme, key, best in (("furthest to the left", lang.col, min), ("furthest to the right", lang.col, max),
                                       ("highest", lang.row, min), ("lowest", lang.row, max)):  # fmt: skip
                top = best(key(objs[k]) for k in group)
                if [k for k in group if key(objs[k]) == top] == [i]:
                    text = (
                        f"the {d.words()} {extreme}"
                        if extreme.startswith("f")
                        else f"the {extreme} {d.words()}"
                    )
                    out["extreme"][0].append(text)
    for j, a in enumerate(objs):
        if j == i:
            continue
        anchors = [da for da in lang.descriptions(a) if da.said and lang.denote(da, objs) == [j]]
        for relation in lang.RELATIONS:
            if not lang.relation_holds(relation, o, a):
                continue
            for d in lang.descriptions(o):
                group = lang.denote(d, objs)
                if [k for k in group if k != j and lang.relation_holds(relation, objs[k], a)] == [i]:
                    hard = len(group) > 1
                    out["relation"][0 if hard else 1].extend(
                        f"the {d.words()} {relation} the {da.words()}" for da in anchors
                    )
    return out


def referring_expression(rng: np.random.Generator, objs: Sequence[Mapping], i: int) -> str:
    """An expression for object `i` that fits it alone; relations and comparisons are favoured,
    and within a family the hard expressions (4 in 5 when there are some)."""
    candidates = _expression_candidates(objs, i)
    for k in _weighted_order(rng, _FAMILY_WEIGHTS):
        hard, easy = candidates[_FAMILIES[k]]
        if hard or easy:
            text = _pick(rng, hard if hard and (not easy or rng.random() < 0.8) else easy)
            resolved = lang.resolve_referring(text, objs)
            assert resolved == [i], f"expression {text!r} resolves to {resolved}, not [{i}], in {objs}"
            return text
    raise AssertionError(f"object {i} of {objs} has no expression")  # "position" always has one


def _grounding_entries(scenes: Sequence[TaskScene], seed: int, split_index: int) -> list[dict]:
    entries = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng(
            [seed, _IMAGE_STREAM["refcoco"], split_index, i, _TEXT_STREAM["grounding"]]
        )
        objs = scene.object_meta()
        for j, o in enumerate(objs):
            entries.append({"image": scene.image, "bbox": o["bbox"], "text": referring_expression(rng, objs, j),
                            "ref_id": (split_index + 1) * 10_000_000 + i * 10 + j})  # fmt: skip
    return entries


# ---- NLVR2 and SNLI-VE: statements sampled per template until they carry the wanted label -----
def _phrase(
    rng: np.random.Generator, objs: Sequence[Mapping], patterns: Sequence[tuple[str, ...]] = _PATTERNS
) -> lang.Description:
    """A description of something shown (3 in 5) or of random attributes."""
    pattern = patterns[int(rng.integers(len(patterns)))]
    if objs and rng.random() < 0.6:
        o = _pick(rng, objs)
        return lang.Description(**{a: o[a] for a in pattern})
    return lang.Description(**{a: _pick(rng, _VALUES[a]) for a in pattern})


_NLVR2_WEIGHTS = {
    "both": 0.14, "side": 0.16, "only_one": 0.12, "neither": 0.1,
    "more": 0.14, "total": 0.1, "side_count": 0.14, "same_count": 0.1,
}  # fmt: skip
_COUNTED = (("shape",), ("colour",), ())  # what "more ___" and "exactly n ___" count


def _nlvr2_candidate(
    template: str, rng: np.random.Generator, left: Sequence[Mapping], right: Sequence[Mapping]
) -> str:
    both = list(left) + list(right)
    side = _pick(rng, ("left", "right"))
    other = "right" if side == "left" else "left"
    if template == "both":
        return f"both images contain {lang.with_article(_phrase(rng, both).words())}"
    if template == "side":
        return f"the {side} image contains {lang.with_article(_phrase(rng, both).words())}"
    if template == "only_one":
        return f"only one image contains {lang.with_article(_phrase(rng, both).words())}"
    if template == "neither":
        return f"neither image contains {lang.with_article(_phrase(rng, both).words())}"
    if template == "more":
        return f"the {side} image has more {_phrase(rng, both, _COUNTED).words(plural=True)} than the {other} image"
    if template == "total":
        n = int(rng.integers(max(2, len(both) - 2), len(both) + 3))
        return f"there are exactly {lang.NUMBER_NAMES[n]} shapes in total"
    if template == "side_count":
        d = _phrase(rng, both, _COUNTED)
        true = len(lang.denote(d, left if side == "left" else right))
        n = int(rng.integers(max(0, true - 1), true + 2))
        return f"the {side} image contains exactly {lang.NUMBER_NAMES[n]} {d.words(plural=n != 1)}"
    d = _phrase(rng, both, _COUNTED)
    return f"both images contain the same number of {d.words(plural=True)}"


class _TemplateBalance:
    """Which labels each template has carried so far in a split. A template that has carried
    `want` more often than its other labels is drawn less for it, so every template's labels
    stay near even and its words alone say little about the label."""

    def __init__(self, weights: Mapping[str, float], labels: Sequence[object]) -> None:
        self.weights, self.labels = dict(weights), list(labels)
        self.counts: dict[str, Counter] = {t: Counter() for t in self.weights}

    def order(self, rng: np.random.Generator, want: object) -> list[str]:
        templates = list(self.weights)
        scores = []
        for t in templates:
            mean = sum(self.counts[t][label] for label in self.labels) / len(self.labels)
            scores.append(self.weights[t] * ((1 + mean) / (1 + self.counts[t][want])) ** 2)
        return [templates[k] for k in _weighted_order(rng, scores)]

    def add(self, template: str, label: object) -> None:
        self.counts[template][label] += 1


def _labelled(
    rng: np.random.Generator,
    balance: _TemplateBalance,
    candidate: Callable[[str], str],
    label_of: Callable[[str], object],
    want: object,
    tries: int = 16,
) -> str:
    """A sentence labelled `want`, from the first template (in `balance`'s order) whose sampled
    sentences carry `want` and at least one other label in this scene: a template is used only
    where its words alone do not give the label away."""
    fallback = None
    for template in balance.order(rng, want):
        sampled = {}
        for _ in range(tries):
            text = candidate(template)
            sampled[text] = label_of(text)
        wanted = sorted(t for t, label in sampled.items() if label == want)
        if wanted and len(set(sampled.values())) > 1:
            balance.add(template, want)
            return _pick(rng, wanted)
        if fallback is None and wanted:
            fallback = (template, _pick(rng, wanted))
    if fallback is None:
        raise AssertionError(f"no template yields {want!r}")
    balance.add(fallback[0], want)
    return fallback[1]


def _nlvr2_entries(
    pairs: Sequence[tuple[TaskScene, TaskScene]], seed: int, split_index: int, split: str
) -> list[dict]:
    balance = _TemplateBalance(_NLVR2_WEIGHTS, (True, False))
    entries = []
    for i, (left_scene, right_scene) in enumerate(pairs):
        rng = np.random.default_rng([seed, _IMAGE_STREAM["nlvr2"], split_index, i, _TEXT_STREAM["nlvr2"]])
        left, right = left_scene.object_meta(), right_scene.object_meta()
        said: set[str] = set()
        first = bool(rng.random() < 0.5)
        for j in range(2):
            want = first if j == 0 else not first  # one true and one false statement per pair
            for _ in range(5):  # two different statements per pair
                text = _labelled(
                    rng, balance, partial(_nlvr2_candidate, rng=rng, left=left, right=right),
                    partial(lang.nlvr2_truth, left=left, right=right), want,
                )  # fmt: skip
                if text not in said:
                    break
            said.add(text)
            entries.append({"images": [left_scene.image, right_scene.image], "sentence": _capitalised(text) + ".",
                            "label": str(want), "identifier": f"{split}-{i}-0-{j}"})  # fmt: skip
    return entries


_SNLI_WEIGHTS = {
    "at": 0.3,
    "anywhere": 0.18,
    "exactly": 0.14,
    "at_least": 0.14,
    "none": 0.14,
    "unknowable": 0.1,
}
SNLI_LABELS = ("entailment", "neutral", "contradiction")


def _snli_candidate(
    template: str,
    rng: np.random.Generator,
    objs: Sequence[Mapping],
    covered: Sequence[int],
    unique: Sequence[lang.Description],
) -> str:
    """A hypothesis of `template`; `unique`: descriptions that fit one visible object each."""
    visible, hidden = len(objs), len(covered)
    if template == "at":
        d = _phrase(rng, objs, _PATTERNS[:3])
        draw = rng.random()
        if draw < 0.4:
            cell = int(_pick(rng, objs)["cell"])
        elif draw < 0.7 and covered:
            cell = int(_pick(rng, covered))
        else:
            cell = int(rng.integers(9))
        return f"there is {lang.with_article(d.words())} {_pick(rng, lang.POSITION_PHRASES[cell])}"
    if template == "anywhere":
        return f"there is {lang.with_article(_phrase(rng, objs).words())} in the picture"
    if template in ("exactly", "at_least"):
        n = int(rng.integers(max(1, visible - 1), visible + hidden + 2))
        which = "exactly" if template == "exactly" else "at least"
        return f"the picture shows {which} {lang.NUMBER_NAMES[n]} shape{'s' if n != 1 else ''}"
    if template == "none":
        return f"there are no {_phrase(rng, objs, _PATTERNS[:3]).words(plural=True)} in the picture"
    if unique and rng.random() < 0.6:
        d = _pick(rng, unique)
    else:
        d = _phrase(rng, [], _PATTERNS[:2])
        if len(lang.denote(d, objs)) > 1:  # "the red circle" must not be ambiguous
            d = _pick(rng, unique)  # never empty: every object's full description is unique
    return f"the {d.words()} {_pick(rng, lang.UNKNOWABLE)}"


def _snli_ve_entries(scenes: Sequence[TaskScene], seed: int, split_index: int) -> list[dict]:
    balance = _TemplateBalance(_SNLI_WEIGHTS, SNLI_LABELS)
    entries = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, _IMAGE_STREAM["snli_ve"], split_index, i, _TEXT_STREAM["snli_ve"]])
        objs = scene.object_meta()
        unique = [d for k in range(len(objs)) for d in _unique_references(objs, k, None)]
        for want in (SNLI_LABELS[k] for k in rng.permutation(3)):
            text = _labelled(
                rng, balance,
                partial(_snli_candidate, rng=rng, objs=objs, covered=scene.covered, unique=unique),
                partial(lang.snli_ve_label, objects=objs, covered=scene.covered), want,
            )  # fmt: skip
            entries.append({"image": scene.image, "sentence": _capitalised(text) + ".", "label": want})
    return entries


# ---- files ------------------------------------------------------------------------------------
def _write_json(out: str, name: str, value: object) -> str:
    uri = storage.join(out, name)
    storage.write_text(uri, json.dumps(value))
    return uri


def _render_pool(pool: str, count: int, seed: int, split_index: int, split: str, image_size: int) -> list:
    layout = POOLS[pool]
    scenes: list = []
    for i in range(count):
        rng = np.random.default_rng([seed, _IMAGE_STREAM[pool], split_index, i])
        if pool == "nlvr2":  # a pair: both images from one seed
            scenes.append(tuple(
                render_task_scene(f"{pool}/{split}/{pool}-{split}-{i:06d}-img{k}.jpg", rng, image_size, layout)
                for k in (0, 1)
            ))  # fmt: skip
        else:
            scenes.append(
                render_task_scene(f"{pool}/{split}/{pool}-{split}-{i:06d}.jpg", rng, image_size, layout)
            )
    return scenes


def _caption_files(
    out: str, split: str, split_index: int, scenes: Sequence[TaskScene], seed: int, karpathy: list[dict]
) -> tuple[list[dict], list[dict]]:
    """(caption entries, retrieval entries) for a split; appends the split's Karpathy images."""
    captions, retrieval = [], []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, _IMAGE_STREAM["coco"], split_index, i, _TEXT_STREAM["caption"]])
        refs = caption_references(rng, scene.object_meta())
        cocoid = (split_index + 1) * 1_000_000 + i
        if split == "train":
            captions += [{"image": scene.image, "caption": r, "image_id": f"coco_{cocoid}"} for r in refs]
            retrieval += [{"image": scene.image, "caption": r, "image_id": cocoid} for r in refs]
        else:
            captions.append({"image": scene.image, "caption": refs})
            retrieval.append({"image": scene.image, "caption": refs})
        imgid = len(karpathy)
        sentid = imgid * 5
        folder, filename = scene.image.rsplit("/", 1)
        karpathy.append({
            "filepath": folder, "filename": filename, "split": split, "cocoid": cocoid, "imgid": imgid,
            "sentids": list(range(sentid, sentid + 5)),
            "sentences": [{"raw": r, "tokens": karpathy_tokens(r), "imgid": imgid, "sentid": sentid + k}
                          for k, r in enumerate(refs)],
        })  # fmt: skip
    return captions, retrieval


def render_task_annotations(
    output_uri: str,
    num: int,
    seed: int = 0,
    image_size: int = 96,
    tasks: Sequence[str] = TASKS,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, dict[str, str]]:
    """Render each task's images (`num` per pool over the splits; NLVR2: `num` pairs) and write
    its official annotation files under `output_uri`, the image root.

    Returns task → split → annotation URI, plus "karpathy" (dataset_coco.json, for every split)
    when captions are asked for, and "scenes" (scenes_{split}.json: each image's objects).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks={list(tasks)!r}: each must be one of {TASKS}, at least one")
    if num < 1:
        raise ValueError(f"num={num}: need at least one image per pool")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: shapes need at least 32 pixels")
    counts = split_counts(num, split_fractions)
    out = output_uri.rstrip("/")
    pools = sorted({POOL_OF_TASK[t] for t in tasks})
    result: dict[str, dict[str, str]] = {t: {} for t in tasks}
    result["scenes"] = {}
    karpathy: list[dict] = []
    for s, split in enumerate(SPLITS):
        rendered = {p: _render_pool(p, counts[split], seed, s, split, image_size) for p in pools}
        truth: dict[str, dict] = {}
        for pool, scenes in rendered.items():
            for scene in itertools.chain.from_iterable(scenes) if pool == "nlvr2" else scenes:
                storage.write_bytes(storage.join(out, scene.image), scene.jpeg)
                truth[scene.image] = scene.meta()
        result["scenes"][split] = _write_json(out, f"scenes_{split}.json", truth)
        if "vqa" in tasks:
            result["vqa"][split] = _write_json(
                out, f"vqa_{split}.json", _vqa_entries(rendered["coco"], seed, s)
            )
        if "caption" in tasks or "retrieval" in tasks:
            captions, retrieval = _caption_files(out, split, s, rendered["coco"], seed, karpathy)
            if "caption" in tasks:
                result["caption"][split] = _write_json(out, f"caption_{split}.json", captions)
            if "retrieval" in tasks:
                result["retrieval"][split] = _write_json(out, f"retrieval_{split}.json", retrieval)
        if "grounding" in tasks:
            entries = _grounding_entries(rendered["refcoco"], seed, s)
            result["grounding"][split] = _write_json(out, f"grounding_{split}.json", entries)
        if "nlvr2" in tasks:
            entries = _nlvr2_entries(rendered["nlvr2"], seed, s, split)
            result["nlvr2"][split] = _write_json(out, f"nlvr2_{split}.json", entries)
        if "snli_ve" in tasks:
            entries = _snli_ve_entries(rendered["snli_ve"], seed, s)
            result["snli_ve"][split] = _write_json(out, f"snli_ve_{split}.json", entries)
    if "vqa" in tasks:
        _write_json(out, "vqa_answer_list.json", vqa_answer_list())
    if "caption" in tasks:
        uri = _write_json(out, "dataset_coco.json", {"images": karpathy, "dataset": "coco"})
        result["karpathy"] = {split: uri for split in SPLITS}
    return result


# ---- model-free baselines (percent, like mplug.metrics) ---------------------------------------
def load_json(uri: str) -> Any:
    return json.loads(storage.read_text(uri))


def majority_by_question_type(train: Sequence[Mapping], test: Sequence[Mapping]) -> dict[int, str]:
    """Predictions (question_id → answer) that look at no image: the most common train answer of
    the question's type (`synth_language.vqa_question_type`). Score them with
    `mplug.metrics.vqa_accuracy`, as a model's answers are."""
    by_type: dict[str, Counter] = {}
    for e in train:
        by_type.setdefault(lang.vqa_question_type(e["question"]), Counter()).update(e["answer"])
    overall = sum(by_type.values(), Counter())
    return {
        e["question_id"]: (by_type.get(lang.vqa_question_type(e["question"])) or overall).most_common(1)[0][0]
        for e in test
    }


def largest_object_box(objects: Sequence[Mapping]) -> list[float]:
    """The box of the largest object (the first in reading order among equals): what a model
    that ignores the expression would point at."""
    return list(max(objects, key=lambda o: o["bbox"][2] * o["bbox"][3])["bbox"])


def largest_object_accuracy(entries: Sequence[Mapping], scenes: Mapping[str, Mapping]) -> float:
    """Acc@IoU≥0.5 (percent) of always pointing at the largest object of the image."""
    from mplug.metrics import grounding_accuracy

    guesses = [largest_object_box(scenes[e["image"]]["objects"]) for e in entries]
    return grounding_accuracy(guesses, [e["bbox"] for e in entries])


def majority_label_by_text(
    train: Sequence[Mapping], test: Sequence[Mapping], key: Callable[[str], str] = lang.text_template
) -> float:
    """Accuracy (percent) of a text-only guess: the most common train label among sentences with
    the same `key` (by default the template; `key=str` for the exact sentence), else the overall."""
    by_key: dict[str, Counter] = {}
    for e in train:
        by_key.setdefault(key(e["sentence"]), Counter())[e["label"]] += 1
    overall = sum(by_key.values(), Counter()).most_common(1)[0][0]
    correct = [
        (by_key[key(e["sentence"])].most_common(1)[0][0] if key(e["sentence"]) in by_key else overall)
        == e["label"]
        for e in test
    ]
    return 100.0 * sum(correct) / len(correct)


def consensus_caption(train: Sequence[Mapping], max_candidates: int = 50, max_images: int = 100) -> str:
    """The one caption a model that ignores the image would best say: among the first
    `max_candidates` train captions, the one with the highest mean CIDEr-D against the first
    `max_images` train images' references (a sample: the full search is quadratic)."""
    from mplug.cider import CiderD

    refs: dict[str, list[str]] = {}
    for e in train:
        refs.setdefault(e["image"], []).append(e["caption"])
    reference_sets = list(refs.values())[:max_images]
    scorer = CiderD(reference_sets)
    candidates = list(dict.fromkeys(e["caption"] for e in train))[:max_candidates]
    scores = [float(scorer.score([c] * len(reference_sets), reference_sets).mean()) for c in candidates]
    return candidates[int(np.argmax(scores))]


def task_baselines(
    output_uri: str, tasks: Sequence[str] = TASKS, split: str = "test"
) -> dict[str, dict[str, float]]:
    """Every model-free baseline of the written tasks on `split` (fitted on train), in percent
    (CIDEr-D on its usual 0–10 scale): the figures a trained model must beat."""
    import torch

    from mplug.cider import CiderD
    from mplug.metrics import retrieval_chance, vqa_accuracy

    out = output_uri.rstrip("/")

    def data(name: str) -> Any:
        return load_json(storage.join(out, name))

    result: dict[str, dict[str, float]] = {}
    if "vqa" in tasks:
        test = data(f"vqa_{split}.json")
        guess = majority_by_question_type(data("vqa_train.json"), test)
        scored = vqa_accuracy(
            guess, {e["question_id"]: e["answer"] for e in test},
            question_types={e["question_id"]: lang.vqa_question_type(e["question"]) for e in test},
        )  # fmt: skip
        result["vqa"] = {"majority_by_question_type": scored["overall"]} | {
            f"majority_by_question_type/{k}": v for k, v in sorted(scored["per_question_type"].items())
        }
    if "caption" in tasks:
        test = data(f"caption_{split}.json")
        references = [e["caption"] for e in test]
        scorer = CiderD(references)  # df from the evaluated references, as pycocoevalcap's Cider
        constant = consensus_caption(data("caption_train.json"))
        # One human against the other four: how much the references agree with each other.
        held_out = scorer.score([r[0] for r in references], [r[1:] for r in references])
        result["caption"] = {
            "consensus_caption_cider": float(scorer.score([constant] * len(references), references).mean()),
            "one_reference_vs_others_cider": float(held_out.mean()),
        }
    if "retrieval" in tasks:
        test = data(f"retrieval_{split}.json")
        images = torch.arange(len(test))
        texts = images.repeat_interleave(torch.tensor([len(e["caption"]) for e in test]))
        result["retrieval"] = {f"chance/{k}": v for k, v in retrieval_chance(images, texts).items()}
    if "grounding" in tasks:
        scenes = data(f"scenes_{split}.json")
        result["grounding"] = {
            "largest_object": largest_object_accuracy(data(f"grounding_{split}.json"), scenes)
        }
    for task in ("nlvr2", "snli_ve"):
        if task in tasks:
            train, test = data(f"{task}_train.json"), data(f"{task}_{split}.json")
            labels = Counter(e["label"] for e in train)
            result[task] = {
                "majority_class": 100.0
                * sum(e["label"] == labels.most_common(1)[0][0] for e in test)
                / len(test),
                "text_only_by_template": majority_label_by_text(train, test),
                "text_only_by_sentence": majority_label_by_text(train, test, key=str),
            }
    return result
