"""The one storage-URI helper: every path a user gives goes through here.

URIs may be `s3://`, `gs://`, `file://` or plain local paths. S3 endpoint and credentials come
from the usual environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`) exactly as boto3/s3fs read them; we pass the endpoint to pyarrow
explicitly because older pyarrow builds ignore `AWS_ENDPOINT_URL`.

GCS uses Application Default Credentials, unless `STORAGE_EMULATOR_HOST` (the variable Google's
own clients read, e.g. `http://127.0.0.1:9023`) names an emulator: then both pyarrow and gcsfs
talk to it over its scheme, anonymously.

Retries are the storage clients' own, configured here and nowhere else (docs/faults-and-trust.md):
`MPLUG_STORAGE_MAX_ATTEMPTS` (default 10: the first attempt and 9 retries) sets pyarrow's S3 retry
strategy and botocore's (for s3fs); `MPLUG_STORAGE_RETRY_MODE` (default `standard`) is botocore's
mode: `standard` (throttling, 5xx and broken connections; exponential backoff with jitter),
`adaptive` (adds client-side rate limiting) or `legacy`. pyarrow always gets
`AwsDefaultS3RetryStrategy` (the same errors; the first retry at once, then waits doubling from
50 ms to 6.4 s: 12.8 s for 9 retries, measured). Its `AwsStandardS3RetryStrategy` draws every
retry from the AWS SDK's retry quota (500 tokens, 5 a retry) and pyarrow never pays tokens back,
so a filesystem stops retrying for good after ~100 retries (measured: 300 writes through 1 fault
in 4, every write after the 101st fault failed): a long training run or Tune search would lose its
storage to faults it should survive.
GCS clients retry transient errors by their own defaults. One exception, in `_GuardedReader`: the AWS SDK reports a 5xx answer to a ranged read
smaller than the error body as a non-retryable INTERNAL_FAILURE ("Failed to flush response
stream"), so pyarrow never retries it; that one read is repeated, up to the same attempts.

An error that remains after the retries comes as `StorageError` naming the URI (a
`FileNotFoundError` stays what it is), so ingest tells a store that failed from a damaged file.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

SUPPORTED_SCHEMES = ("s3", "gs", "gcs", "file", "")

MAX_ATTEMPTS_ENV = "MPLUG_STORAGE_MAX_ATTEMPTS"
RETRY_MODE_ENV = "MPLUG_STORAGE_RETRY_MODE"
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_RETRY_MODE = "standard"
RETRY_MODES = ("legacy", "standard", "adaptive")  # botocore's
# The storage settings of this process that workers must share (forwarded by the drivers).
SETTINGS_ENV = (MAX_ATTEMPTS_ENV, RETRY_MODE_ENV)
# pyarrow's S3 input streams are unbuffered: each read is one ranged GET. tarfile reads 10 KiB at
# a time (an 8 MiB shard: 842 GETs) and read() of a whole stream fetched ~256 KiB a GET (a 60 MiB
# checkpoint file: 241). Streams fetch 4 MiB a request (benchmarks/stream_reads.py): few requests,
# and a hostile member or line still streams past in a few MiB of memory.
STREAM_READ_BYTES = 4 << 20


class StorageError(OSError):
    """An object store did not serve a request after the client's own retries (throttling,
    server errors, broken connections, denied access): the object may be fine, the store was not."""

    def __init__(self, uri: str, operation: str, cause: BaseException) -> None:
        super().__init__(f"{operation} {uri}: {type(cause).__name__}: {cause}")
        self.uri = uri
        self.operation = operation


class ObjectTooLarge(ValueError):
    """An object is larger than the limit it was read with (nothing beyond the limit was read)."""

    def __init__(self, uri: str, limit: int) -> None:
        super().__init__(f"{uri} is larger than {limit} bytes")
        self.uri = uri
        self.limit = limit


@dataclass(frozen=True)
class RetrySettings:
    """The one retry policy of every storage client (see the module docstring)."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    mode: str = DEFAULT_RETRY_MODE

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RetrySettings:
        env = os.environ if environ is None else environ
        raw = env.get(MAX_ATTEMPTS_ENV) or str(DEFAULT_MAX_ATTEMPTS)
        try:
            attempts = int(raw)
        except ValueError:
            attempts = 0
        if attempts < 1:
            raise ValueError(
                f"{MAX_ATTEMPTS_ENV}={raw!r}: expected a whole number >= 1 (attempts per request)"
            )
        mode = env.get(RETRY_MODE_ENV) or DEFAULT_RETRY_MODE
        if mode not in RETRY_MODES:
            raise ValueError(f"{RETRY_MODE_ENV}={mode!r}: valid are {', '.join(RETRY_MODES)}")
        return cls(max_attempts=attempts, mode=mode)

    def botocore_config_kwargs(self) -> dict:
        """`botocore.config.Config` keywords (s3fs: `config_kwargs=`; boto3: `Config(**...)`)."""
        return {"retries": {"mode": self.mode, "max_attempts": self.max_attempts}}

    def s3_retry_strategy(self) -> pafs.S3RetryStrategy:
        """pyarrow's strategy, whatever the mode: its standard one runs dry (module docstring)."""
        return pafs.AwsDefaultS3RetryStrategy(max_attempts=self.max_attempts)


