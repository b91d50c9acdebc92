"""Requests and seconds to read objects from S3 the ways the pipeline reads them: a checkpoint
file copied to local disk (`storage.download_dir`) and a WebDataset tar walked member by member
(`tarfile` in stream mode, as ingest reads shards), with pyarrow's input stream unbuffered (one
ranged GET per read) and buffered (`storage.STREAM_READ_BYTES` a request).

An S3 endpoint of its own: moto behind `tests/faults.py` (faults off), whose request counter gives
the GETs. moto answers a ranged GET by reading the whole object, so its seconds grow with
requests × object size; a real S3 answers each in tens of milliseconds of latency: the request
count is the figure that carries over.

    .venv/bin/python -m benchmarks.stream_reads --mib 60 --tar-mib 8
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import pyarrow.fs as pafs

from tests import faults
from tests.gloo import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _tar_of(mib: int) -> bytes:
    """A WebDataset-style tar: samples of a 50 KiB .jpg-sized member and a caption."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(mib * 1024 // 50):
            for ext, payload in (("jpg", os.urandom(50 * 1024)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _measure(injector: faults.S3Faults, read) -> tuple[int, float]:
    before = injector.requests
    started = time.perf_counter()
    read()
    return injector.requests - before, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=60, help="size of the checkpoint file")
    parser.add_argument(
        "--tar-mib", type=int, default=8, help="size of the tar (unbuffered, moto's time grows as its square)"
    )
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    port = free_port()
    proc = faults.spawn(port)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        from pipelines import storage

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               access_key="bench", secret_key="bench", allow_bucket_creation=True)  # fmt: skip
        fs.create_dir("bench")
        with fs.open_output_stream("bench/ckpt/optimizer.pt") as f:
            f.write(os.urandom(args.mib << 20))
        with fs.open_output_stream("bench/shard.tar") as f:
            f.write(_tar_of(args.tar_mib))
        injector = faults.S3Faults(endpoint)

        def whole_unbuffered() -> None:
            with fs.open_input_stream("bench/ckpt/optimizer.pt") as src:
                src.read()

        def download_dir() -> None:
            with tempfile.TemporaryDirectory() as local:
                storage.download_dir("s3://bench/ckpt", local)

        def walk_tar(buffer_size: int):
            def walk() -> None:
                stream = storage.open_input_stream("s3://bench/shard.tar", buffer_size=buffer_size)
                with stream as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                    for member in tar:
                        tar.extractfile(member).read()

            return walk

        cases = [
            (f"{args.mib} MiB file, read() of an unbuffered stream (before)", whole_unbuffered),
            (f"{args.mib} MiB file, storage.download_dir ({storage.STREAM_READ_BYTES >> 20} MiB reads)", download_dir),
            (f"{args.tar_mib} MiB tar, members streamed, unbuffered (before)", walk_tar(0)),
            (f"{args.tar_mib} MiB tar, members streamed, {storage.STREAM_READ_BYTES >> 20} MiB buffer", walk_tar(storage.STREAM_READ_BYTES)),
        ]  # fmt: skip
        for name, read in cases:
            requests, seconds = _measure(injector, read)
            print(f"{name}: {requests} requests, {seconds:.2f} s", flush=True)
    finally:
        faults.stop(proc)


if __name__ == "__main__":
    main()
