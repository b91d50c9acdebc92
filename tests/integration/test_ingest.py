"""Ingest on the shared Ray instance, s3:// → s3:// against the moto server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import storage
from pipelines.data.ingest import IngestConfig, run_ingest
from pipelines.data.records import DATA_SCHEMA, REJECT_REASONS
from pipelines.synth.world import corrupt_kinds, render_corpus

pytestmark = pytest.mark.integration


def read_all(uri: str) -> pa.Table:
    files = storage.list_files(uri, ".parquet")
    return pa.concat_tables([pq.read_table(pa.py_buffer(storage.read_bytes(f))) for f in files])


def check_output(out: str, stats: dict, image_size: int) -> pa.Table:
    assert stats["read"] == stats["written"] + stats["rejected"]
    assert sum(stats["rejected_by_reason"].values()) == stats["rejected"]
    assert set(stats["rejected_by_reason"]) == set(REJECT_REASONS)
    assert json.loads(storage.read_text(storage.join(out, "stats.json")))["written"] == stats["written"]
    data = read_all(storage.join(out, "data"))
    assert data.schema.equals(DATA_SCHEMA) and data.num_rows == stats["written"]
    assert len(set(data.column("key").to_pylist())) == data.num_rows
    for blob in data.column("image").to_pylist():
        im = Image.open(io.BytesIO(blob))
        assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) == image_size
    assert not storage.exists(storage.join(out, "_staging"))
    return data


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "json"])
def test_ingest_each_format_s3_to_s3_with_one_corrupt_record_of_every_kind(ray_session, s3_bucket, fmt):
    raw = s3_bucket.uri("raw")
    splits = render_corpus(raw, 30, fmt=fmt, seed=4, image_size=64, corrupt_per_kind=1)
    expected = json.loads(storage.read_text(storage.join(raw, "train_corrupt.json")))
    assert sorted(expected.values()) == sorted(corrupt_kinds(fmt).values())
    out = s3_bucket.uri("processed", fmt)
    cfg = IngestConfig(
        input=splits["train"], format=fmt, output=out, image_size=48, rows_per_shard=10, rows_per_unit=9,
        image_root=raw if fmt == "json" else None,
    )  # fmt: skip
    stats = run_ingest(cfg)
    data = check_output(out, stats, 48)
    assert (stats["read"], stats["written"]) == (24 + len(expected), 24)
    assert max(pq.read_metadata(pa.BufferReader(storage.read_bytes(f))).num_rows
               for f in storage.list_files(storage.join(out, "data"))) <= 10  # fmt: skip
    rejects = read_all(storage.join(out, "rejects"))
    assert dict(zip(rejects.column("key").to_pylist(), rejects.column("reason").to_pylist())) == expected
    assert all(rejects.column("detail").to_pylist())
    assert {k for k in data.column("key").to_pylist()} == {f"train-{i:06d}" for i in range(24)}


def test_rerun_after_interruption_finishes_without_duplicates(ray_session, s3_bucket, s3_endpoint, tmp_path):
    """Kill a CLI ingest (its own Ray driver, joined to the shared cluster) mid-way, re-run it."""
    import ray

    raw = s3_bucket.uri("raw")
    splits = render_corpus(raw, 60, fmt="json", seed=5, image_size=48, split_fractions=(1.0, 0.0, 0.0))
    out = s3_bucket.uri("processed")
    argv = [sys.executable, "-m", "jobs.cli", "ingest", "--input", splits["train"], "--format", "json",
            "--image-root", raw, "--output", out, "--image-size", "32", "--rows-per-unit", "4",
            "--num-workers", "1", "--quiet", "--address", ray.get_runtime_context().gcs_address]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    markers = storage.join(out, "_state", "a")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(storage.list_files(markers, ".json")) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not storage.exists(storage.join(out, "stats.json")), (
        "the ingest finished before it was interrupted"
    )
    done_before = len(storage.list_files(markers, ".json"))
    assert 3 <= done_before < 15

    stats = run_ingest(IngestConfig(input=splits["train"], format="json", image_root=raw, output=out,
                                    image_size=32, rows_per_unit=4))  # fmt: skip
    assert stats["units"] == 15 and stats["units_processed_this_run"] <= 15 - done_before + 1
    data = check_output(out, stats, 32)
    assert sorted(data.column("key").to_pylist()) == [f"train-{i:06d}" for i in range(60)]

    # Lose one unit's shards and commit marker (e.g. a crash in the write stage): a re-run
    # rebuilds exactly that unit, from its input again since staging is gone.
    for f in storage.list_files(storage.join(out, "data")):
        if "train-00003" in f:
            storage.pyarrow_fs(f)[0].delete_file(storage.pyarrow_fs(f)[1])
    storage.pyarrow_fs(out)[0].delete_file(
        storage.pyarrow_fs(storage.join(out, "_state", "c", "train-00003.json"))[1]
    )
    again = run_ingest(IngestConfig(input=splits["train"], format="json", image_root=raw, output=out,
                                    image_size=32, rows_per_unit=4))  # fmt: skip
    assert again["units_processed_this_run"] == 1
    assert (again["read"], again["written"], again["rejected"]) == (
        stats["read"],
        stats["written"],
        stats["rejected"],
    )
    assert sorted(check_output(out, again, 32).column("key").to_pylist()) == [
        f"train-{i:06d}" for i in range(60)
    ]


def test_every_task_annotation_format_s3_to_s3(ray_session, s3_bucket):
    """The official files of every finetuning task, unchanged, in one ingest (formats are told
    apart per entry): each format's rows and columns arrive, counts balance."""
    from tests.unit.test_data_formats import TASK_FILES, write_images, write_task_file

    root = s3_bucket.uri("tasks")
    write_images(root)
    for name in TASK_FILES:
        write_task_file(storage.join(root, "annotations"), name)
    out = s3_bucket.uri("processed")
    cfg = IngestConfig(input=storage.join(root, "annotations"), format="json", image_root=root, output=out,
                       image_size=32, dedupe=False, splits=["train", "restval"], rows_per_unit=1)  # fmt: skip
    stats = run_ingest(cfg)
    assert (stats["read"], stats["written"], stats["rejected"], stats["skipped_by_split"]) == (14, 13, 1, 1)
    assert stats["rejected_by_reason"]["too_small"] == 1  # NLVR2's pair with a tiny right image
    rows = {r["key"]: r for r in check_output(out, stats, 32).to_pylist()}
    assert rows["101"]["raw_answers"][:3] == ["Red", "red", "red"] and rows["102"]["dataset"] == "vg"
    assert {k for k in rows if "#" in k and k[0].isdigit()} == {"1#0", "1#1", "2#0"}  # Karpathy
    assert sum(k.startswith("retrieval_test-") for k in rows) == 3
    assert rows["7"]["bbox"] == [16, 8, 32, 16] and (rows["7"]["orig_width"], rows["7"]["orig_height"]) == (
        128,
        64,
    )
    assert len(rows["dev-1"]["images"]) == 2 and rows["dev-1"]["label"] == "True"
    assert sorted(r["label"] for k, r in rows.items() if k.startswith("ve_test-")) == [
        "entailment",
        "neutral",
    ]
    assert all(r["images"] is None for k, r in rows.items() if k != "dev-1")


