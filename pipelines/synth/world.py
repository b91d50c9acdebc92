"""The "shapes world": a synthetic image-text corpus that is the embedded default and the test data.

Each scene holds 1–3 coloured shapes in distinct cells of a 3×3 grid over a noisy background.
Every image comes with a rich, mostly unique caption (colour, size, shape and position of each
object, and the count), question/answer pairs (colour, shape, count, existence, position) and a
box per object. Every image is rendered from its own seed (base seed, split, index), so a split
is identical whatever `num` says about the others. Corpora are written in any ingest input format,
the way each producer writes it; `corrupt_per_kind` adds a known number of bad records of each
kind to the train split and lists them in `{output}/train_corrupt.json` (key → expected reason).

The finetuning tasks' images and official annotation files (VQA, Karpathy captions, retrieval,
grounding, NLVR2, SNLI-VE) are rendered by `pipelines.synth.tasks`, from these drawing
primitives; `pipelines.synth.language` says what their sentences mean.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipelines import storage

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.16, "large": 0.30}  # object extent as a fraction of the image side
# 3×3 grid cells, row-major, as a caption phrase and a one/two-word position answer.
CELLS = (
    ("at the top left", "top left"),
    ("at the top", "top"),
    ("at the top right", "top right"),
    ("on the left", "left"),
    ("in the center", "center"),
    ("on the right", "right"),
    ("at the bottom left", "bottom left"),
    ("at the bottom", "bottom"),
    ("at the bottom right", "bottom right"),
)
NUMBER_WORDS = ("zero", "one", "two", "three")
FORMATS = ("parquet", "webdataset", "json", "urls")
SPLITS = ("train", "val", "test")
RECORDS_PER_SHARD = 100


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    cell: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {CELLS[self.cell][0]}"


@dataclass(frozen=True)
class Scene:
    key: str
    image: bytes  # JPEG
    objects: tuple[ShapeObject, ...]

    @property
    def caption(self) -> str:
        phrases = [o.phrase for o in self.objects]
        if len(phrases) == 1:
            return phrases[0]
        listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{NUMBER_WORDS[len(phrases)]} shapes: {listed}"

    def questions(self) -> list[dict[str, str]]:
        first = self.objects[0]
        present = {(o.colour, o.shape) for o in self.objects}
        absent_colour = next(c for c in COLOURS if (c, first.shape) not in present)
        return [
            {"question": f"what color is the {first.shape}?", "answer": first.colour},
            {"question": f"what shape is {CELLS[first.cell][0]}?", "answer": first.shape},
            {"question": "how many shapes are there?", "answer": NUMBER_WORDS[len(self.objects)]},
            {"question": f"is there a {first.colour} {first.shape}?", "answer": "yes"},
            {"question": f"is there a {absent_colour} {first.shape}?", "answer": "no"},
            {"question": f"where is the {first.colour} {first.shape}?", "answer": CELLS[first.cell][1]},
        ]

    def meta(self) -> dict:
        return {
            "key": self.key,
            "caption": self.caption,
            "objects": [
                {
                    "colour": o.colour,
                    "shape": o.shape,
                    "size": o.size,
                    "position": CELLS[o.cell][1],
                    "bbox": o.bbox,
                }
                for o in self.objects
            ],
            "qa": self.questions(),
        }


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """One filled shape inscribed in the box (x, y, w, h)."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    if shape == "circle":
        draw.ellipse((x, y, x + w, y + h), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + w, y + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x + w, y + h), (x, y + h)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x + w, cy), (cx, y + h), (x, cy)], fill=fill)
    else:  # star: 5 points alternating outer/inner radius
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, w / 2, w / 5)
        draw.polygon([(cx + r * np.cos(a), cy - r * np.sin(a)) for a, r in zip(angles, radii)], fill=fill)


