"""Object storage that fails (issue #26): the fault injector in front of the moto server, ingest
with ~5% of S3 requests failing equals the fault-free run, and faults that outlast the clients'
retries become counted `storage_error` rejects while the rest of the ingest finishes.

Every test prints what the injector did (and the session summary lists it); each asserts it
injected something, so none passes without having met a fault."""

from __future__ import annotations

import json

import boto3
import botocore.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.data.ingest import IngestConfig, run_ingest
from pipelines.synth.world import render_corpus
from tests.faults import KINDS

pytestmark = pytest.mark.integration


def test_each_client_retries_through_every_fault_kind(s3_bucket, s3_faults) -> None:
    """pyarrow (the storage helper), s3fs and boto3, configured from the one retry knob, each meet
    503 SlowDown, 500 InternalError and a reset connection, and read the object intact."""
    payload = bytes(range(256)) * 64
    tiny = b"{}"  # smaller than an S3 error body: the read the AWS SDK misreports
    storage.write_bytes(s3_bucket.uri("obj.bin"), payload)
    storage.write_bytes(s3_bucket.uri("tiny.json"), tiny)
    client = boto3.client(
        "s3", config=botocore.config.Config(**storage.retry_settings().botocore_config_kwargs())
    )
    fs, _ = storage.fsspec_fs(s3_bucket.uri())
    before = s3_faults.requests  # the writes above met no fault
    with s3_faults.every(2):  # every other request fails, the three kinds in turn
        for _ in range(2):
            assert storage.read_bytes(s3_bucket.uri("obj.bin")) == payload
            assert storage.read_text(s3_bucket.uri("tiny.json")) == "{}"
            fs.invalidate_cache()
            assert fs.cat_file(f"{s3_bucket.name}/obj.bin") == payload
            assert client.get_object(Bucket=s3_bucket.name, Key="tiny.json")["Body"].read() == tiny
        assert storage.list_files(s3_bucket.uri()) == [s3_bucket.uri("obj.bin"), s3_bucket.uri("tiny.json")]
    state = s3_faults.state()
    assert all(state["injected"][kind] > 0 for kind in KINDS), state
    assert state["injected"]["total"] == (state["requests"] - before) // 2
    # Off means off: the counts stay, nothing more is injected.
    storage.read_bytes(s3_bucket.uri("obj.bin"))
    assert s3_faults.injected == state["injected"]
    # first_attempts(k): each distinct request (here the read's HEAD and GET) fails k times, then passes.
    with s3_faults.first_attempts(2, kinds=("503",)):
        assert storage.read_bytes(s3_bucket.uri("obj.bin")) == payload
    assert s3_faults.injected["503"] == state["injected"]["503"] + 4


def test_one_filesystem_keeps_retrying_past_the_aws_retry_quota(s3_bucket, s3_faults) -> None:
    """A run or a Tune search keeps one pyarrow filesystem for hours. pyarrow's standard AWS
    strategy spends a retry quota it never refills (~100 retries a filesystem, then none: a Tune
    search in CI lost its syncs that way); the strategy we give it must not run dry."""
    fs, root = storage.pyarrow_fs(s3_bucket.uri())
    with s3_faults.every(3):  # 1 request in 3 fails: 3 requests a write → ~1 fault a write
        for i in range(150):
            with fs.open_output_stream(f"{root}/quota/{i}") as out:
                out.write(b"%d" % i)
    assert s3_faults.injected["total"] > 120, s3_faults.injected  # past the ~100 a quota allows
    assert len(storage.list_files(s3_bucket.uri("quota"))) == 150


