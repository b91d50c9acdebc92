"""The shapes world: deterministic by seed, rich captions, producer-faithful formats."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.synth.world import COLOURS, SHAPES, corrupt_kinds, render_corpus, render_scene, split_scenes

pytestmark = pytest.mark.unit


def test_scene_is_deterministic_and_described() -> None:
    a = render_scene("k", np.random.default_rng([0, 0, 7]), 64)
    b = render_scene("k", np.random.default_rng([0, 0, 7]), 64)
    assert a.image == b.image and a.caption == b.caption
    assert 1 <= len(a.objects) <= 3
    for obj in a.objects:
        assert obj.colour in a.caption and obj.shape in a.caption and obj.size in a.caption
        x, y, w, h = obj.bbox
        assert min(x, y) >= 0 and x + w <= 64.01 and y + h <= 64.01
    assert Image.open(io.BytesIO(a.image)).size == (64, 64)
    answers = {q["question"]: q["answer"] for q in a.questions()}
    assert answers["how many shapes are there?"] in ("one", "two", "three")
    assert sorted(set(answers.values()) & {"yes", "no"}) == ["no", "yes"]


def test_captions_are_rich_and_mostly_unique() -> None:
    scenes = split_scenes(200, seed=3, image_size=32, split_fractions=(0.0, 0.0, 1.0))["test"]
    captions = [s.caption for s in scenes]
    assert len(set(captions)) >= 0.97 * len(captions)
    assert len(COLOURS) >= 6 and len(SHAPES) >= 4
    multi = next(c for c in captions if c.startswith(("two", "three")))
    assert " and " in multi and any(p in multi for p in ("left", "right", "top", "bottom", "center"))


def test_splits_are_deterministic_by_seed_and_independent_of_each_other() -> None:
    a = split_scenes(20, seed=1, image_size=32, split_fractions=(0.8, 0.1, 0.1))
    b = split_scenes(40, seed=1, image_size=32, split_fractions=(0.8, 0.1, 0.1))
    c = split_scenes(20, seed=2, image_size=32, split_fractions=(0.8, 0.1, 0.1))
    assert [len(a[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    assert [s.image for s in a["train"]] == [s.image for s in b["train"][:16]]
    assert a["train"][0].caption != c["train"][0].caption or a["train"][0].image != c["train"][0].image
    with pytest.raises(ValueError, match="split_fractions"):
        split_scenes(10, seed=0, image_size=32, split_fractions=(0.5, 0.1, 0.1))


def test_parquet_is_written_as_img2dataset_does(tmp_path: Path) -> None:
    splits = render_corpus(str(tmp_path), 12, fmt="parquet", image_size=32, corrupt_per_kind=1)
    table = pq.read_table(next(Path(splits["train"]).glob("*.parquet")))
    assert {"key", "jpg", "caption", "status", "error_message", "url"} <= set(table.column_names)
    expected = json.loads((tmp_path / "train_corrupt.json").read_text())
    assert sorted(expected.values()) == sorted(corrupt_kinds("parquet").values())
    assert table.num_rows == 10 + len(expected)  # 80% of 12 rounds to 10
    failed = [r for r in table.to_pylist() if r["status"] != "success"]
    assert len(failed) == 1 and failed[0]["jpg"] is None


def test_webdataset_tar_layout(tmp_path: Path) -> None:
    splits = render_corpus(str(tmp_path), 5, fmt="webdataset", image_size=32)
    with tarfile.open(next(Path(splits["train"]).glob("*.tar"))) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("train-000000.json").read())
    assert names[:3] == ["train-000000.jpg", "train-000000.json", "train-000000.txt"]
    assert meta["caption"] and len(meta["qa"]) >= 5 and meta["objects"][0]["bbox"]


def test_json_caption_annotations(tmp_path: Path) -> None:
    splits = render_corpus(str(tmp_path), 10, fmt="json", image_size=32)
    entries = json.loads(Path(splits["val"]).read_text())
    assert len(entries) == 1 and all((tmp_path / e["image"]).is_file() for e in entries)
    assert all(isinstance(e["caption"], str) and e["caption"] for e in entries)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fmt='tfrecord'"):
        render_corpus(str(tmp_path), 4, fmt="tfrecord")
    with pytest.raises(ValueError, match="url_base"):
        render_corpus(str(tmp_path), 4, fmt="urls")