@pytest.fixture
def keep_root_logging():
    """The CLI's logging.basicConfig binds a handler to pytest's captured stderr: remove it after."""
    import logging

    saved = logging.root.handlers[:]
    yield
    logging.root.handlers[:] = saved


def test_cli_exit_status_says_an_input_was_unreadable_and_refuses_other_settings(
    ray_session, s3_bucket, capsys, keep_root_logging
):
    from jobs.cli import main

    img = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 0, 0)).save(img, format="JPEG")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"jpg": [img.getvalue()], "caption": ["a red square"]}), sink)
    storage.write_bytes(s3_bucket.uri("raw", "good.parquet"), sink.getvalue().to_pybytes())
    storage.write_bytes(s3_bucket.uri("raw", "broken.parquet"), b"not parquet at all")
    out = s3_bucket.uri("out")
    argv = ["ingest", "--input", s3_bucket.uri("raw"), "--format", "parquet", "--output", out, "--quiet"]
    assert main([*argv, "--image-size", "32"]) == 3
    stats = json.loads(storage.read_text(storage.join(out, "stats.json")))
    assert (stats["read"], stats["written"], stats["rejected_by_reason"]["bad_shard"]) == (2, 1, 1)
    assert "could not be read" in capsys.readouterr().err
    assert main([*argv, "--image-size", "48"]) == 2
    assert "image_size: 32 there, 48 now" in capsys.readouterr().err
    assert main([*argv, "--image-size", "48", "--overwrite"]) == 3
