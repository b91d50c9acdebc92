"""The harness's own tests: Ray starts and runs a task; S3 objects round-trip through both clients."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_ray_runs_tasks_with_enough_cpus(ray_session):
    import ray

    @ray.remote(num_cpus=1)
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(6)]) == [0, 1, 4, 9, 16, 25]
    # Enough logical CPUs that 2 training workers + Ray Data tasks fit together.
    assert ray.cluster_resources()["CPU"] >= 4


def test_ray_workers_see_s3_endpoint(ray_session, s3_endpoint):
    import os

    import ray

    @ray.remote
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray.get(endpoint.remote()) == s3_endpoint


def test_s3_pyarrow_write_reads_back_through_s3fs(s3_bucket):
    payload = b"mplug \x00\xff bytes"
    with s3_bucket.pyarrow_fs.open_output_stream(f"{s3_bucket.name}/a/b.bin") as f:
        f.write(payload)
    with s3_bucket.s3fs.open(f"{s3_bucket.name}/a/b.bin", "rb") as f:
        assert f.read() == payload


def test_s3_s3fs_write_reads_back_through_pyarrow(s3_bucket):
    s3_bucket.s3fs.pipe(f"{s3_bucket.name}/x.txt", b"hello")
    with s3_bucket.pyarrow_fs.open_input_stream(f"{s3_bucket.name}/x.txt") as f:
        assert f.read() == b"hello"


def test_buckets_are_isolated_per_test(s3_bucket):
    assert s3_bucket.s3fs.ls(s3_bucket.name) == []
