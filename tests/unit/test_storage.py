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


def test_one_retry_knob_sets_every_client(monkeypatch):
    monkeypatch.delenv(storage.MAX_ATTEMPTS_ENV, raising=False)
    monkeypatch.delenv(storage.RETRY_MODE_ENV, raising=False)
    assert storage.retry_settings() == storage.RetrySettings(max_attempts=10, mode="standard")
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "4")
    monkeypatch.setenv(storage.RETRY_MODE_ENV, "adaptive")
    settings = storage.retry_settings()
    assert settings.botocore_config_kwargs() == {"retries": {"mode": "adaptive", "max_attempts": 4}}
    # pyarrow's standard strategy runs dry after ~100 retries: its default one in every mode.
    for mode in storage.RETRY_MODES:
        strategy = storage.RetrySettings(max_attempts=3, mode=mode).s3_retry_strategy()
        assert isinstance(strategy, storage.pafs.AwsDefaultS3RetryStrategy) and strategy.max_attempts == 3
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, _ = storage.fsspec_fs("s3://bucket/key")
    assert fs.config_kwargs == {"retries": {"mode": "adaptive", "max_attempts": 4}}
    # Workers share the settings: a driver forwards them with the other non-secret storage settings.
    assert storage.settings_env() == {storage.MAX_ATTEMPTS_ENV: "4", storage.RETRY_MODE_ENV: "adaptive"}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MPLUG_STORAGE_MAX_ATTEMPTS", "0", "MPLUG_STORAGE_MAX_ATTEMPTS='0': expected a whole number >= 1"),
        ("MPLUG_STORAGE_MAX_ATTEMPTS", "many", "MPLUG_STORAGE_MAX_ATTEMPTS='many'"),
        ("MPLUG_STORAGE_RETRY_MODE", "eager", "MPLUG_STORAGE_RETRY_MODE='eager': valid are legacy, standard"),
    ],
)
def test_a_bad_retry_setting_names_the_variable_and_what_is_valid(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        storage.pyarrow_fs("s3://bucket/key")


def test_reads_are_capped_and_missing_files_stay_file_not_found(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    assert storage.read_bytes(str(tmp_path / "f.bin"), max_bytes=100) == b"x" * 100
    with pytest.raises(storage.ObjectTooLarge, match="larger than 99 bytes"):
        storage.read_bytes(str(tmp_path / "f.bin"), max_bytes=99)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    with storage.open_input_file(str(tmp_path / "f.bin")) as f:
        assert f.read_at(3, 97) == b"xxx"
