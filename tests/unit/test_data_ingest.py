"""Ingest logic without Ray: the three stages run in-process on a synthetic corpus of each format."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from pipelines.data import readers
from pipelines.data.ingest import (
    HASH_PARTITIONS,
    IngestConfig,
    SettingsMismatch,
    _cfg_json,
    collect_stats,
    list_units,
    prepare_output,
    stage_a,
    stage_b,
    stage_c,
)
from pipelines.data.records import DATA_SCHEMA
from pipelines.synth.world import render_corpus

pytestmark = pytest.mark.unit


def ingest_in_process(cfg: IngestConfig) -> dict:
    """run_ingest's steps without Ray: list units, check the output, stages A, B, C, the books."""
    units, cols = list_units(cfg)
    prepare_output(cfg)
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
    assert {rows[k]["image_id"] for k in rows} == {"1", "a.png"}  # else the image path
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
    # The key is for this process only: never in what workers get through their runtime environment.
    assert cfg.credentials_env() == {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    assert "s3cr3t" not in json.dumps(cfg.storage_env()) and "AWS_SECRET_ACCESS_KEY" not in cfg.storage_env()
    assert "s3cr3t" not in _cfg_json(cfg)


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def url_rows(n: int) -> list[dict]:
    # Captions with commas, quotes, brackets and non-ASCII text: a byte range must not split them.
    return [{"url": f"http://127.0.0.1:9/{i}.jpg", "caption": f'pic {i}, "quoted" [{i}] café ñ', "key": f"k{i:03d}"}
            for i in range(n)]  # fmt: skip


def write_url_list(path: Path, fmt: str, rows: list[dict]) -> None:
    import csv

    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    elif fmt in ("csv", "tsv"):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["url", "caption", "key"], delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        path.write_text("\n".join(r["url"] for r in rows))  # txt: no trailing newline


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "json", "txt"])
def test_url_lists_split_into_descriptors_that_workers_read(tmp_path: Path, fmt: str) -> None:
    rows = url_rows(57)
    write_url_list(tmp_path / f"list.{fmt}", fmt, rows)
    units = readers.url_units(str(tmp_path), 5, caption=None, key=None, url=None)
    assert len(units) >= 8
    # The driver holds descriptors, not rows: a unit's description does not grow with its rows.
    assert max(len(json.dumps(dataclasses.asdict(u))) for u in units) < 600
    got = [r for u in units for r in readers.read_url_unit(u)]
    assert [r["url"] for r in got] == [r["url"] for r in rows]  # every row once, in order
    if fmt != "txt":
        assert [(r["key"], r["caption"]) for r in got] == [(r["key"], r["caption"]) for r in rows]


