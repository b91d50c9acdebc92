"""Peak memory of the ingest *driver* on URL lists of growing length: it must not grow with the list.

For each size, a parquet URL list (LAION/img2dataset columns: url, caption, key, status) is
written in row groups of `--rows-per-unit` rows. Most rows are marked as already failed
(img2dataset's `status`), so the workers reject them without a download; one row in
`--fetch-every` points at a loopback HTTP server (run by this script) serving a small JPEG, so
the download path runs too. The ingest runs in a fresh Python process (its own local Ray
instance); a thread there samples the process's RSS every 50 ms. Reported: RSS after Ray
started (baseline), peak RSS during `run_ingest`, and the growth.

    .venv/bin/python -m benchmarks.driver_memory --rows 1000000 10000000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq


def write_url_list(path: str, rows: int, rows_per_group: int, fetch_every: int, base_url: str) -> None:
    """`rows` rows, written a row group at a time (this process never holds the list either)."""
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string())])  # fmt: skip
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, rows_per_group):
            idx = range(start, min(rows, start + rows_per_group))
            fetch = [i % fetch_every == 0 for i in idx]
            writer.write_table(
                pa.table(
                    {
                        "url": [f"{base_url}/img.jpg?i={i}" if f else f"http://example.invalid/{i}.jpg"
                                for i, f in zip(idx, fetch)],
                        "caption": [f"a photo of thing number {i} on a table" for i in idx],
                        "key": [f"{i:010d}" for i in idx],
                        "status": ["success" if f else "failed_to_download" for f in fetch],
                    },
                    schema=schema,
                )
            )  # fmt: skip


def measure(list_path: str, out: str, rows_per_unit: int, workers: int) -> dict:
    """Runs in the child process: the driver under test."""
    import psutil

    from pipelines.cluster import init_ray, quiet_ray_data
    from pipelines.data.download import DownloadConfig
    from pipelines.data.ingest import IngestConfig, run_ingest

    proc = psutil.Process()
    init_ray("local", num_cpus=workers, quiet=True)
    quiet_ray_data()
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    stats = run_ingest(
        IngestConfig(
            input=list_path,
            format="urls",
            output=out,
            image_size=64,
            min_image_size=16,
            rows_per_unit=rows_per_unit,
            num_workers=workers,
            download=DownloadConfig(timeout_s=10, retries=0, threads=16),
        )  # fmt: skip
    )
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {
        "rows": stats["read"],
        "units": stats["units"],
        "written": stats["written"],
        "rejected": stats["rejected"],
        "downloads": stats.get("downloads", {}),
        "baseline_rss_mib": round(baseline / 2**20, 1),
        "peak_rss_mib": round(peak[0] / 2**20, 1),
        "growth_mib": round((peak[0] - baseline) / 2**20, 1),
        "elapsed_s": round(elapsed, 1),
    }


class _Image(BaseHTTPRequestHandler):
    body = b""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--rows-per-unit", type=int, default=20_000)
    p.add_argument("--fetch-every", type=int, default=1000, help="one row in N is downloaded")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--_child", nargs=2, metavar=("LIST", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print("RESULT " + json.dumps(measure(*args._child, args.rows_per_unit, args.workers)), flush=True)
        return

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 72), (30, 140, 200)).save(buf, format="JPEG")
    _Image.body = buf.getvalue()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Image)
    server.request_queue_size = 128
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    results = []
    try:
        for rows in args.rows:
            with tempfile.TemporaryDirectory(prefix="driver_memory_") as tmp:
                path = os.path.join(tmp, "urls.parquet")
                t = time.perf_counter()
                write_url_list(path, rows, args.rows_per_unit, args.fetch_every, base)
                print(f"{rows:,} rows: list written ({os.path.getsize(path) / 2**20:.0f} MiB, "
                      f"{time.perf_counter() - t:.0f}s); ingesting…", flush=True)  # fmt: skip
                cmd = [sys.executable, "-m", "benchmarks.driver_memory", "--rows-per-unit",
                       str(args.rows_per_unit), "--workers", str(args.workers), "--_child", path,
                       os.path.join(tmp, "out")]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"driver process failed:\n{done.stderr[-4000:]}")
                results.append(json.loads(line[len("RESULT ") :]))
                print(json.dumps(results[-1]), flush=True)
    finally:
        server.shutdown()
    print("\n| rows | units | downloads ok | driver RSS after Ray start | driver peak RSS | growth | time |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['units']} | {r['downloads'].get('ok', 0):,} | {r['baseline_rss_mib']} MiB "
              f"| {r['peak_rss_mib']} MiB | {r['growth_mib']} MiB | {r['elapsed_s']} s |")  # fmt: skip


if __name__ == "__main__":
    main()
