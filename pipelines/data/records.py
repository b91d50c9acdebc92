"""The one record vocabulary (DESIGN.md §4): column names, the processed-shard schema, the fixed
set of reject reasons, and caption cleaning as the official mPLUG/ALBEF code does it."""

from __future__ import annotations

import re

import pyarrow as pa

# Why a row was rejected. Fixed and documented in the README; every reject carries one.
REJECT_REASONS: dict[str, str] = {
    "missing_image": "the row names no image, the image file does not exist, or the producer recorded none",
    "download_error": "the URL could not be fetched (HTTP error, timeout, truncated body, wrong content type)",
    "decode_error": "the bytes are not a decodable image (corrupt or truncated)",
    "empty_image": "the image has zero bytes or zero pixels, or the video zero bytes or no frame",
    "too_small": "the shorter side is below `min_image_size`",
    "too_short": "the video has fewer decodable frames than `min_video_frames`",
    "bad_aspect": "long side / short side exceeds `max_aspect_ratio`",
    "too_large": "more pixels than `max_image_pixels` (decompression-bomb guard) or more bytes than `max_image_bytes` (an image file, a download or a tar member, refused before it is read whole), or an annotation entry longer than `max_annotation_bytes`",
    "empty_caption": "the caption (and question, if any) is empty after cleaning",
    "duplicate": "same image bytes, cleaned caption/question and task fields as a row with a smaller key",
    "bad_record": "a malformed row or annotation (missing key field, wrong type, unparseable metadata, no known format)",
    "bad_shard": "a whole input file, or the rest of one, could not be read (truncated tar, unreadable parquet, not JSON); counted as one row keyed by the file",
    "storage_error": "the object store would not serve an input file or image after the client's retries (throttling, server errors, broken connections, denied access); keyed by the file for a whole input file, the detail names the URI; a re-run with `overwrite` reads it again",
    "path_outside_root": "an annotation's image path is absolute, a URI, or climbs out of `image_root` with `..` (allow with `allow_image_paths_outside_root`)",
    "url_not_allowed": "the URL is not http(s), or names a loopback, private, link-local or otherwise non-public address, also after a redirect (allow private ones with `download.allow_private_urls`)",
}

# Processed shards (OUTPUT/data/*.parquet): one fixed schema so shards from any input format and
# any corpus can be read together. Task columns are null where the input had none. Columns are
# only ever added at the end and nullable: a reader of older shards treats a missing one as null.
DATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),  # JPEG bytes, shorter side = the configured resolution
        ("caption", pa.string()),
        ("url", pa.string()),
        ("width", pa.int32()),  # stored image size
        ("height", pa.int32()),
        ("image_id", pa.string()),  # the annotation's image id, else the image path
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),  # distinct answers
        ("answer_weights", pa.list_(pa.float32())),  # each distinct answer's share of `raw_answers`
        ("bbox", pa.list_(pa.float32())),  # x, y, w, h in pixels of the *resized* image
        ("label", pa.string()),
        ("orig_width", pa.int32()),  # the source image's size (EXIF orientation applied)
        ("orig_height", pa.int32()),
        ("raw_answers", pa.list_(pa.string())),  # the answers as annotated, in order, with repeats
        ("dataset", pa.string()),  # the VQA answer source ("vqa", "vg", "gqa", ...)
        ("images", pa.list_(pa.binary())),  # every image of a multi-image row (NLVR2: left, right)
        ("frames", pa.list_(pa.binary())),  # a video's sampled frames, JPEG, in time order
    ]
)
TASK_COLUMNS = (
    "image_id",
    "question",
    "answers",
    "answer_weights",
    "raw_answers",
    "dataset",
    "bbox",
    "label",
)

# OUTPUT/rejects/*.parquet: the row's key, one reason from REJECT_REASONS, a free-text detail.
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())])

_PUNCTUATION = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(text: str, max_words: int = 30) -> str:
    """Lower-case, strip punctuation, split hyphens/slashes, squeeze spaces, keep ≤ `max_words`
    words: the same normalisation as the official `pre_caption`."""
    text = (
        _PUNCTUATION.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    )
    text = _SPACES.sub(" ", text).strip()
    words = text.split(" ")
    return " ".join(words[:max_words]) if text else ""


def empty_data_table() -> pa.Table:
    return DATA_SCHEMA.empty_table()


def conform_to_schema(table: pa.Table) -> pa.Table:
    """A processed shard with every DATA_SCHEMA column, in schema order: columns a shard written
    before they existed are added as nulls (columns are only ever added, nullable)."""
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in DATA_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=DATA_SCHEMA)


def rejects_table(rows: list[dict]) -> pa.Table:
    for row in rows:
        if row["reason"] not in REJECT_REASONS:
            raise ValueError(f"reject reason {row['reason']!r} is not one of {sorted(REJECT_REASONS)}")
    return pa.Table.from_pylist(
        [{"key": r["key"], "reason": r["reason"], "detail": r.get("detail", "")} for r in rows],
        schema=REJECT_SCHEMA,
    )
