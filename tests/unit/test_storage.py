"""The storage-URI helper on local paths and s3:// via the environment."""

from __future__ import annotations

import pytest

from pipelines import storage

pytestmark = pytest.mark.unit


def test_local_roundtrip_and_listing(tmp_path):
    root = f"file://{tmp_path}"
    storage.write_text(storage.join(root, "a", "x.json"), "{}")
    storage.write_bytes(storage.join(str(tmp_path), "b.bin"), b"\x01")
    assert storage.read_text(storage.join(root, "a", "x.json")) == "{}"
    assert storage.list_files(root, ".json") == [f"file://{tmp_path}/a/x.json"]
    assert storage.exists(str(tmp_path / "b.bin"))
    assert not storage.exists(str(tmp_path / "missing"))


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="hdfs://x/y"):
        storage.pyarrow_fs("hdfs://x/y")


@pytest.mark.integration
def test_s3_roundtrip_uses_environment_endpoint(s3_bucket):
    uri = s3_bucket.uri("dir", "obj.txt")
    storage.write_text(uri, "via env")
    assert storage.read_text(uri) == "via env"
    assert storage.list_files(s3_bucket.uri()) == [uri]
    fs, path = storage.fsspec_fs(uri)
    assert fs.cat(path) == b"via env"


def test_gcs_emulator_endpoint_from_the_standard_variable(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert storage.gcs_emulator() is None
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9023")
    assert storage.gcs_emulator() == ("127.0.0.1:9023", "http")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:4443")  # Google's clients accept no scheme
    assert storage.gcs_emulator() == ("localhost:4443", "http")
