"""gs:// for real: the storage helper, an ingest and a checkpointed training run against the GCS
emulator (gcp-storage-emulator, started by the `gcs_endpoint` session fixture)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.data.ingest import IngestConfig, run_ingest
from pipelines.data.records import DATA_SCHEMA
from pipelines.synth.world import render_corpus
from tests.integration.test_pretrain import tiny_job

pytestmark = pytest.mark.integration


def test_storage_helper_on_gcs_through_pyarrow_and_fsspec(gcs_bucket) -> None:
    uri = gcs_bucket.uri("dir", "sub", "obj.txt")
    storage.write_text(uri, "via emulator")
    storage.write_bytes(gcs_bucket.uri("dir", "b.bin"), b"\x01\x02")
    assert storage.read_text(uri) == "via emulator" and storage.exists(gcs_bucket.uri("dir"))
    assert storage.list_files(gcs_bucket.uri()) == [gcs_bucket.uri("dir", "b.bin"), uri]
    fs, path = storage.fsspec_fs(uri)
    assert fs.cat(path) == b"via emulator"
    # A folder that is only a prefix of its objects (no marker object) deletes cleanly.
    storage.delete_dir(gcs_bucket.uri("dir"))
    assert storage.list_files(gcs_bucket.uri()) == [] and not storage.exists(uri)


def test_ingest_then_checkpointed_training_on_gcs(ray_session, gcs_bucket) -> None:
    from pipelines.train.launch import run_pretraining

    raw = render_corpus(gcs_bucket.uri("raw"), 40, fmt="parquet", seed=8, image_size=64,
                        split_fractions=(1.0, 0.0, 0.0))  # fmt: skip
    out = gcs_bucket.uri("processed")
    stats = run_ingest(IngestConfig(input=raw["train"], format="parquet", output=out, image_size=64))
    assert (stats["read"], stats["written"]) == (40, 40)
    shards = storage.list_files(storage.join(out, "data"), ".parquet")
    table = pa.concat_tables([pq.read_table(pa.py_buffer(storage.read_bytes(f))) for f in shards])
    assert table.schema.equals(DATA_SCHEMA) and table.num_rows == 40

    # Ray Train writes through RunConfig(storage_filesystem=<pyarrow GcsFileSystem>), the loop's
    # rank 0 through the storage helper: both must reach the emulator.
    job = tiny_job(out, gcs_bucket.uri("runs"), "gcs-run",
                   **{"run.max_steps": 2, "run.checkpoint_every": 2, "scaling.num_workers": 1})  # fmt: skip
    result = run_pretraining(job)
    assert result.error is None
    run_uri = gcs_bucket.uri("runs", "gcs-run")
    # Listed recursively: the emulator lists no implicit folders in a non-recursive listing.
    files = [f[len(run_uri) + 1 :] for f in storage.list_files(run_uri)]
    assert {f.split("/")[0] for f in files if f.startswith("checkpoint_") and "/" in f} == {
        "checkpoint_00000002"
    }
    assert (
        "checkpoint_00000002/train_state.json" in files and "checkpoint_00000002/model.safetensors" in files
    )
    final = storage.list_files(storage.join(run_uri, "final"))
    assert any(f.endswith(".safetensors") for f in final) and any(f.endswith("config.json") for f in final)