def noisy_background(rng: np.random.Generator, image_size: int, tint: int | None = None) -> np.ndarray:
    """(S, S, 3) uint8: a random mid-tone colour plus pixel noise. Channels are drawn apart in
    90-169, or, with `tint`, as one grey level in 95-164 shifted by at most ±tint per channel:
    a near-grey that no shape colour resembles."""
    if tint is None:
        background = rng.integers(90, 170, size=3)
    else:
        background = rng.integers(95, 165) + rng.integers(-tint, tint + 1, size=3)
    noise = rng.normal(0, 10, size=(image_size, image_size, 3))
    return np.clip(background[None, None, :] + noise, 0, 255).astype(np.uint8)


def render_scene(key: str, rng: np.random.Generator, image_size: int) -> Scene:
    """One scene from `rng`: background colour + noise, then 1–3 shapes in distinct cells."""
    im = Image.fromarray(noisy_background(rng, image_size), "RGB")
    draw = ImageDraw.Draw(im)
    count = int(rng.integers(1, 4))
    cells = rng.choice(9, size=count, replace=False)
    cell_side = image_size / 3
    objects = []
    for cell in cells:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        size = str(rng.choice(list(SIZES)))
        extent = SIZES[size] * image_size
        # Jitter inside the cell, staying inside it so positions stay unambiguous.
        slack = max(0.0, cell_side - extent)
        x = (cell % 3) * cell_side + rng.uniform(0, slack)
        y = (cell // 3) * cell_side + rng.uniform(0, slack)
        bbox = (round(float(x), 1), round(float(y), 1), round(extent, 1), round(extent, 1))
        draw_shape(draw, shape, bbox, COLOURS[colour])
        objects.append(ShapeObject(colour, shape, size, int(cell), bbox))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return Scene(key=key, image=buf.getvalue(), objects=tuple(objects))


def split_counts(num: int, split_fractions: tuple[float, ...]) -> dict[str, int]:
    """How many of `num` items each split gets (train and val rounded, test the rest)."""
    if (
        len(split_fractions) != 3
        or any(f < 0 for f in split_fractions)
        or abs(sum(split_fractions) - 1) > 1e-6
    ):
        raise ValueError(
            f"split_fractions={split_fractions!r}: need three non-negative fractions summing to 1"
        )
    n_train = int(round(num * split_fractions[0]))
    n_val = int(round(num * split_fractions[1]))
    return {"train": n_train, "val": n_val, "test": max(0, num - n_train - n_val)}


def split_scenes(
    num: int, seed: int, image_size: int, split_fractions: tuple[float, ...]
) -> dict[str, list[Scene]]:
    counts = split_counts(num, split_fractions)
    return {
        split: [
            render_scene(f"{split}-{i:06d}", np.random.default_rng([seed, s, i]), image_size)
            for i in range(counts[split])
        ]
        for s, split in enumerate(SPLITS)
    }


# ---- corrupt records: (kind, expected reject reason) per format -------------------------------
_CORRUPT_KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "parquet": (
        ("garbage", "decode_error"),
        ("truncated", "decode_error"),
        ("empty", "empty_image"),
        ("tiny", "too_small"),
        ("aspect", "bad_aspect"),
        ("bomb", "too_large"),
        ("nocaption", "empty_caption"),
        ("duplicate", "duplicate"),
        ("failed", "missing_image"),
    ),
    "webdataset": (
        ("garbage", "decode_error"),
        ("truncated", "decode_error"),
        ("empty", "empty_image"),
        ("tiny", "too_small"),
        ("aspect", "bad_aspect"),
        ("bomb", "too_large"),
        ("nocaption", "empty_caption"),
        ("duplicate", "duplicate"),
        ("noimage", "missing_image"),
        ("badjson", "bad_record"),
    ),
    "json": (
        ("garbage", "decode_error"),
        ("truncated", "decode_error"),
        ("empty", "empty_image"),
        ("tiny", "too_small"),
        ("aspect", "bad_aspect"),
        ("bomb", "too_large"),
        ("nocaption", "empty_caption"),
        ("duplicate", "duplicate"),
        ("noimage", "missing_image"),
        ("badfield", "bad_record"),
    ),
    "urls": (
        ("garbage", "decode_error"),
        ("truncated", "decode_error"),
        ("empty", "empty_image"),
        ("tiny", "too_small"),
        ("aspect", "bad_aspect"),
        ("nocaption", "empty_caption"),
        ("duplicate", "duplicate"),
        ("notfound", "download_error"),
        ("nourl", "bad_record"),
    ),
}


