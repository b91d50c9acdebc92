"""The finetuning tasks' official annotation formats, read unchanged (`--format json`).

Each entry is recognised by the keys it has (first match wins):

| format | an entry | one row per |
|---|---|---|
| karpathy | `{filepath?, filename, sentences: [{raw}], split, cocoid?}` inside `{"images": [...]}` | sentence |
| nlvr2 | `{images: [left, right], sentence, label, identifier?}` | entry |
| vqa | `{image, question, answer: [..] or "..", question_id?, dataset?}` | entry |
| grounding | `{image, bbox: [x, y, w, h], text or phrase (or caption), ref_id?}` | expression |
| snli_ve | `{image, sentence, label}` (image may be a Flickr id without ".jpg") | entry |
| caption | `{image, caption: ".." or [..], image_id?}` (captions, retrieval train/test) | caption |

A list of captions (sentences, expressions) gives one row per item with keys `key#i`, all with
the entry's `image_id` (the image path when the annotation has none), so evaluation can score
against every reference of an image. Answers are kept exactly as annotated (`raw_answers`) and
summarised as distinct `answers` with their `answer_weights` (each one's share of the human
answers); questions and captions are cleaned later, answers never.

`entry_rows` returns raw records without image bytes: `_image_refs` lists, per image of the row,
the candidate URIs to read (the first that exists is used).

Annotation files are written by strangers: an image path must stay inside `image_root`. An
absolute path, a URI (`s3://other/x.jpg`, `file:///etc/passwd`) or one that climbs out with `..`
is a `path_outside_root` reject, unless `allow_outside_root` (the ingest key
`allow_image_paths_outside_root`) says the annotations are trusted to name any location.
"""

from __future__ import annotations

import posixpath
from collections import Counter

from pipelines import storage

FORMATS: dict[str, str] = {
    "karpathy": '{filename, sentences: [{raw}], split, cocoid?, filepath?} inside {"images": [...]}',
    "nlvr2": "{images: [left, right], sentence, label, identifier?}",
    "vqa": "{image, question, answer: [..] | '..', question_id?, dataset?}",
    "grounding": "{image, bbox: [x, y, w, h], text | phrase, ref_id?}",
    "snli_ve": "{image, sentence, label}",
    "caption": "{image, caption: '..' | [..], image_id?}",
}


def detect(entry: object) -> str | None:
    """The annotation format an entry is in, from the keys it has; None if it fits none."""
    if not isinstance(entry, dict):
        return None
    if "sentences" in entry and "filename" in entry:
        return "karpathy"
    if "images" in entry and "sentence" in entry:
        return "nlvr2"
    if "image" not in entry:
        return None
    if "question" in entry:
        return "vqa"
    if "bbox" in entry and any(k in entry for k in ("text", "phrase", "caption")):
        return "grounding"
    if "sentence" in entry:
        return "snli_ve"
    if "caption" in entry:
        return "caption"
    return None


def describe_mismatch(entry: object) -> str:
    keys = sorted(entry) if isinstance(entry, dict) else f"a {type(entry).__name__}, not an object"
    valid = "; ".join(f"{name} {shape}" for name, shape in FORMATS.items())
    return f"fits no annotation format (keys: {keys}); valid formats: {valid}"


def check_first_entry(entry: object, file_uri: str) -> None:
    """Refuse a file up front when its first entry fits no format (a wrong file, not a bad row)."""
    if detect(entry) is None:
        raise ValueError(f"{file_uri}: the first annotation entry {describe_mismatch(entry)}")


def selected(entry: object, splits: list[str] | None) -> bool:
    """Whether `splits` (Karpathy's train/restval/val/test) keeps this entry; entries with no
    `split` field are always kept."""
    if not splits or not isinstance(entry, dict) or "split" not in entry:
        return True
    return entry["split"] in splits


class PathOutsideRoot(ValueError):
    """An annotation's image path that would be read outside `image_root`; `key` is the row's."""

    key: str = ""


