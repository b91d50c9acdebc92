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
    "empty_image": "the image has zero bytes or zero pixels",
    "too_small": "the shorter side is below `min_image_size`",
    "bad_aspect": "long side / short side exceeds `max_aspect_ratio`",
    "too_large": "more pixels than `max_image_pixels` (decompression-bomb guard) or more bytes than `max_image_bytes`",
    "empty_caption": "the caption (and question, if any) is empty after cleaning",
    "duplicate": "same image bytes and same cleaned caption/question as a row with a smaller key",
    "bad_record": "a malformed row or annotation (missing key field, wrong type, unparseable metadata)",
}

# Processed shards (OUTPUT/data/*.parquet): one fixed schema so shards from any input format and
# any corpus can be read together. Task columns are null where the input had none.
DATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),  # JPEG bytes, shorter side = the configured resolution
        ("caption", pa.string()),
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_id", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("answer_weights", pa.list_(pa.float32())),
        ("bbox", pa.list_(pa.float32())),  # x, y, w, h in pixels of the *resized* image
        ("label", pa.string()),
    ]
)
TASK_COLUMNS = ("image_id", "question", "answers", "answer_weights", "bbox", "label")

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


def rejects_table(rows: list[dict]) -> pa.Table:
    for row in rows:
        if row["reason"] not in REJECT_REASONS:
            raise ValueError(f"reject reason {row['reason']!r} is not one of {sorted(REJECT_REASONS)}")
    return pa.Table.from_pylist(
        [{"key": r["key"], "reason": r["reason"], "detail": r.get("detail", "")} for r in rows],
        schema=REJECT_SCHEMA,
    )