def test_json_array_scan_cuts_element_boundaries_in_bounded_memory(tmp_path: Path) -> None:
    tricky = [{"image": f"{i}.jpg", "caption": s} for i, s in enumerate(
        ["a ] b", 'quote \\" [ {', "ünïcödé ✓", "", "x" * 3000, "tab\tnew\nline", "{[]}", "end"])]  # fmt: skip
    tricky.append({"image": "n.jpg", "caption": "nested", "extra": {"a": [1, [2, {"b": "]"}]]}})
    for name, text in {
        "array.json": json.dumps(tricky, indent=1, ensure_ascii=False),
        "lines.jsonl": "\n".join(json.dumps(e) for e in tricky),
        "karpathy.json": json.dumps(
            {"dataset": "x", "images": [{"filename": "a", "sentences": [], "n": i} for i in range(7)]}
        ),  # fmt: skip
    }.items():
        (tmp_path / name).write_text(text)
        units = readers.json_units(str(tmp_path / name), 2)
        entries = [e for u in units for e in readers.read_json_unit(u)]
        expected = json.loads(text)["images"] if name == "karpathy.json" else tricky
        assert entries == expected, name
        assert len(units) == -(-len(expected) // 2)


def _tar(samples: dict[str, dict[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_damaged_input_files_become_counted_bad_shard_rejects(tmp_path: Path) -> None:
    # webdataset: a good tar and one cut inside its 4th sample's image.
    samples = {f"t-{i}": {"jpg": jpeg((40 * i, 90, 10)), "txt": f"sample {i}".encode()} for i in range(5)}
    good = _tar({f"g-{i}": {"jpg": jpeg((10, 20 * i, 200)), "txt": f"good {i}".encode()} for i in range(4)})
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "good.tar").write_bytes(good)
    full = _tar(samples)
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        cut = tar.getmember("t-3.jpg").offset_data + 100
    (tmp_path / "wds" / "cut.tar").write_bytes(full[:cut])
    stats = ingest_in_process(IngestConfig(input=str(tmp_path / "wds"), format="webdataset",
                                           output=str(tmp_path / "o1"), image_size=32))  # fmt: skip
    data = read_dir(tmp_path / "o1" / "data")
    assert sorted(data.column("key").to_pylist()) == ["g-0", "g-1", "g-2", "g-3", "t-0", "t-1", "t-2"]
    rejects = read_dir(tmp_path / "o1" / "rejects").to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [(str(tmp_path / "wds" / "cut.tar"), "bad_shard")]
    assert "cut.tar" in rejects[0]["detail"] and "ReadError" in rejects[0]["detail"]
    assert (stats["read"], stats["written"], stats["rejected"]) == (8, 7, 1)

    # parquet: one good file, one that is not parquet, one cut in half (no footer).
    (tmp_path / "pq").mkdir()
    table = pa.table({"jpg": [jpeg((200, 0, 0)), jpeg((0, 200, 0))], "caption": ["red", "green"]})
    pq.write_table(table, tmp_path / "pq" / "a.parquet")
    (tmp_path / "pq" / "b.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "pq" / "c.parquet").write_bytes((tmp_path / "pq" / "a.parquet").read_bytes()[:300])
    stats = ingest_in_process(IngestConfig(input=str(tmp_path / "pq"), format="parquet",
                                           output=str(tmp_path / "o2"), image_size=32))  # fmt: skip
    assert (stats["read"], stats["written"], stats["rejected_by_reason"]["bad_shard"]) == (4, 2, 2)

    # json: a good file, one that is no JSON at all, an array cut inside its 5th entry, and
    # JSON Lines with one broken line (that line is a bad_record: the others are readable).
    (tmp_path / "js").mkdir()
    (tmp_path / "a.jpg").write_bytes(jpeg((0, 0, 200)))
    entries = [{"image": "a.jpg", "caption": f"caption {i}"} for i in range(6)]
    (tmp_path / "js" / "good.json").write_text(json.dumps(entries[:2]))
    (tmp_path / "js" / "notjson.json").write_text("<html>not json</html>")
    text = json.dumps(entries)
    (tmp_path / "js" / "cut.json").write_text(text[: text.index("caption 4") + 3])
    lines = [json.dumps(e) for e in entries[:3]]
    (tmp_path / "js" / "lines.jsonl").write_text(f"{lines[0]}\n{lines[1][:-4]}\n{lines[2]}\n")
    stats = ingest_in_process(IngestConfig(input=str(tmp_path / "js"), format="json", image_root=str(tmp_path),
                                           output=str(tmp_path / "o3"), image_size=32, rows_per_unit=2,
                                           dedupe=False))  # fmt: skip
    reasons = {r["key"]: r["reason"] for r in read_dir(tmp_path / "o3" / "rejects").to_pylist()}
    cut_at = text.index('{"image": "a.jpg", "caption": "caption 4"}')
    assert reasons == {
        str(tmp_path / "js" / "notjson.json"): "bad_shard",
        f"{tmp_path / 'js' / 'cut.json'}@{cut_at}": "bad_shard",
        "lines-00000-000001": "bad_record",
    }
    # Read: good 2, cut 4 readable entries + 1 for its damaged rest, notjson 1, lines 3.
    assert (stats["read"], stats["written"], stats["rejected"]) == (11, 8, 3)


def test_other_settings_into_the_same_output_are_refused_or_overwritten(tmp_path: Path) -> None:
    splits = render_corpus(
        str(tmp_path / "raw"), 6, fmt="parquet", image_size=64, split_fractions=(1.0, 0, 0)
    )
    cfg = IngestConfig(input=splits["train"], format="parquet", output=str(tmp_path / "out"), image_size=32)
    ingest_in_process(cfg)
    ingest_in_process(cfg.model_copy(update={"num_workers": 3}))  # not a setting of the rows
    other = cfg.model_copy(update={"image_size": 48, "max_words": 5})
    with pytest.raises(SettingsMismatch, match=r"image_size: 32 there, 48 now; max_words: 30 there, 5 now"):
        ingest_in_process(other)
    stats = ingest_in_process(other.model_copy(update={"overwrite": True}))
    sizes = {
        Image.open(io.BytesIO(b)).size
        for b in read_dir(tmp_path / "out" / "data").column("image").to_pylist()
    }
    assert sizes == {(48, 48)} and stats["written"] == 6