def _inside_root(image_root: str, path: str) -> str:
    """`path` joined under `image_root`, or PathOutsideRoot when it would leave it."""
    if "\0" in path:
        raise PathOutsideRoot(f"image path {path!r} holds a NUL byte")
    if "://" in path or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        raise PathOutsideRoot(f"image path {path!r} is absolute or a URI, not relative to image_root")
    normal = posixpath.normpath(path.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise PathOutsideRoot(f"image path {path!r} climbs out of image_root {image_root!r}")
    return storage.join(image_root, normal)


def _image_refs(
    image_root: str, path: str, *, add_jpg: bool = False, allow_outside_root: bool = False
) -> list[str]:
    if allow_outside_root:
        uri = path if "://" in path else storage.join(image_root, path) if image_root else path
    else:
        uri = _inside_root(image_root, path)
    # ALBEF's SNLI-VE files give the Flickr30K id and its loader appends ".jpg": accept both.
    if add_jpg and not posixpath.splitext(path)[1]:
        return [uri, uri + ".jpg"]
    return [uri]


def _first_id(entry: dict, *fields: str) -> str | None:
    for name in fields:
        value = entry.get(name)
        if value is not None and value != "":
            return str(value)
    return None


def _texts(value: object, what: str) -> list[str] | str:
    """A text or list of texts → the list; an error message (str) if it is neither."""
    if value is None:
        return [""]  # rejected as an empty caption, like a caption of punctuation only
    texts = value if isinstance(value, list) else [value]
    if not texts or not all(isinstance(t, str) for t in texts):
        return f"{what} must be text or a list of texts, got {value!r}"[:300]
    return texts


def _answers(answer: object) -> tuple[list[str] | None, list[str] | None, list[float] | None]:
    """(raw answers as annotated, distinct answers, each distinct answer's share of the raw ones)."""
    if answer is None:
        return None, None, None
    raw = [answer] if isinstance(answer, str) else [str(a) for a in answer]
    counts = Counter(raw)  # insertion-ordered: distinct answers in first-seen order
    return raw, list(counts), [counts[a] / len(raw) for a in counts]


def _bbox(value: object) -> list[float] | None:
    if not isinstance(value, list | tuple) or len(value) != 4:
        return None
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return box if box[2] >= 0 and box[3] >= 0 else None


def _reject(key: str, detail: str) -> list[dict]:
    return [{"key": key, "_reject": ("bad_record", detail)}]


def entry_rows(
    entry: object, fallback_key: str, image_root: str, allow_outside_root: bool = False
) -> list[dict]:
    """Raw records (no image bytes) for one annotation entry, or one reject (`bad_record`, or
    `path_outside_root` for an image path that would leave `image_root`)."""
    try:
        return _entry_rows(entry, fallback_key, image_root, allow_outside_root)
    except PathOutsideRoot as err:
        return [{"key": err.key, "_reject": ("path_outside_root", str(err)[:2000])}]


def _entry_rows(entry: object, fallback_key: str, image_root: str, allow_outside_root: bool) -> list[dict]:
    def refs_of(path: str, key: str, add_jpg: bool = False) -> list[str]:
        try:
            return _image_refs(image_root, path, add_jpg=add_jpg, allow_outside_root=allow_outside_root)
        except PathOutsideRoot as err:
            err.key = key  # the key the row would have had
            raise

    fmt = detect(entry)
    if fmt is None:
        return _reject(fallback_key, f"annotation entry {describe_mismatch(entry)}"[:2000])
    assert isinstance(entry, dict)
    base = {
        "caption": None, "question": None, "answers": None, "answer_weights": None, "raw_answers": None,
        "dataset": None, "bbox": None, "label": None, "url": None,
    }  # fmt: skip

    if fmt == "nlvr2":
        key = _first_id(entry, "key", "identifier") or fallback_key
        images = entry["images"]
        if (
            not isinstance(images, list)
            or len(images) < 2
            or not all(isinstance(p, str) and p for p in images)
        ):
            return _reject(key, f"'images' must list two or more image paths, got {images!r}"[:300])
        sentence = entry["sentence"]
        if not isinstance(sentence, str):
            return _reject(key, f"'sentence' must be text, got {sentence!r}"[:300])
        return [{**base, "key": key, "caption": sentence, "label": _label(entry),
                 "image_id": _first_id(entry, "image_id") or images[0],
                 "_image_refs": [refs_of(p, key) for p in images]}]  # fmt: skip

    if fmt == "karpathy":
        folder, name = entry.get("filepath") or "", entry["filename"]
        if not isinstance(name, str) or not name or not isinstance(folder, str):
            return _reject(fallback_key, f"'filepath'/'filename' must be text, got {folder!r}/{name!r}")
        path = posixpath.join(folder, name) if folder else name
        image_id = _first_id(entry, "image_id", "cocoid") or path
        key = _first_id(entry, "key") or image_id
        sentences = entry["sentences"]
        texts = (
            [s.get("raw") if isinstance(s, dict) else s for s in sentences]
            if isinstance(sentences, list)
            else sentences
        )
        texts = _texts(texts, "'sentences' raw text")
        if isinstance(texts, str):
            return _reject(key, texts)
        refs = [refs_of(path, key)]
        return [
            {**base, "key": f"{key}#{i}", "caption": t, "image_id": image_id, "_image_refs": refs}
            for i, t in enumerate(texts)
        ]

    path = entry["image"]
    id_fields = {"vqa": ("key", "question_id"), "grounding": ("key", "ref_id")}.get(fmt, ("key",))
    key = _first_id(entry, *id_fields) or fallback_key
    if not isinstance(path, str) or not path:
        return _reject(key, f"'image' must be a path, got {path!r}"[:300])
    refs = [refs_of(path, key, add_jpg=fmt == "snli_ve")]
    image_id = _first_id(entry, "image_id") or path
    bbox = _bbox(entry.get("bbox"))  # carried on any single-image row that has a valid one

    if fmt == "vqa":
        question = entry["question"]
        if not isinstance(question, str):
            return _reject(key, f"'question' must be text, got {question!r}"[:300])
        answer = entry.get("answer", entry.get("answers"))
        if answer is not None and not (
            isinstance(answer, str)
            or (isinstance(answer, list) and all(isinstance(a, str | int | float) for a in answer))
        ):
            return _reject(key, f"'answer' must be text or a list of texts, got {answer!r}"[:300])
        raw, answers, weights = _answers(answer)
        return [{**base, "key": key, "question": question, "raw_answers": raw, "answers": answers,
                 "answer_weights": weights, "dataset": _first_id(entry, "dataset"), "image_id": image_id,
                 "bbox": bbox, "_image_refs": refs}]  # fmt: skip

    if fmt == "snli_ve":
        sentence = entry["sentence"]
        if not isinstance(sentence, str):
            return _reject(key, f"'sentence' must be text, got {sentence!r}"[:300])
        return [{**base, "key": key, "caption": sentence, "label": _label(entry), "image_id": image_id,
                 "bbox": bbox, "_image_refs": refs}]  # fmt: skip

    if fmt == "grounding":
        if bbox is None:
            return _reject(key, f"'bbox' must be [x, y, w, h] numbers, got {entry['bbox']!r}"[:300])
        text_field = next(k for k in ("text", "phrase", "caption") if k in entry)
    else:
        text_field = "caption"
    texts = _texts(entry[text_field], f"'{text_field}'")
    if isinstance(texts, str):
        return _reject(key, texts)
    several = isinstance(entry[text_field], list)
    return [
        {
            **base,
            "key": f"{key}#{i}" if several else key,
            "caption": t,
            "bbox": bbox,
            "label": _label(entry),
            "image_id": image_id,
            "_image_refs": refs,
        }  # fmt: skip
        for i, t in enumerate(texts)
    ]


def _label(entry: dict) -> str | None:
    value = entry.get("label")
    return None if value is None else str(value)