def retry_settings() -> RetrySettings:
    """This process's retry policy, read from its environment at each call."""
    return RetrySettings.from_env()


def settings_env() -> dict[str, str]:
    """The storage settings of this process that a worker must share (set ones only)."""
    return {k: os.environ[k] for k in SETTINGS_ENV if os.environ.get(k)}


def _scheme(uri: str) -> str:
    parsed = urlparse(uri)
    # A Windows drive letter or a plain relative path has no real scheme.
    scheme = parsed.scheme if len(parsed.scheme) > 1 else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"unsupported storage URI {uri!r}: scheme must be one of s3://, gs://, file:// or none"
        )
    return scheme


def _s3_endpoint() -> tuple[str | None, str]:
    """(endpoint host:port or None, 'http'|'https') from AWS_ENDPOINT_URL(_S3)."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None, "https"
    parsed = urlparse(url)
    return parsed.netloc or parsed.path, parsed.scheme or "https"


def gcs_emulator() -> tuple[str, str] | None:
    """(host:port, 'http'|'https') of the GCS emulator named by STORAGE_EMULATOR_HOST, else None."""
    url = os.environ.get("STORAGE_EMULATOR_HOST")
    if not url:
        return None
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return parsed.netloc, parsed.scheme or "http"


def gcs_pyarrow_fs() -> pafs.GcsFileSystem:
    emulator = gcs_emulator()
    if emulator is None:
        return pafs.GcsFileSystem()
    host, scheme = emulator
    # project_id: the emulator needs one to create buckets; it is ignored otherwise.
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme, project_id="emulator")


def pyarrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for `uri`."""
    scheme = _scheme(uri)
    if scheme == "s3":
        endpoint, http_scheme = _s3_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme=http_scheme,
            region=region,
            retry_strategy=retry_settings().s3_retry_strategy(),
        )
        return fs, uri[len("s3://") :].rstrip("/")
    if scheme in ("gs", "gcs"):
        return gcs_pyarrow_fs(), uri.split("://", 1)[1].rstrip("/")
    return pafs.LocalFileSystem(), local_path(uri)


