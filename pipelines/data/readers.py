"""Input readers: split an input into *units* (one per input file, or one per chunk of an
annotation/URL list) on the driver, and turn one unit into raw records inside a worker.

A raw record is a dict with `key`, `image` (bytes or None), `caption`, optional task fields and
`url`, and `_reject` = (reason, detail) when the reader already knows the row is bad. Column
names are resolved once, on the driver, so a LAION-style (`URL`/`TEXT`) or img2dataset
(`jpg`/`caption`/`key`/`status`) input maps in with no options.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "txt", "Caption")
KEY_COLUMNS = ("key", "KEY", "id")
URL_COLUMNS = ("url", "URL")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json", ".txt")


@dataclass
class Columns:
    """Input column names resolved for one input; None where the input has no such column."""

    image: str | None = None
    caption: str | None = None
    key: str | None = None
    url: str | None = None
    status: str | None = None
    error_message: str | None = None
    task: list[str] = field(default_factory=list)


@dataclass
class Unit:
    """One piece of independent ingest work with a stable id (it names every output it writes)."""

    unit_id: str
    kind: str  # parquet | webdataset | json | urls
    source: str  # file URI
    entries: list | None = None  # json / urls: the rows of this chunk


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    if wanted:
        if wanted not in names:
            raise ValueError(f"{what} column {wanted!r} not in the input; columns are {names}")
        return wanted
    return next((c for c in candidates if c in names), None)


def resolve_columns(names: list[str], *, image: str | None, caption: str | None, key: str | None,
                    url: str | None, need_image: bool) -> Columns:  # fmt: skip
    from pipelines.data.records import TASK_COLUMNS

    cols = Columns(
        image=_pick(names, image, IMAGE_COLUMNS, "image"),
        caption=_pick(names, caption, CAPTION_COLUMNS, "caption"),
        key=_pick(names, key, KEY_COLUMNS, "key"),
        url=_pick(names, url, URL_COLUMNS, "url"),
        status="status" if "status" in names else None,
        error_message="error_message" if "error_message" in names else None,
        task=[c for c in TASK_COLUMNS if c in names],
    )
    if need_image and cols.image is None:
        raise ValueError(
            f"no image column among {names}: pass --image-column (looked for {list(IMAGE_COLUMNS)}); "
            "for a URL list use --format urls"
        )
    if not need_image and cols.url is None:
        raise ValueError(f"no URL column among {names}: pass --url-column (looked for {list(URL_COLUMNS)})")
    if cols.caption is None:
        raise ValueError(
            f"no caption column among {names}: pass --caption-column (looked for {list(CAPTION_COLUMNS)})"
        )
    return cols


def unit_id_for(input_uri: str, file_uri: str) -> str:
    """A stable, filesystem-safe id from the file's path relative to the input root."""
    root = input_uri.rstrip("/")
    rel = (
        file_uri[len(root) :].lstrip("/")
        if file_uri.startswith(root) and file_uri != root
        else posixpath.basename(file_uri)
    )
    stem = rel.rsplit(".", 1)[0] if "." in posixpath.basename(rel) else rel
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "unit"


