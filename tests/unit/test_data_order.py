"""The training order: every rank's rows of an epoch are a fixed sequence (same in every run),
the ranks share the rows, epochs differ, a resumed epoch skips exactly the rows already seen, and
a row's augmentation depends only on (seed, epoch, key)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.order import chunk_rows, plan_chunks, rank_windows, row_seed
from pipelines.data.shards import read_window_rows
from pipelines.data.transforms import ImageTextTransform, objects

pytestmark = pytest.mark.unit


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(value).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path) -> list[str]:
    """Three shards of 50, 30 and 20 rows, in row groups of 16."""
    files, n = [], 0
    for size in (50, 30, 20):
        keys = [f"k{n + i:03d}" for i in range(size)]
        table = pa.table({"key": keys, "image": [b"x"] * size, "caption": ["c"] * size})
        path = str(tmp_path / f"part-{len(files)}.parquet")
        pq.write_table(table, path, row_group_size=16)
        files.append(path)
        n += size
    return files


def _sequence(chunks, epoch: int, rank: int, world: int, skip: int = 0) -> list[str]:
    windows = rank_windows(chunks, seed=7, epoch=epoch, rank=rank, world=world, window=2, skip_rows=skip)
    batch = {"window": np.asarray([json.dumps(asdict(w)) for w in windows], dtype=object)}
    return [
        k
        for t in read_window_rows(batch, 5, ("key", "caption"), seed=7, epoch=epoch)
        for k in t.column("key").to_pylist()
    ]


def test_ranks_share_every_row_once_in_an_order_fixed_per_epoch(shards) -> None:
    chunks = plan_chunks(shards, rows_per_chunk=8)
    assert sum(c.rows for c in chunks) == 100 and max(c.rows for c in chunks) == 8
    epoch0 = [_sequence(chunks, 0, r, 3) for r in range(3)]
    assert sorted(k for seq in epoch0 for k in seq) == [f"k{i:03d}" for i in range(100)]  # disjoint, complete
    assert max(map(len, epoch0)) - min(map(len, epoch0)) <= 8  # within one chunk of each other
    assert epoch0 == [_sequence(chunks, 0, r, 3) for r in range(3)]  # the same in every run
    assert _sequence(chunks, 1, 0, 3) != epoch0[0]  # another epoch, another order


def test_a_resumed_epoch_continues_exactly_where_it_stopped(shards) -> None:
    chunks = plan_chunks(shards, rows_per_chunk=8)
    full = _sequence(chunks, 2, 1, 2)
    for skip in (0, 3, 8, 16, 21, len(full)):
        assert _sequence(chunks, 2, 1, 2, skip=skip) == full[skip:]


def test_chunks_are_whole_groups_on_large_data_and_finer_on_small() -> None:
    assert chunk_rows(10_000_000, 64) == 256
    assert chunk_rows(1_000, 2) == 31 and chunk_rows(50, 8) == 8


def _task_rows(kind: str) -> tuple[type, dict, dict]:
    """(transform class, its keyword arguments, two rows of its columns) for each task's transform."""
    from pipelines.data.transforms import (
        CaptionTransform,
        ClassificationTransform,
        GroundingTransform,
        RetrievalTransform,
        VQATransform,
    )

    rows = {"key": objects(["a", "b"]), "image": objects([_png(1), _png(2)]), "caption": objects(["x", "y"])}
    size = {"image_size": 16}
    return {
        "pretrain": (ImageTextTransform, {**size, "max_text_len": 8}, rows),
        "caption": (CaptionTransform, {**size, "caption_len": 8}, rows),
        "retrieval": (RetrievalTransform, {**size, "max_text_len": 8}, rows),
        "vqa": (VQATransform, {**size, "question_len": 8, "answer_len": 4, "max_answers": 2},
                {**rows, "question": objects(["q", "r"]), "answers": objects([["x"], ["y"]])}),
        "grounding": (GroundingTransform, {**size, "max_text_len": 8},
                      {**rows, "bbox": objects([[4.0, 4.0, 8.0, 8.0], [2.0, 6.0, 10.0, 4.0]]),
                       "width": objects([24, 24]), "height": objects([24, 24])}),
        "classification": (ClassificationTransform, {**size, "max_text_len": 8, "labels": ("no", "yes")},
                           {**rows, "label": objects(["yes", "no"])}),
    }[kind]  # fmt: skip


@pytest.mark.parametrize("kind", ["pretrain", "caption", "retrieval", "vqa", "grounding", "classification"])
def test_augmentation_depends_on_the_row_seed_only(kind: str) -> None:
    """Every task's training transform draws a row's crop, flip and RandAugment from the row's
    own seed: the same in any process (another process's stream) and in any batch."""
    cls, kwargs, rows = _task_rows(kind)
    seeds = np.asarray([row_seed(0, 3, "a"), row_seed(0, 3, "b")], dtype=np.int64)
    one = cls(train=True, seed=1, **kwargs)
    other = cls(train=True, seed=2, **kwargs)  # another process's stream
    first = one({**rows, "_seed": seeds})["image"]
    np.testing.assert_array_equal(first, other({**rows, "_seed": seeds})["image"])
    np.testing.assert_array_equal(
        first[1], one({k: v[1:] for k, v in rows.items()} | {"_seed": seeds[1:]})["image"][0]
    )
    next_epoch = np.asarray([row_seed(0, 4, "a"), row_seed(0, 4, "b")], dtype=np.int64)
    assert not np.array_equal(first, one({**rows, "_seed": next_epoch})["image"])
