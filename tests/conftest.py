"""Shared test harness: one local Ray instance per session, a real S3 API (moto's server, behind
the storage fault injector of `tests/faults.py`, faults off unless a test switches them on).

Markers: `unit` (no Ray, fast), `integration` (Ray and/or S3), `e2e` (the demo path).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gloo import free_port

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the server did not listen on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 app behind the fault injector (`tests/faults.py`), in a process of its own on a
    free loopback port, faults off. Its endpoint and fake credentials go into the environment (as
    boto3, s3fs and our storage helper read them) before Ray starts, so Ray workers inherit them
    and see faults whenever a test switches them on (`s3_faults`). Stopped by pid at session end."""
    from tests import faults

    try:
        import moto.moto_server.werkzeug_app  # noqa: F401
    except ImportError:
        pytest.fail("moto's server is not installed: install the test extra (`pip install -e '.[test]'`)")
    port = free_port()
    proc = faults.spawn(port)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        os.environ.update(S3_ENV)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        faults.stop(proc)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class S3Bucket:
    """One fresh bucket on the moto server, with ready handles."""

    name: str
    endpoint: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *[p.strip("/") for p in parts]]).rstrip("/")

    @property
    def pyarrow_fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint.split("://", 1)[1],
            scheme="http",
            access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
            secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region=S3_ENV["AWS_DEFAULT_REGION"],
        )

    @property
    def s3fs(self):
        import s3fs

        return s3fs.S3FileSystem(
            key=S3_ENV["AWS_ACCESS_KEY_ID"],
            secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": self.endpoint},
            skip_instance_cache=True,
        )


_FAULT_COUNTS = pytest.StashKey[list]()


@pytest.fixture
def s3_faults(s3_endpoint: str, request: pytest.FixtureRequest) -> Iterator:
    """The session S3 endpoint's fault switch (`tests.faults.S3Faults`): `every(n, kinds=...)`,
    `first_attempts(k)`, `off()`, a context manager, `.injected`. Counts start at zero for the
    test; faults are off again after it, and what it injected is printed (and listed in the
    terminal summary)."""
    from tests.faults import S3Faults

    faults = S3Faults(s3_endpoint).off().reset()
    yield faults
    injected = faults.off().injected
    print(f"\nstorage faults injected by {request.node.name}: {injected}")
    request.config.stash.setdefault(_FAULT_COUNTS, []).append((request.node.nodeid, injected))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = config.stash.get(_FAULT_COUNTS, [])
    if rows:
        terminalreporter.section("storage faults injected")
        for nodeid, injected in rows:
            kinds = ", ".join(f"{k} {v}" for k, v in injected.items() if k != "total")
            terminalreporter.write_line(f"{nodeid}: {injected['total']} ({kinds})")


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> S3Bucket:
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return S3Bucket(name=name, endpoint=s3_endpoint)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str, gcs_endpoint: str) -> Iterator[None]:
    """One local Ray instance for the whole session: dashboard off, progress bars off, quiet,
    and more logical CPUs than cores so a 2-worker TorchTrainer plus Ray Data never starve.
    Depends on the S3 server and the GCS emulator so workers inherit their endpoints and
    credentials."""
    import ray

    from pipelines.cluster import init_ray, quiet_ray_data

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    init_ray("local", num_cpus=8, quiet=True)
    quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


# ---- GCS: a gcp-storage-emulator server ---------------------------------------------------------
@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """gcp-storage-emulator (in memory) on a free loopback port; STORAGE_EMULATOR_HOST (read by the
    storage helper for pyarrow and gcsfs) points at it before Ray starts, so workers inherit it.
    Stopped by pid at session end."""
    emulator = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent)) or shutil.which(
        "gcp-storage-emulator"
    )
    if emulator is None:
        pytest.fail("gcp-storage-emulator not found: install the test extra (`pip install -e '.[test]'`)")
    port = free_port()
    proc = subprocess.Popen(
        [emulator, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        _wait_for_port(port, proc)
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


@dataclass
class GcsBucket:
    """One fresh bucket on the GCS emulator."""

    name: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"gs://{self.name}", *[p.strip("/") for p in parts]]).rstrip("/")


@pytest.fixture
def gcs_bucket(gcs_endpoint: str) -> GcsBucket:
    from pipelines import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.gcs_pyarrow_fs().create_dir(name)  # a bucket, at the top level
    return GcsBucket(name=name)