def test_streams_fetch_megabytes_a_request_and_read_the_same_bytes_through_faults(
    s3_bucket, s3_faults, tmp_path
) -> None:
    """A WebDataset tar walked member by member (tarfile reads 10 KiB at a time) costs a request
    per `STREAM_READ_BYTES`, not one per read, and so does a checkpoint folder's download; with
    every other request failing, both read the same bytes (the buffer sits above the retries)."""
    import io
    import tarfile

    members = {f"{i:05d}.jpg": bytes([i % 251]) * (40 << 10) for i in range(150)}  # ~6 MiB
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(s3_bucket.uri("shard.tar"), buf.getvalue())
    weights = bytes(range(256)) * (40 << 10)  # 10 MiB
    storage.write_bytes(s3_bucket.uri("ckpt", "model.safetensors"), weights)

    def walk() -> dict[str, bytes]:
        with (
            storage.open_input_stream(s3_bucket.uri("shard.tar")) as raw,
            tarfile.open(fileobj=raw, mode="r|*") as tar,
        ):
            return {m.name: tar.extractfile(m).read() for m in tar}

    before = s3_faults.requests
    assert walk() == members
    gets = s3_faults.requests - before
    assert gets <= -(-len(buf.getvalue()) // storage.STREAM_READ_BYTES) + 1, gets  # was 1 per 10 KiB
    before = s3_faults.requests
    local = storage.download_dir(s3_bucket.uri("ckpt"), str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == weights and local
    assert s3_faults.requests - before <= 2 + -(-len(weights) // storage.STREAM_READ_BYTES), (
        s3_faults.requests
    )
    with s3_faults.every(2):
        assert walk() == members
        storage.download_dir(s3_bucket.uri("ckpt"), str(tmp_path / "again"))
        assert (tmp_path / "again" / "model.safetensors").read_bytes() == weights
    assert s3_faults.injected["total"] > 0


def _rows(out: str) -> list[dict]:
    files = storage.list_files(storage.join(out, "data"), ".parquet")
    table = pa.concat_tables([pq.read_table(pa.py_buffer(storage.read_bytes(f))) for f in files])
    return sorted(table.to_pylist(), key=lambda r: r["key"])


def _rejects(out: str) -> list[tuple[str, str]]:
    files = storage.list_files(storage.join(out, "rejects"), ".parquet")
    rows = [r for f in files for r in pq.read_table(pa.py_buffer(storage.read_bytes(f))).to_pylist()]
    return sorted((r["key"], r["reason"]) for r in rows)


def _split_shards(folder: str, parts: int) -> list[str]:
    """Cut the one img2dataset shard `render_corpus` wrote in `folder` into `parts` shards."""
    (only,) = storage.list_files(folder, ".parquet")
    table = pq.read_table(pa.py_buffer(storage.read_bytes(only)))
    storage.delete_file(only)
    size = -(-table.num_rows // parts)
    uris = []
    for i in range(parts):
        sink = pa.BufferOutputStream()
        pq.write_table(table.slice(i * size, size), sink)
        uris.append(storage.join(folder, f"part-{i:02d}.parquet"))
        storage.write_bytes(uris[-1], sink.getvalue().to_pybytes())
    return uris


COUNTS = ("read", "written", "rejected", "rejected_by_reason", "bytes_read", "units")


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_ingest_with_5_percent_of_requests_failing_equals_the_fault_free_run(
    ray_session, s3_bucket, s3_faults, fmt: str
) -> None:
    raw = s3_bucket.uri("raw")
    splits = render_corpus(raw, 40, fmt=fmt, seed=11, image_size=48, corrupt_per_kind=1)
    if fmt == "parquet":
        _split_shards(splits["train"], 4)  # several units, read concurrently

    def ingest(out: str) -> dict:
        return run_ingest(IngestConfig(input=splits["train"], format=fmt, output=s3_bucket.uri(out),
                                       image_size=32, rows_per_shard=8, rows_per_unit=6,
                                       image_root=raw if fmt == "json" else None))  # fmt: skip

    clean = ingest("clean")
    with s3_faults.every(20):  # 5% of every request: reads, listings, writes, copies, deletes
        faulty = ingest("faulty")
    injected = s3_faults.injected
    print(f"{fmt}: {injected} faults in {s3_faults.requests} requests")
    assert injected["total"] > 0
    assert {k: faulty[k] for k in COUNTS} == {k: clean[k] for k in COUNTS}
    stats = json.loads(storage.read_text(s3_bucket.uri("faulty", "stats.json")))
    assert stats["read"] == stats["written"] + stats["rejected"] == clean["read"]
    rows = _rows(s3_bucket.uri("faulty"))
    assert rows == _rows(s3_bucket.uri("clean"))  # the same rows, byte for byte: none lost, none twice
    assert len({r["key"] for r in rows}) == len(rows) == clean["written"]
    assert _rejects(s3_bucket.uri("faulty")) == _rejects(s3_bucket.uri("clean"))


def test_faults_that_outlast_the_retries_are_counted_storage_error_rejects(
    ray_session, s3_bucket, s3_faults, monkeypatch
) -> None:
    """One parquet shard and one annotated image the store never serves: each is one
    `storage_error` reject naming its URI; every other row is written; the books balance."""
    # Two attempts, not ten: a permanent fault then costs one backoff, not a minute. The ingest
    # forwards the setting to its workers with its other storage settings.
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "2")
    raw = s3_bucket.uri("pq")
    shards = render_corpus(raw, 30, fmt="parquet", seed=12, image_size=48, split_fractions=(1.0, 0.0, 0.0))
    files = _split_shards(shards["train"], 3)
    broken = files[-1]
    per_file = {f: pq.read_metadata(pa.BufferReader(storage.read_bytes(f))).num_rows for f in files}
    # Reads of the shard's bytes fail for good (its size still answers: the failure is mid-read).
    s3_faults.every(1, match="^GET /" + broken.split("://", 1)[1] + "$")
    stats = run_ingest(IngestConfig(input=shards["train"], format="parquet", output=s3_bucket.uri("out1"),
                                    image_size=32, rows_per_shard=8))  # fmt: skip
    assert s3_faults.injected["total"] > 0
    assert stats["read"] == stats["written"] + stats["rejected"] == 30 - per_file[broken] + 1
    assert stats["rejected_by_reason"]["storage_error"] == 1 and stats["written"] == 30 - per_file[broken]
    assert _rejects(s3_bucket.uri("out1")) == [(broken, "storage_error")]

    raw = s3_bucket.uri("js")
    annotations = render_corpus(raw, 12, fmt="json", seed=13, image_size=48, split_fractions=(1.0, 0.0, 0.0))
    entries = json.loads(storage.read_text(annotations["train"]))
    lost = entries[3]
    s3_faults.every(1, match="/" + lost["image"].replace(".", "\\.") + "$")
    stats = run_ingest(IngestConfig(input=annotations["train"], format="json", image_root=raw,
                                    output=s3_bucket.uri("out2"), image_size=32, rows_per_unit=4))  # fmt: skip
    injected = s3_faults.off().injected
    print(f"faults injected in both ingests: {injected}")
    assert stats["read"] == stats["written"] + stats["rejected"] == 12
    assert (stats["written"], stats["rejected_by_reason"]["storage_error"]) == (11, 1)
    files = storage.list_files(s3_bucket.uri("out2", "rejects"), ".parquet")
    rejects = [r for f in files for r in pq.read_table(pa.py_buffer(storage.read_bytes(f))).to_pylist()]
    assert [(r["key"], r["reason"]) for r in rejects] == [(lost["key"], "storage_error")]
    assert storage.join(raw, lost["image"]) in rejects[0]["detail"]
