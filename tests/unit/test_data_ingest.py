"""Ingest logic without Ray: the three stages run in-process on a synthetic corpus of each format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from pipelines.data.ingest import (
    HASH_PARTITIONS,
    IngestConfig,
    collect_stats,
    list_units,
    stage_a,
    stage_b,
    stage_c,
)
from pipelines.data.records import DATA_SCHEMA
from pipelines.data.synth import render_corpus

pytestmark = pytest.mark.unit


def ingest_in_process(cfg: IngestConfig) -> dict:
    units, cols = list_units(cfg)
    for unit in units:
        stage_a(unit, cfg, cols)
    for part in range(HASH_PARTITIONS):
        stage_b(part, cfg)
    for unit in units:
        stage_c(unit.unit_id, cfg)
    return collect_stats(cfg, [u.unit_id for u in units])


def read_dir(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "json"])
def test_every_corrupt_kind_is_rejected_with_its_reason(tmp_path: Path, fmt: str) -> None:
    splits = render_corpus(str(tmp_path / "raw"), 12, fmt=fmt, image_size=64, corrupt_per_kind=1)
    expected = json.loads((tmp_path / "raw" / "train_corrupt.json").read_text())
    cfg = IngestConfig(
        input=splits["train"], format=fmt, output=str(tmp_path / "out"), image_size=48,
        image_root=str(tmp_path / "raw") if fmt == "json" else None, rows_per_unit=7,
    )  # fmt: skip
    stats = ingest_in_process(cfg)
    rejects = read_dir(tmp_path / "out" / "rejects")
    assert dict(zip(rejects.column("key").to_pylist(), rejects.column("reason").to_pylist())) == expected
    assert stats["read"] == 10 + len(expected) and stats["rejected"] == len(expected)
    assert stats["read"] == stats["written"] + stats["rejected"]
    data = read_dir(tmp_path / "out" / "data")
    assert data.schema.equals(DATA_SCHEMA) and data.num_rows == 10 == stats["written"]
    assert all(Image.open(io.BytesIO(b)).size == (48, 48) for b in data.column("image").to_pylist())
    assert all(c and c == c.lower() for c in data.column("caption").to_pylist())


def test_coco_style_caption_lists_are_not_duplicates_but_repeats_are(tmp_path: Path) -> None:
    img = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(img, format="PNG")
    (tmp_path / "a.png").write_bytes(img.getvalue())
    (tmp_path / "b.png").write_bytes(img.getvalue())  # same bytes under another name
    ann = [
        {"image": "a.png", "caption": ["A red square.", "A red box!"], "image_id": 1},
        {"image": "b.png", "caption": "a red SQUARE", "key": "zz"},  # same image + cleaned caption
        {
            "image": "a.png",
            "question": "What colour?",
            "answer": ["red", "red", "crimson"],
            "bbox": [0, 0, 32, 32],
        },
    ]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    cfg = IngestConfig(input=str(tmp_path / "ann.json"), format="json", output=str(tmp_path / "out"),
                       image_root=str(tmp_path), image_size=32, rows_per_shard=2)  # fmt: skip
    stats = ingest_in_process(cfg)
    assert (stats["read"], stats["written"], stats["rejected_by_reason"]["duplicate"]) == (4, 3, 1)
    # Shard 0 (two clean rows) is published as staged; shard 1 loses its duplicate.
    shards = sorted((tmp_path / "out" / "data").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in shards] == [2, 1]
    rows = {r["key"]: r for r in read_dir(tmp_path / "out" / "data").to_pylist()}
    assert set(rows) == {"ann-00000-000000#0", "ann-00000-000000#1", "ann-00000-000002"}
    vqa = rows["ann-00000-000002"]
    assert vqa["question"] == "what colour" and vqa["answers"] == ["red", "crimson"]
    assert vqa["answer_weights"] == pytest.approx([2 / 3, 1 / 3])
    assert vqa["bbox"] == [0, 0, 16, 16]  # scaled with the image, 64 → 32
    assert read_dir(tmp_path / "out" / "rejects").to_pylist() == [
        {"key": "zz", "reason": "duplicate", "detail": "same image and text as key 'ann-00000-000000#0'"}
    ]


def test_laion_style_columns_map_in_and_missing_columns_are_named(tmp_path: Path) -> None:
    img = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 90, 0)).save(img, format="JPEG")
    pq.write_table(pa.table({"IMG": [img.getvalue()], "TEXT": ["A green field"], "URL": ["http://x/1.jpg"]}),
                   tmp_path / "laion.parquet")  # fmt: skip
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"no image column among \['IMG', 'TEXT', 'URL'\]"):
        list_units(IngestConfig(input=str(tmp_path), format="parquet", output=out))
    stats = ingest_in_process(
        IngestConfig(input=str(tmp_path), format="parquet", output=out, image_column="IMG")
    )
    row = read_dir(tmp_path / "out" / "data").to_pylist()[0]
    assert stats["written"] == 1 and row["caption"] == "a green field" and row["url"] == "http://x/1.jpg"
    assert (row["width"], row["height"]) == (341, 256)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="imagesize"):
        IngestConfig.from_yaml("input: a\nformat: parquet\noutput: b\nimagesize: 3\n")
    with pytest.raises(ValidationError, match="image_size"):
        IngestConfig.from_yaml("input: a\nformat: parquet\noutput: b\nimage_size: big\n")
    with pytest.raises(ValidationError, match="format"):
        IngestConfig(input="a", format="csv", output="b")
    path = tmp_path / "ingest.yaml"
    path.write_text(
        "input: a\nformat: json\noutput: b\ndownload: {timeout_s: 2}\naws_secret_access_key: s3cr3t\n"
    )
    cfg = IngestConfig.from_yaml(str(path), output="c", image_size=None)
    assert (cfg.output, cfg.download.timeout_s, cfg.image_size) == ("c", 2.0, 256)
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(cfg)
    assert cfg.storage_env()["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