def _files(input_uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """The input itself if it is a file, else every file below it with one of `suffixes`."""
    fs, path = storage.pyarrow_fs(input_uri)
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        raise FileNotFoundError(f"input {input_uri!r} does not exist")
    if info.type.name == "File":
        return [input_uri]
    files = [f for f in storage.list_files(input_uri) if f.endswith(suffixes)]
    files = [f for f in files if not posixpath.basename(f).startswith(("_", "."))]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {input_uri!r}")
    return files


# ---- parquet -----------------------------------------------------------------------------------
def parquet_units(input_uri: str) -> list[Unit]:
    return [Unit(unit_id_for(input_uri, f), "parquet", f) for f in _files(input_uri, (".parquet",))]


def parquet_schema_names(file_uri: str) -> list[str]:
    fs, path = storage.pyarrow_fs(file_uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).schema_arrow.names


def _image_value(value) -> bytes | None:
    # Hugging Face `datasets` stores images as a struct {bytes, path}.
    if isinstance(value, dict):
        return value.get("bytes")
    return value


def read_parquet_unit(unit: Unit, cols: Columns, batch_rows: int = 256) -> Iterator[dict]:
    fs, path = storage.pyarrow_fs(unit.source)
    wanted = [
        c
        for c in (cols.image, cols.caption, cols.key, cols.url, cols.status, cols.error_message, *cols.task)
        if c
    ]
    row = 0
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(
            batch_size=batch_rows, columns=list(dict.fromkeys(wanted))
        ):
            for rec in batch.to_pylist():
                key = rec.get(cols.key) if cols.key else None
                out = {
                    "key": str(key) if key is not None else f"{unit.unit_id}-{row:07d}",
                    "image": _image_value(rec.get(cols.image)),
                    "caption": rec.get(cols.caption),
                    "url": rec.get(cols.url) if cols.url else None,
                    **{c: rec.get(c) for c in cols.task},
                }
                status = rec.get(cols.status) if cols.status else None
                if status is not None and status != "success":
                    # img2dataset keeps failed rows in its parquet, without image bytes.
                    message = rec.get(cols.error_message) if cols.error_message else None
                    out["_reject"] = ("missing_image", f"producer status {status!r}: {message}")
                elif key is None and cols.key:
                    out["_reject"] = ("bad_record", f"null {cols.key!r} at row {row}")
                row += 1
                yield out


# ---- webdataset --------------------------------------------------------------------------------
def webdataset_units(input_uri: str) -> list[Unit]:
    return [Unit(unit_id_for(input_uri, f), "webdataset", f) for f in _files(input_uri, (".tar",))]


def _split_wds_name(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is the path up to the first dot of the basename.
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def _wds_record(key: str, members: dict[str, bytes]) -> dict:
    image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
    rec: dict = {
        "key": key,
        "image": members.get(image_ext) if image_ext else None,
        "caption": None,
        "url": None,
    }
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"expected an object, got {type(meta).__name__}")
        except (ValueError, UnicodeDecodeError) as err:
            rec["_reject"] = ("bad_record", f"{key}.json: {err}")
            return rec
        rec["key"] = str(meta.get("key") or key)
        rec["url"] = meta.get("url")
        rec["caption"] = meta.get("caption")
    if "txt" in members:
        rec["caption"] = members["txt"].decode("utf-8", errors="replace")
    if image_ext is None:
        rec["_reject"] = ("missing_image", f"no {'/'.join(WDS_IMAGE_EXTS)} member for key {key!r}")
    return rec


def read_webdataset_unit(unit: Unit) -> Iterator[dict]:
    """Stream a tar (no seeking, so it works on object storage) and group members by key."""
    fs, path = storage.pyarrow_fs(unit.source)
    current: str | None = None
    members: dict[str, bytes] = {}
    with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_wds_name(member.name)
            if key != current and current is not None:
                yield _wds_record(current, members)
                members = {}
            current = key
            handle = tar.extractfile(member)
            members[ext] = handle.read() if handle else b""
    if current is not None:
        yield _wds_record(current, members)


# ---- ALBEF/mPLUG JSON annotations ----------------------------------------------------------------
def json_units(input_uri: str, rows_per_unit: int) -> list[Unit]:
    units = []
    for file_uri in _files(input_uri, (".json",)):
        entries = json.loads(storage.read_text(file_uri))
        if not isinstance(entries, list):
            raise ValueError(
                f"{file_uri}: an annotation file must hold a JSON list, got {type(entries).__name__}"
            )
        base = unit_id_for(input_uri, file_uri)
        for n, start in enumerate(range(0, len(entries), rows_per_unit)):
            units.append(Unit(f"{base}-{n:05d}", "json", file_uri, entries[start : start + rows_per_unit]))
    return units


def _answers(entry: dict) -> tuple[list[str] | None, list[float] | None]:
    answer = entry.get("answers", entry.get("answer"))
    if answer is None:
        return None, None
    answers = [answer] if isinstance(answer, str) else [str(a) for a in answer]
    # VQA weights as the official code computes them: each distinct answer's share of the votes.
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    distinct = list(counts)
    return distinct, [counts[a] / len(answers) for a in distinct]


def json_records(unit: Unit, image_root: str) -> Iterator[tuple[dict, str | None]]:
    """(raw record without image bytes, image URI or None) for every caption/question of the chunk."""
    assert unit.entries is not None
    for idx, entry in enumerate(unit.entries):
        fallback_key = f"{unit.unit_id}-{idx:06d}"
        if not isinstance(entry, dict):
            yield (
                {"key": fallback_key, "_reject": ("bad_record", f"entry {idx} is a {type(entry).__name__}")},
                None,
            )
            continue
        key = str(entry.get("key") or entry.get("question_id") or fallback_key)
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            yield (
                {
                    "key": key,
                    "_reject": ("bad_record", f"entry {idx}: 'image' must be a path, got {image!r}"),
                },
                None,
            )
            continue
        caption = entry.get("caption")
        captions = caption if isinstance(caption, list) else [caption]
        if caption is not None and not all(isinstance(c, str) for c in captions):
            yield (
                {
                    "key": key,
                    "_reject": ("bad_record", f"entry {idx}: caption must be text, got {caption!r}"),
                },
                None,
            )
            continue
        answers, weights = _answers(entry)
        bbox = entry.get("bbox")
        base = {
            "image_id": str(entry["image_id"]) if entry.get("image_id") is not None else None,
            "question": entry.get("question"),
            "answers": answers,
            "answer_weights": weights,
            "bbox": [float(v) for v in bbox] if isinstance(bbox, list) and len(bbox) == 4 else None,
            "label": str(entry["label"]) if entry.get("label") is not None else None,
            "url": None,
        }
        uri = storage.join(image_root, image)
        for c_idx, cap in enumerate(captions):
            # COCO-style lists: one row per caption, same image (not duplicates of each other).
            row_key = key if len(captions) == 1 else f"{key}#{c_idx}"
            yield {"key": row_key, "caption": cap, **base}, uri


# ---- URL lists ---------------------------------------------------------------------------------
def _read_url_rows(file_uri: str) -> list[dict]:
    suffix = posixpath.splitext(file_uri)[1].lower()
    if suffix == ".parquet":
        return pq.read_table(pa.py_buffer(storage.read_bytes(file_uri))).to_pylist()
    text = storage.read_text(file_uri)
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{file_uri}: a JSON URL list must be a list of objects")
        return rows
    return [{"url": line.strip(), "caption": ""} for line in text.splitlines() if line.strip()]  # .txt


def url_units(
    input_uri: str, rows_per_unit: int, *, caption: str | None, key: str | None, url: str | None
) -> list[Unit]:
    units = []
    for file_uri in _files(input_uri, URL_LIST_SUFFIXES):
        rows = _read_url_rows(file_uri)
        names = sorted({k for r in rows for k in r}) if rows else ["url", "caption"]
        cols = resolve_columns(names, image=None, caption=caption, key=key, url=url, need_image=False)
        base = unit_id_for(input_uri, file_uri)
        entries = []
        for i, r in enumerate(rows):
            k = r.get(cols.key) if cols.key else None
            entries.append(
                {"key": str(k) if k is not None else f"{base}-{i:07d}", "url": r.get(cols.url),
                 "caption": r.get(cols.caption), **{c: r.get(c) for c in cols.task}}
            )  # fmt: skip
        for n, start in enumerate(range(0, len(entries), rows_per_unit)):
            units.append(Unit(f"{base}-{n:05d}", "urls", file_uri, entries[start : start + rows_per_unit]))
    return units