def fsspec_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it (s3fs for s3://)."""
    scheme = _scheme(uri)
    if scheme == "s3":
        endpoint, http_scheme = _s3_endpoint()
        kwargs: dict = {"config_kwargs": retry_settings().botocore_config_kwargs()}
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": f"{http_scheme}://{endpoint}"}
        return fsspec.filesystem("s3", **kwargs), uri[len("s3://") :].rstrip("/")
    if scheme in ("gs", "gcs"):
        emulator = gcs_emulator()
        if emulator is None:
            return fsspec.filesystem("gcs"), uri.split("://", 1)[1].rstrip("/")
        # The core class: gcsfs' default subclass first asks a gRPC control API (which emulators
        # lack) for the bucket type and stalls for a minute per bucket.
        from gcsfs.core import GCSFileSystem

        host, scheme = emulator
        return GCSFileSystem(token="anon", endpoint_url=f"{scheme}://{host}"), uri.split("://", 1)[1].rstrip(
            "/"
        )
    return fsspec.filesystem("file"), local_path(uri)


def local_path(uri: str) -> str:
    """Absolute local path of a `file://` URI or a plain path."""
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def absolute(uri: str) -> str:
    """`uri` as every process reads it alike: a local path made absolute (a Ray worker's working
    folder is not the driver's); object-store URIs unchanged."""
    return uri if is_remote(uri) else local_path(uri)


def is_remote(uri: str) -> bool:
    return _scheme(uri) in ("s3", "gs", "gcs")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    if is_remote(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def ensure_dir(uri: str) -> None:
    fs, path = pyarrow_fs(uri)
    fs.create_dir(path, recursive=True)


# Errors that say what is (not) there, not that the store failed: they pass unchanged.
_NOT_STORE_FAILURES = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    StorageError,
)
# The AWS SDK's words for a 5xx answer whose error body did not fit a small ranged read.
_MISCLASSIFIED_READ = "Failed to flush response stream"


@contextlib.contextmanager
def guard(uri: str, operation: str):
    """Re-raise an OSError that remains after the client's retries as StorageError naming `uri`."""
    try:
        yield
    except _NOT_STORE_FAILURES:
        raise
    except OSError as err:
        raise StorageError(uri, operation, err) from err


class _GuardedReader:
    """A pyarrow input file as a Python file object whose errors are StorageError naming the URI.

    Repeats a read only when the AWS SDK misreports a 5xx as INTERNAL_FAILURE (see the module
    docstring); a failed read leaves the position where it was, so the repeat reads the same
    bytes. Every other failure was already retried by the client."""

    def __init__(self, raw: pa.NativeFile, uri: str, attempts: int) -> None:
        self.raw = raw
        self.uri = uri
        self.attempts = attempts

    def _call(self, fn, *args):
        for attempt in range(self.attempts):
            try:
                return fn(*args)
            except _NOT_STORE_FAILURES:
                raise
            except OSError as err:
                if _MISCLASSIFIED_READ in str(err) and attempt + 1 < self.attempts:
                    time.sleep(min(0.05 * 2**attempt, 2.0))
                    continue
                raise StorageError(self.uri, "read", err) from err
        raise AssertionError("unreachable: the last attempt returns or raises")

    def read(self, nbytes: int | None = None) -> bytes:
        return self._call(self.raw.read, nbytes)

    def read_buffer(self, nbytes: int | None = None) -> pa.Buffer:
        return self._call(self.raw.read_buffer, nbytes)

    # What io.BufferedReader asks of its raw file besides the above.
    def readinto(self, into) -> int:
        return self._call(self.raw.readinto, into)

    def flush(self) -> None:
        pass

    def seek(self, position: int, whence: int = 0) -> int:
        return self._call(self.raw.seek, position, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.raw.seekable()

    def writable(self) -> bool:
        return False


def open_input_file(uri: str) -> pa.NativeFile:
    """A random-access reader of `uri` (parquet, byte ranges); store failures raise StorageError."""
    fs, path = pyarrow_fs(uri)
    with guard(uri, "open"):
        raw = fs.open_input_file(path)
    return pa.PythonFile(_GuardedReader(raw, uri, retry_settings().max_attempts), mode="r")


def open_input_stream(uri: str, buffer_size: int = STREAM_READ_BYTES) -> pa.NativeFile:
    """A sequential reader of `uri` (tar streams; read it in sized chunks, `read(n)`), fetching
    `buffer_size` bytes a request (0: one request per read); store failures raise StorageError.
    The buffer sits above the guard, so a repeated read repeats one whole request."""
    fs, path = pyarrow_fs(uri)
    with guard(uri, "open"):
        raw = fs.open_input_stream(path)
    reader = _GuardedReader(raw, uri, retry_settings().max_attempts)
    return pa.PythonFile(io.BufferedReader(reader, buffer_size) if buffer_size else reader, mode="r")


def exists(uri: str) -> bool:
    fs, path = pyarrow_fs(uri)
    with guard(uri, "stat"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_size(uri: str) -> int:
    fs, path = pyarrow_fs(uri)
    with guard(uri, "stat"):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no file at {uri!r}")
    return info.size


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object; with `max_bytes`, ObjectTooLarge once more than that would be read (at
    most max_bytes + 1 bytes are ever read)."""
    with open_input_file(uri) as f:  # random access: read() may ask the size
        if max_bytes is None:
            return f.read()
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ObjectTooLarge(uri, max_bytes)
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; parents are created on local filesystems."""
    fs, path = pyarrow_fs(uri)
    with guard(uri, "write"):
        # Object stores need no parent folders (creating them would add marker objects and requests).
        if not is_remote(uri) and os.path.dirname(path):
            fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Every file below `uri` (recursive) ending in `suffix`, as URIs with the same scheme, sorted."""
    fs, path = pyarrow_fs(uri)
    with guard(uri, "list"):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) or uri.startswith("file://") else ""
    out = [prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)]
    return sorted(out)


def delete_file(uri: str) -> None:
    fs, path = pyarrow_fs(uri)
    fs.delete_file(path)


def delete_dir(uri: str) -> None:
    """Delete a folder and everything below it; nothing to do if it does not exist."""
    fs, path = pyarrow_fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    if not is_remote(uri):
        fs.delete_dir(path)
        return
    # On object stores a folder may be only a prefix of its objects (no marker object), and
    # then it is gone with its last object: deleting the marker too would be a 404 on GCS.
    fs.delete_dir_contents(path, missing_dir_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        with contextlib.suppress(FileNotFoundError):  # the marker went with the last object
            fs.delete_dir(path)


def download_dir(uri: str, local_dir: str) -> str:
    """Copy every file below `uri` into `local_dir` (kept relative); returns `local_dir`."""
    fs, root = pyarrow_fs(uri)
    os.makedirs(local_dir, exist_ok=True)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        dest = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
            while chunk := src.read(STREAM_READ_BYTES):  # not read(): ~256 KiB a request
                out.write(chunk)
    return local_dir
