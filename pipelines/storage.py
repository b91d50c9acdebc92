"""The one storage-URI helper: every path a user gives goes through here.

URIs may be `s3://`, `gs://`, `file://` or plain local paths. S3 endpoint and credentials come
from the usual environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`) exactly as boto3/s3fs read them; we pass the endpoint to pyarrow
explicitly because older pyarrow builds ignore `AWS_ENDPOINT_URL`.

GCS uses Application Default Credentials, unless `STORAGE_EMULATOR_HOST` (the variable Google's
own clients read, e.g. `http://127.0.0.1:9023`) names an emulator: then both pyarrow and gcsfs
talk to it over its scheme, anonymously.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

SUPPORTED_SCHEMES = ("s3", "gs", "gcs", "file", "")


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
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme=http_scheme, region=region)
        return fs, uri[len("s3://") :].rstrip("/")
    if scheme in ("gs", "gcs"):
        return gcs_pyarrow_fs(), uri.split("://", 1)[1].rstrip("/")
    return pafs.LocalFileSystem(), local_path(uri)


def fsspec_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it (s3fs for s3://)."""
    scheme = _scheme(uri)
    if scheme == "s3":
        endpoint, http_scheme = _s3_endpoint()
        kwargs = {"client_kwargs": {"endpoint_url": f"{http_scheme}://{endpoint}"}} if endpoint else {}
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


def exists(uri: str) -> bool:
    fs, path = pyarrow_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = pyarrow_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; parents are created on local filesystems."""
    fs, path = pyarrow_fs(uri)
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
            out.write(src.read())
    return local_dir
