"""The bad-input battery of issue #26, ingest side, s3:// → s3:// on the shared Ray instance:
annotation paths that escape the image root, file:// and loopback URLs, an oversized tar member,
a gigantic JSON line and one nested past the parser's limit. Each is a counted reject with its
reason (or a clear error), and every other row of the same run is written: nothing else is lost,
nothing outside the root is read;
the annotation file's rejects are the same with 5% of S3 requests failing (the injector's counts
are printed; faults cost each test ~10 s of retry backoff, so one test carries them).
And storage keys given in an ingest config never reach a Ray runtime environment.

(The model-loading side, a pickle that would run code and TorchScript without opt-in, is in
tests/unit/test_init_sources.py.)"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import storage
from pipelines.data.download import DownloadConfig
from pipelines.data.ingest import IngestConfig, run_ingest
from tests.integration.test_download import Server, jpeg

pytestmark = pytest.mark.integration


def image(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, format="JPEG")
    return buf.getvalue()


def rejects(out: str) -> dict[str, tuple[str, str]]:
    files = storage.list_files(storage.join(out, "rejects"), ".parquet")
    rows = [r for f in files for r in pq.read_table(pa.py_buffer(storage.read_bytes(f))).to_pylist()]
    return {r["key"]: (r["reason"], r["detail"]) for r in rows}


def written_keys(out: str) -> list[str]:
    files = storage.list_files(storage.join(out, "data"), ".parquet")
    return sorted(
        k for f in files for k in pq.read_table(pa.py_buffer(storage.read_bytes(f))).column("key").to_pylist()
    )


def test_annotation_paths_escaping_the_root_and_a_gigantic_json_line(
    ray_session, s3_bucket, s3_faults, tmp_path
) -> None:
    root = s3_bucket.uri("coco", "images")
    for i in range(3):
        storage.write_bytes(storage.join(root, f"ok-{i}.jpg"), image((40 * i, 80, 120)))
    # What the escapes would reach if they were followed: a file beside the root, a local file.
    storage.write_bytes(s3_bucket.uri("coco", "secret.jpg"), image((255, 0, 0)))
    (tmp_path / "local.jpg").write_bytes(image((0, 255, 0)))
    other = s3_bucket.uri("elsewhere", "x.jpg")
    storage.write_bytes(other, image((0, 0, 255)))
    entries = [
        {"key": "ok-0", "image": "ok-0.jpg", "caption": "a first good one"},
        {"key": "up", "image": "../secret.jpg", "caption": "climbs out"},
        {"key": "deep", "image": "a/b/../../../secret.jpg", "caption": "climbs out further down"},
        {"key": "abs", "image": str(tmp_path / "local.jpg"), "caption": "an absolute path"},
        {"key": "uri", "image": other, "caption": "another bucket"},
        {"key": "file", "image": f"file://{tmp_path / 'local.jpg'}", "caption": "a file uri"},
        {"key": "ok-1", "image": "ok-1.jpg", "caption": "a second good one"},
        {"key": "huge", "image": "ok-2.jpg", "caption": "x " * 600_000},  # a 1.2 MB line
        {"key": "ok-2", "image": "sub/../ok-2.jpg", "caption": "inside after all"},
    ]
    lines = [json.dumps(e) for e in entries]
    lines.insert(4, '{"key": "nest", "image": "ok-0.jpg", "caption": ' + "[" * 20_000 + "]" * 20_000 + "}")
    storage.write_text(s3_bucket.uri("ann", "train.jsonl"), "\n".join(lines) + "\n")
    out = s3_bucket.uri("out")
    with s3_faults.every(20):  # 5% of S3 requests fail: the same rejects, and only those
        stats = run_ingest(IngestConfig(input=s3_bucket.uri("ann"), format="json", image_root=root, output=out,
                                        image_size=32, rows_per_unit=3, max_annotation_bytes=64 << 10))  # fmt: skip
    assert s3_faults.injected["total"] > 0
    assert stats["read"] == stats["written"] + stats["rejected"] == len(lines)
    assert written_keys(out) == ["ok-0", "ok-1", "ok-2"]
    got = rejects(out)
    assert {k: reason for k, (reason, _) in got.items() if reason == "path_outside_root"} == dict.fromkeys(
        ["up", "deep", "abs", "uri", "file"], "path_outside_root"
    )
    assert "'../secret.jpg' climbs out of image_root" in got["up"][1]
    (huge_key,) = [k for k, (reason, _) in got.items() if reason == "too_large"]
    assert "longer than max_annotation_bytes=65536" in got[huge_key][1]
    (nested,) = [detail for reason, detail in got.values() if reason == "bad_record"]  # 40 KB of brackets
    assert "nested deeper than the parser allows" in nested
    assert stats["rejected_by_reason"]["path_outside_root"] == 5 and stats["rejected"] == 7

    # The same annotations, trusted: every image is read where the annotation says (pyarrow
    # resolves ".." in an S3 key too, so on S3 the escapes are real; this user opted in).
    trusted = run_ingest(IngestConfig(input=s3_bucket.uri("ann"), format="json", image_root=root,
                                      output=s3_bucket.uri("trusted"), image_size=32,
                                      max_annotation_bytes=64 << 10, allow_image_paths_outside_root=True))  # fmt: skip
    assert trusted["rejected_by_reason"]["path_outside_root"] == 0 and trusted["rejected"] == 2
    assert written_keys(s3_bucket.uri("trusted")) == [
        "abs",
        "deep",
        "file",
        "ok-0",
        "ok-1",
        "ok-2",
        "up",
        "uri",
    ]


def test_an_oversized_tar_member_is_one_reject_and_the_tar_goes_on(ray_session, s3_bucket) -> None:
    buf = io.BytesIO()
    samples = [
        ("s-0", image((10, 10, 10))),
        ("s-1", b"\xff\xd8" + b"\0" * 2_000_000),
        ("s-2", image((90, 9, 9))),
    ]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data in samples:
            for ext, body in (("jpg", data), ("txt", f"caption of {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    storage.write_bytes(s3_bucket.uri("wds", "shard-0.tar"), buf.getvalue())
    out = s3_bucket.uri("out")
    stats = run_ingest(IngestConfig(input=s3_bucket.uri("wds"), format="webdataset", output=out,
                                    image_size=32, max_image_bytes=1_000_000))  # fmt: skip
    assert (stats["read"], stats["written"], stats["rejected_by_reason"]["too_large"]) == (3, 2, 1)
    assert written_keys(out) == ["s-0", "s-2"]
    reason, detail = rejects(out)["s-1"]
    assert (
        reason == "too_large" and "'s-1.jpg' is 2000002 bytes > max_image_bytes=1000000 (not read)" in detail
    )


@pytest.fixture
def keep_root_logging():
    """The CLI's logging.basicConfig binds a handler to pytest's captured stderr: remove it after."""
    saved = logging.root.handlers[:]
    yield
    logging.root.handlers[:] = saved


def test_file_and_loopback_urls_are_refused_unless_private_urls_are_allowed(
    ray_session, s3_bucket, tmp_path, keep_root_logging
) -> None:
    from jobs.cli import main

    # (No cloud-metadata URL here: the opted-in run would reach it. tests/unit/test_untrusted_input.py
    # shows 169.254.169.254 refused without a connection.)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "ok.jpg").write_bytes(jpeg())
    (tmp_path / "secret.jpg").write_bytes(jpeg((40, 40)))
    with Server(tmp_path / "site") as server:
        rows = [
            {"url": f"{server.base}/files/ok.jpg", "caption": "served on loopback", "key": "loopback"},
            {"url": f"http://localhost:{server.base.rsplit(':', 1)[1]}/files/ok.jpg", "caption": "by name", "key": "localhost"},
            {"url": f"file://{tmp_path / 'secret.jpg'}", "caption": "a local file", "key": "file"},
            {"url": "ftp://example.com/x.jpg", "caption": "not http", "key": "ftp"},
            {"url": "data:image/jpeg;base64,/9j/4AAQ", "caption": "inline data", "key": "data"},
            {"url": "", "caption": "no url at all", "key": "empty"},
        ]  # fmt: skip
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        storage.write_bytes(s3_bucket.uri("urls", "list.parquet"), sink.getvalue().to_pybytes())
        fast = DownloadConfig(timeout_s=5.0, retries=0, threads=4)
        stats = run_ingest(IngestConfig(input=s3_bucket.uri("urls"), format="urls", output=s3_bucket.uri("refused"),
                                        image_size=32, download=fast))  # fmt: skip
        assert stats["read"] == stats["written"] + stats["rejected"] == len(rows) and stats["written"] == 0
        got = rejects(s3_bucket.uri("refused"))
        assert {k: reason for k, (reason, _) in got.items()} == {
            "loopback": "url_not_allowed", "localhost": "url_not_allowed", "file": "url_not_allowed",
            "ftp": "url_not_allowed", "data": "url_not_allowed", "empty": "bad_record",
        }  # fmt: skip
        assert got["loopback"][1].startswith("private_address") and got["file"][1].startswith("bad_scheme")
        assert stats["downloads"] == {"private_address": 2, "bad_scheme": 3}
        assert sum(server.hits.values()) == 0  # refused before any connection

        # Opted in (the local test server is why the flag exists): loopback is fetched, the rest
        # stays refused, and the exit status says nothing was unreadable.
        out = s3_bucket.uri("allowed")
        argv = ["ingest", "--input", s3_bucket.uri("urls"), "--format", "urls", "--output", out,
                "--image-size", "32", "--allow-private-urls", "--quiet"]  # fmt: skip
        assert main(argv) == 0
        allowed = json.loads(storage.read_text(storage.join(out, "stats.json")))
        assert written_keys(out) == ["localhost", "loopback"]
        assert allowed["rejected_by_reason"]["url_not_allowed"] == 3 and allowed["read"] == len(rows)
        assert server.hits["/files/ok.jpg"] == 2


def test_yaml_credentials_stay_out_of_ray_runtime_environments(
    ray_session, s3_bucket, s3_endpoint, monkeypatch, caplog
) -> None:
    """Keys given in an ingest config serve the driver only: no task's runtime environment (what
    the dashboard and `ray job list` show) holds them, while the non-secret endpoint does; the
    workers, started without those keys, use their own (here the session's) and say so."""
    import time
    import uuid

    import ray
    from ray.util.state import list_tasks

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, os.environ[name])  # run_ingest sets them here: restored after
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"jpg": [image((5, 100, 50))], "caption": ["a green square"]}), sink)
    storage.write_bytes(s3_bucket.uri("raw", "one.parquet"), sink.getvalue().to_pybytes())
    key_id, secret = f"yaml-key-{uuid.uuid4().hex}", f"yaml-secret-{uuid.uuid4().hex}"
    cfg = IngestConfig(input=s3_bucket.uri("raw"), format="parquet", output=s3_bucket.uri("out"), image_size=32,
                       s3_endpoint_url=s3_endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipelines.data.ingest"):
        assert run_ingest(cfg)["written"] == 1
    assert "are used by this driver only" in caplog.text and key_id not in caplog.text

    job = ray.get_runtime_context().get_job_id()

    def runtime_envs() -> list[str]:
        tasks = list_tasks(
            filters=[("job_id", "=", job)], detail=True, limit=10_000, raise_on_missing_output=False
        )
        return [json.dumps(t.runtime_env_info, default=str) for t in tasks if t.runtime_env_info]

    deadline = time.monotonic() + 120  # task events reach the State API a little after the tasks end
    while not any(s3_endpoint in env for env in runtime_envs()):
        assert time.monotonic() < deadline, "no ingest task with the config's endpoint in its runtime_env"
        time.sleep(1)
    assert not any(secret in env or key_id in env for env in runtime_envs())