def corrupt_kinds(fmt: str) -> dict[str, str]:
    """Corrupt-record kinds `render_corpus` can add for `fmt`, each with its expected reject reason."""
    return dict(_CORRUPT_KINDS[fmt])


def _encoded(im: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _corrupt_record(kind: str, key: str, clean: Scene, image_size: int) -> dict:
    """A raw record {key, image: bytes|None, caption: str|None, ...flags} of the given kind."""
    record: dict = {"key": key, "image": clean.image, "caption": clean.caption + f" variant {key}"}
    if kind == "garbage":
        record["image"] = np.random.default_rng(len(key)).bytes(2000)
    elif kind == "truncated":
        record["image"] = clean.image[: len(clean.image) // 2]
    elif kind == "empty":
        record["image"] = b""
    elif kind == "tiny":
        record["image"] = _encoded(Image.new("RGB", (12, 12), (200, 10, 10)))
    elif kind == "aspect":
        record["image"] = _encoded(
            Image.new("RGB", (image_size * 5, max(32, image_size // 2)), (10, 200, 10))
        )
    elif kind == "bomb":
        # 36 Mpx of zeros compress to a few tens of KB: a decompression bomb in miniature.
        record["image"] = _encoded(Image.new("L", (6000, 6000), 0), "PNG")
    elif kind == "nocaption":
        record["caption"] = " ?!... "
    elif kind == "duplicate":
        record["caption"] = clean.caption
    elif kind in ("failed", "noimage", "notfound"):
        record["image"] = None
    elif kind in ("badjson", "badfield", "nourl"):
        record["bad"] = True
    else:
        raise ValueError(f"unknown corrupt kind {kind!r}")
    return record


def _write_parquet(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def _shards(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)] or [[]]


def _write_split_parquet(out: str, split: str, records: list[dict]) -> str:
    """img2dataset's parquet output: jpg bytes, caption, key, status, error_message, width, height."""
    folder = storage.join(out, split)
    for n, shard in enumerate(_shards(records, RECORDS_PER_SHARD)):
        rows = []
        for r in shard:
            ok = r["image"] is not None
            rows.append(
                {
                    "key": r["key"],
                    "jpg": r["image"],
                    "caption": r["caption"],
                    "url": f"synth://{split}/{r['key']}",
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "synthetic: HTTP Error 404",
                    "width": r.get("width"),
                    "height": r.get("height"),
                }
            )
        schema = pa.schema(
            [
                ("key", pa.string()),
                ("jpg", pa.binary()),
                ("caption", pa.string()),
                ("url", pa.string()),
                ("status", pa.string()),
                ("error_message", pa.string()),
                ("width", pa.int32()),
                ("height", pa.int32()),
            ]
        )
        _write_parquet(storage.join(folder, f"{n:05d}.parquet"), pa.Table.from_pylist(rows, schema=schema))
    return folder


def _write_split_webdataset(out: str, split: str, records: list[dict]) -> str:
    """img2dataset's webdataset output: {key}.jpg, {key}.txt, {key}.json per sample, in tars."""
    folder = storage.join(out, split)
    storage.ensure_dir(folder)
    for n, shard in enumerate(_shards(records, RECORDS_PER_SHARD)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for r in shard:
                meta = r.get("meta") or {"key": r["key"], "caption": r["caption"]}
                members = {
                    f"{r['key']}.txt": (r["caption"] or "").encode(),
                    f"{r['key']}.json": b"{not json" if r.get("bad") else json.dumps(meta).encode(),
                }
                if r["image"] is not None:
                    members[f"{r['key']}.jpg"] = r["image"]
                for name in sorted(members):
                    info = tarfile.TarInfo(name)
                    info.size = len(members[name])
                    tar.addfile(info, io.BytesIO(members[name]))
        storage.write_bytes(storage.join(folder, f"{n:05d}.tar"), buf.getvalue())
    return folder


def _write_images(out: str, split: str, records: list[dict]) -> dict[str, str]:
    """Write each record's image under {out}/{split}/images/; returns key → path relative to out."""
    rel: dict[str, str] = {}
    for r in records:
        path = f"{split}/images/{r['key']}.jpg"
        rel[r["key"]] = path
        if r["image"] is not None:
            storage.write_bytes(storage.join(out, path), r["image"])
    return rel


def _write_split_json(out: str, split: str, records: list[dict]) -> str:
    """ALBEF/mPLUG caption annotation lists; image paths are relative to the image root `out`.
    (The finetuning tasks' annotation files come from `synth_tasks.render_task_annotations`.)"""
    rel = _write_images(out, split, records)
    captions = []
    for r in records:
        entry = {"image": rel[r["key"]], "caption": r["caption"], "key": r["key"], "image_id": r["key"]}
        if r.get("bad"):
            entry["caption"] = 12345  # a caption that is not text
        captions.append(entry)
    uri = storage.join(out, f"{split}.json")
    storage.write_text(uri, json.dumps(captions))
    return uri


def _write_split_urls(out: str, split: str, records: list[dict], url_base: str) -> str:
    """A URL list (parquet: url, caption, key) whose images are served from `url_base`, which must
    serve the folder `out` (e.g. a static HTTP server rooted there)."""
    rel = _write_images(out, split, records)
    rows = []
    for r in records:
        url = None if r.get("bad") else f"{url_base.rstrip('/')}/{rel[r['key']]}"
        if r["image"] is None and not r.get("bad"):
            url = f"{url_base.rstrip('/')}/{split}/missing/{r['key']}.jpg"
        rows.append({"url": url, "caption": r["caption"], "key": r["key"]})
    uri = storage.join(out, f"{split}_urls.parquet")
    _write_parquet(
        uri,
        pa.Table.from_pylist(
            rows, schema=pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string())])
        ),
    )
    return uri


def render_corpus(
    output_uri: str,
    num: int,
    fmt: str = "parquet",
    seed: int = 0,
    image_size: int = 96,
    corrupt_per_kind: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    url_base: str | None = None,
) -> dict[str, str]:
    """Render `num` scenes split train/val/test and write them in `fmt`; returns split → input URI.

    parquet/webdataset: a folder of img2dataset-style shards per split (`{out}/{split}/`).
    json: the annotation file `{out}/{split}.json`; the image root is `output_uri` itself.
    urls: `{out}/{split}_urls.parquet`; images are written under `{out}` and `url_base` must serve it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: must be one of {FORMATS}")
    if num < 1:
        raise ValueError(f"num={num}: need at least one scene")
    if fmt == "urls" and not url_base:
        raise ValueError("fmt='urls' needs url_base: the HTTP address that serves output_uri")
    if corrupt_per_kind < 0:
        raise ValueError(f"corrupt_per_kind={corrupt_per_kind}: must be >= 0")
    scenes = split_scenes(num, seed, image_size, split_fractions)
    out = output_uri.rstrip("/")
    result: dict[str, str] = {}
    for split, split_scenes_ in scenes.items():
        records = [
            {"key": s.key, "image": s.image, "caption": s.caption, "meta": s.meta()} for s in split_scenes_
        ]
        expected: dict[str, str] = {}
        if split == "train" and corrupt_per_kind and split_scenes_:
            for kind, reason in _CORRUPT_KINDS[fmt]:
                for j in range(corrupt_per_kind):
                    clean = split_scenes_[j % len(split_scenes_)]
                    # Duplicates copy a clean scene under a key that sorts after it, so the clean
                    # one is the row ingest keeps.
                    key = f"{clean.key}-dup{j}" if kind == "duplicate" else f"{split}-corrupt-{kind}-{j}"
                    records.append(_corrupt_record(kind, key, clean, image_size))
                    expected[key] = reason
            storage.write_text(storage.join(out, f"{split}_corrupt.json"), json.dumps(expected, indent=1))
        if fmt == "parquet":
            result[split] = _write_split_parquet(out, split, records)
        elif fmt == "webdataset":
            result[split] = _write_split_webdataset(out, split, records)
        elif fmt == "json":
            result[split] = _write_split_json(out, split, records)
        else:
            result[split] = _write_split_urls(out, split, records, url_base or "")
    return result
