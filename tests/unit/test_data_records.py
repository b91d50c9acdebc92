"""Caption cleaning as the official pre_caption does it, and the reject vocabulary."""

from __future__ import annotations

import pytest

from pipelines.data.records import DATA_SCHEMA, REJECT_REASONS, clean_caption, rejects_table

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A Dog, running!", "a dog running"),
        ("  Two   cats\n", "two cats"),
        ("well-known red/blue thing", "well known red blue thing"),
        ('"Quoted" (text); with: marks?', "quoted text with marks"),
        ("<person> rides a bike", "person rides a bike"),
        (" ?!... ", ""),
        ("", ""),
    ],
)
def test_clean_caption(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_caption_is_capped_at_max_words() -> None:
    raw = " ".join(f"w{i}" for i in range(50))
    assert clean_caption(raw).split() == [f"w{i}" for i in range(30)]
    assert clean_caption(raw, max_words=5) == "w0 w1 w2 w3 w4"


def test_reject_table_refuses_unknown_reason() -> None:
    table = rejects_table([{"key": "a", "reason": "duplicate"}])
    assert table.to_pylist() == [{"key": "a", "reason": "duplicate", "detail": ""}]
    with pytest.raises(ValueError, match="not_a_reason"):
        rejects_table([{"key": "a", "reason": "not_a_reason"}])


def test_vocabulary_matches_design() -> None:
    assert {"key", "image", "caption", "url", "width", "height", "question", "answers", "bbox"} <= set(
        DATA_SCHEMA.names
    )
    assert {"decode_error", "too_small", "bad_aspect", "empty_caption", "too_large", "duplicate"} <= set(
        REJECT_REASONS
    )


def test_old_shards_read_with_the_new_columns_as_null() -> None:
    import pyarrow as pa

    from pipelines.data.records import conform_to_schema

    old = pa.table({"key": ["a"], "image": [b"\xff"], "caption": ["c"], "width": pa.array([4], pa.int32())})
    table = conform_to_schema(old)
    assert table.schema.equals(DATA_SCHEMA)
    row = table.to_pylist()[0]
    assert (row["key"], row["width"], row["raw_answers"], row["images"], row["orig_width"]) == (
        "a",
        4,
        None,
        None,
        None,
    )
    assert "bad_shard" in REJECT_REASONS
