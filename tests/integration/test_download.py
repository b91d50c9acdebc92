"""The URL download stage against a loopback HTTP server: good images, 404s, slow responses,
truncated bodies, wrong content types, oversized and endless bodies, a flaky endpoint, redirects.
The server is on a loopback address, so every fetch here opts in with `allow_private_urls`
(what `--allow-private-urls` sets); without it the same URLs are refused (test_bad_input.py).

Every outcome is fixed by the server, not by timing, so the tests hold on a loaded machine: the
slow endpoint never answers while a client waits (it is released at shutdown), the flaky one
fails exactly its first request, and the listen backlog is deep enough that no connection is
dropped (a dropped SYN would cost the client its one retry)."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import storage
from pipelines.data.download import DownloadConfig, fetch, fetch_all
from pipelines.data.ingest import IngestConfig, run_ingest
from pipelines.synth.world import corrupt_kinds, render_corpus

pytestmark = pytest.mark.integration


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops connections when many arrive at once
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on /slow.jpg: writing to its closed socket fails, as it should


def jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


class Server:
    """ThreadingHTTPServer on 127.0.0.1:0: /files/* from `root`, plus misbehaving endpoints."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits: Counter = Counter()
        self.release = threading.Event()
        self.abandoned = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, body: bytes, ctype: str = "image/jpeg", length: int | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                if self.path.startswith("/files/"):
                    path = server.root / self.path[len("/files/") :]
                    if path.is_file():
                        self._send(path.read_bytes())
                    else:
                        self.send_error(404)
                elif self.path == "/slow.jpg":
                    server.release.wait()  # longer than any client timeout: always a timeout
                    self._send(jpeg())
                elif self.path == "/truncated.jpg":
                    body = jpeg()
                    self.close_connection = True
                    self._send(body[: len(body) // 3], length=len(body))
                elif self.path == "/page.html":
                    self._send(b"<html>nope</html>", ctype="text/html; charset=utf-8")
                elif self.path == "/huge.jpg":
                    self._send(b"\xff" * 300_000)
                elif self.path == "/flaky.jpg":
                    if server.hits[self.path] == 1:
                        self.send_error(503)
                    else:
                        self._send(jpeg())
                elif self.path == "/endless.jpg":  # chunked, no length: only a cap on reading stops it
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    block = b"\xff" * 65536
                    try:
                        for _ in range(1024):  # 64 MiB at most, should a client read on
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    except OSError:
                        server.abandoned.set()  # the client hung up
                elif self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_error(404)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "ok.jpg").write_bytes(jpeg())
    with Server(tmp_path / "site") as srv:
        yield srv


def test_every_url_gets_one_outcome(server: Server) -> None:
    # Generous timeout: only the slow endpoint, which never answers in time, may time out.
    cfg = DownloadConfig(
        timeout_s=20.0, retries=1, backoff_s=0.01, max_bytes=100_000, threads=8, allow_private_urls=True
    )
    names = ["/files/ok.jpg", "/files/missing.jpg", "/truncated.jpg", "/page.html", "/huge.jpg", "/flaky.jpg"]
    results = fetch_all([server.base + n for n in names], cfg)
    slow = fetch(server.base + "/slow.jpg", cfg.model_copy(update={"timeout_s": 0.3}))
    outcome = {n: r.outcome for n, r in zip(names, results)}
    assert outcome == {
        "/files/ok.jpg": "ok",
        "/files/missing.jpg": "http_404",
        "/truncated.jpg": "truncated",
        "/page.html": "bad_content_type",
        "/huge.jpg": "too_large",
        "/flaky.jpg": "ok",
    }
    assert slow.outcome == "timeout" and slow.reason == "download_error"
    assert "after 2 attempts" in slow.detail
    by_name = dict(zip(names, results))
    assert by_name["/files/ok.jpg"].data == (server.root / "ok.jpg").read_bytes()
    assert by_name["/huge.jpg"].reason == "too_large"
    # 404 and wrong content are final; timeouts, truncation and 503 are retried once.
    assert server.hits["/files/missing.jpg"] == 1 and server.hits["/page.html"] == 1
    assert (
        server.hits["/slow.jpg"] == 2
        and server.hits["/truncated.jpg"] == 2
        and server.hits["/flaky.jpg"] == 2
    )


def test_ingest_url_list_from_s3_records_each_outcome(ray_session, s3_bucket, server: Server, tmp_path: Path):
    site = server.root
    splits = render_corpus(str(site), 20, fmt="urls", seed=6, image_size=64, corrupt_per_kind=1,
                           url_base=server.base + "/files")  # fmt: skip
    expected = json.loads((site / "train_corrupt.json").read_text())
    assert sorted(expected.values()) == sorted(corrupt_kinds("urls").values())
    rows = pq.read_table(splits["train"]).to_pylist()
    rows += [
        {"url": server.base + "/slow.jpg", "caption": "slow", "key": "net-slow"},
        {"url": server.base + "/truncated.jpg", "caption": "cut", "key": "net-truncated"},
    ]
    expected.update({"net-slow": "download_error", "net-truncated": "download_error"})
    # The URL list lives on S3 (LAION-style column names); the images come over HTTP.
    laion = pa.Table.from_pylist([{"URL": r["url"], "TEXT": r["caption"], "key": r["key"]} for r in rows])
    sink = pa.BufferOutputStream()
    pq.write_table(laion, sink)
    storage.write_bytes(s3_bucket.uri("urls", "part-0.parquet"), sink.getvalue().to_pybytes())

    out = s3_bucket.uri("processed")
    cfg = IngestConfig(
        input=s3_bucket.uri("urls"), format="urls", output=out, image_size=48, rows_per_unit=8,
        # Loopback fetches answer well within 3 s even on a loaded machine; /slow.jpg never does.
        download=DownloadConfig(timeout_s=3.0, retries=1, backoff_s=0.01, threads=8, allow_private_urls=True),
    )  # fmt: skip
    stats = run_ingest(cfg)
    assert stats["read"] == len(rows) == stats["written"] + stats["rejected"]
    assert stats["written"] == 16
    files = storage.list_files(storage.join(out, "rejects"), ".parquet")
    rejects = pa.concat_tables(
        [pq.read_table(pa.py_buffer(storage.read_bytes(f))) for f in files]
    ).to_pylist()
    assert {r["key"]: r["reason"] for r in rejects} == expected
    details = {r["key"]: r["detail"] for r in rejects}
    assert details["net-slow"].startswith("timeout") and details["net-truncated"].startswith("truncated")
    assert details["train-corrupt-notfound-0"].startswith("http_404")
    # The one URL-less row never reaches the downloader; every other row has an outcome.
    assert sum(stats["downloads"].values()) == len(rows) - 1
    assert stats["downloads"]["http_404"] == 1 and stats["downloads"]["timeout"] == 1
    assert stats["downloads"]["ok"] == len(rows) - 1 - 3


def test_an_endless_body_is_abandoned_at_the_size_cap(server: Server) -> None:
    cfg = DownloadConfig(timeout_s=20.0, retries=0, max_bytes=200_000, allow_private_urls=True)
    result = fetch(server.base + "/endless.jpg", cfg)
    assert (result.outcome, result.reason, result.data) == ("too_large", "too_large", None)
    assert server.abandoned.wait(timeout=60), "the client read on past the cap"


def test_every_redirect_hop_is_checked(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat 127.0.0.1 as public and the rest of 127/8 as private: a redirect from the allowed
    server to 127.0.0.2 is refused at that hop, one to file:// by its scheme; a redirect to the
    same server is followed."""
    from pipelines.data import download

    monkeypatch.setattr(download, "is_public_address", lambda address: address == "127.0.0.1")
    cfg = DownloadConfig(timeout_s=20.0, retries=1, backoff_s=0.01)
    port = server.base.rsplit(":", 1)[1]
    ok = fetch(f"{server.base}/redirect?to={server.base}/files/ok.jpg", cfg)
    assert ok.outcome == "ok" and ok.data == (server.root / "ok.jpg").read_bytes()
    inner = fetch(f"{server.base}/redirect?to=http://127.0.0.2:{port}/files/ok.jpg", cfg)
    assert (inner.outcome, inner.reason) == ("private_address", "url_not_allowed")
    assert "127.0.0.2" in inner.detail
    local = fetch(f"{server.base}/redirect?to=file:///etc/hostname", cfg)
    assert (local.outcome, local.reason) == ("bad_scheme", "url_not_allowed")
    assert server.hits["/files/ok.jpg"] == 1  # the refused hops never reached a server
