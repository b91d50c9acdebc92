"""HTTP download of image URLs: timeouts, retries with exponential backoff, a size cap and content
checks. Every URL ends in exactly one outcome, recorded in the stats and, for failures, in the
row's reject detail. Runs inside the ingest workers with a thread pool (downloads are I/O bound)."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

# Retry only what may succeed next time: server errors, throttling, network trouble.
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_ALLOWED_CONTENT = ("image/", "application/octet-stream", "binary/octet-stream")


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(10.0, gt=0, description="per-attempt connect/read timeout")
    retries: int = Field(2, ge=0, description="extra attempts after a retryable failure")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each attempt")
    max_bytes: int = Field(20_000_000, gt=0, description="size cap; larger bodies are rejected as too_large")
    threads: int = Field(16, ge=1, description="concurrent fetches per ingest worker")
    user_agent: str = "mplug-ray-ingest/0.1"


@dataclass(frozen=True)
class DownloadResult:
    url: str
    data: bytes | None
    outcome: str  # "ok" or a short failure class, e.g. "http_404", "timeout", "truncated"
    detail: str = ""
    reason: str = ""  # reject reason when data is None: download_error or too_large


def _fail(url: str, outcome: str, detail: str, reason: str = "download_error") -> DownloadResult:
    return DownloadResult(url=url, data=None, outcome=outcome, detail=detail, reason=reason)


def _attempt(url: str, cfg: DownloadConfig) -> tuple[DownloadResult, bool]:
    """One fetch → (result, retryable)."""
    request = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as resp:
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith(_ALLOWED_CONTENT):
                return _fail(url, "bad_content_type", f"Content-Type {ctype!r} is not an image"), False
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cfg.max_bytes:
                return _fail(
                    url, "too_large", f"Content-Length {length} > max_bytes={cfg.max_bytes}", "too_large"
                ), False
            data = resp.read(cfg.max_bytes + 1)
            if len(data) > cfg.max_bytes:
                return _fail(url, "too_large", f"body > max_bytes={cfg.max_bytes}", "too_large"), False
            if length is not None and length.isdigit() and len(data) != int(length):
                return _fail(url, "truncated", f"got {len(data)} of {length} bytes"), True
            return DownloadResult(url=url, data=data, outcome="ok"), False
    except urllib.error.HTTPError as err:
        return _fail(url, f"http_{err.code}", f"HTTP {err.code} {err.reason}"), err.code in RETRYABLE_HTTP
    except http.client.IncompleteRead as err:
        return _fail(url, "truncated", f"got {len(err.partial)} bytes, expected {err.expected} more"), True
    except TimeoutError as err:
        return _fail(url, "timeout", f"no response within {cfg.timeout_s}s: {err}"), True
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            return _fail(url, "timeout", f"no response within {cfg.timeout_s}s"), True
        return _fail(url, "connection_error", str(err.reason)), True
    except (http.client.HTTPException, ConnectionError, OSError) as err:
        return _fail(url, "connection_error", f"{type(err).__name__}: {err}"), True
    except ValueError as err:  # malformed URL, unknown scheme
        return _fail(url, "bad_url", str(err)), False


def fetch(url: str, cfg: DownloadConfig) -> DownloadResult:
    """Fetch `url` with up to `cfg.retries` retries and exponential backoff."""
    result, retryable = _attempt(url, cfg)
    for attempt in range(cfg.retries):
        if not retryable:
            break
        time.sleep(cfg.backoff_s * 2**attempt)
        result, retryable = _attempt(url, cfg)
    if result.data is None and cfg.retries and retryable:
        result = DownloadResult(
            result.url,
            None,
            result.outcome,
            f"{result.detail} (after {cfg.retries + 1} attempts)",
            result.reason,
        )
    return result


def fetch_all(urls: Iterable[str], cfg: DownloadConfig) -> list[DownloadResult]:
    """Fetch every URL concurrently on `cfg.threads` threads; results in input order."""
    urls = list(urls)
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(cfg.threads, len(urls))) as pool:
        return list(pool.map(lambda u: fetch(u, cfg), urls))
