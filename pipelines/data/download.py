"""HTTP download of image URLs: timeouts, retries with exponential backoff, a size cap and content
checks. Every URL ends in exactly one outcome, recorded in the stats and, for failures, in the
row's reject detail. Runs inside the ingest workers with a thread pool (downloads are I/O bound).

URL lists are written by strangers, so a URL is fetched only if it is `http` or `https` and its
host resolves to public addresses: loopback, private, link-local, multicast and reserved ones
(cloud metadata endpoints, services inside the cluster) are refused with outcome
`private_address`, unless `allow_private_urls`. The check runs where the connection is made, on
the address connected to (a name that resolves differently a second time gains nothing), and
again for every redirect hop, each of which must be http(s) too. Downloads connect directly:
proxy settings in the environment are not used, since a proxy would hide the destination from
the check. A body is read in chunks and abandoned once it passes `max_bytes`.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlparse

from pydantic import BaseModel, ConfigDict, Field

# Retry only what may succeed next time: server errors, throttling, network trouble.
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_ALLOWED_CONTENT = ("image/", "application/octet-stream", "binary/octet-stream")
ALLOWED_SCHEMES = ("http", "https")
_CHUNK = 1 << 16


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(10.0, gt=0, description="per-attempt connect/read timeout")
    retries: int = Field(2, ge=0, description="extra attempts after a retryable failure")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each attempt")
    max_bytes: int = Field(20_000_000, gt=0, description="size cap; larger bodies are rejected as too_large")
    threads: int = Field(16, ge=1, description="concurrent fetches per ingest worker")
    user_agent: str = "mplug-ray-ingest/0.1"
    max_redirects: int = Field(5, ge=0, description="redirect hops followed, each checked like the first URL")
    allow_private_urls: bool = Field(
        False,
        description="fetch loopback, private and link-local addresses too (a local test server, an "
        "intranet mirror); off, such URLs are url_not_allowed rejects",
    )


@dataclass(frozen=True)
class DownloadResult:
    url: str
    data: bytes | None
    outcome: str  # "ok" or a short failure class, e.g. "http_404", "timeout", "truncated"
    detail: str = ""
    reason: str = ""  # reject reason when data is None: download_error or too_large


def _fail(url: str, outcome: str, detail: str, reason: str = "download_error") -> DownloadResult:
    return DownloadResult(url=url, data=None, outcome=outcome, detail=detail, reason=reason)


class URLNotAllowed(OSError):
    """A URL (or a redirect hop) that names a scheme or an address downloads must not reach."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome  # bad_scheme | private_address


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: the IPv4 is the low 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # a network's own translator: never public


def is_public_address(address: str) -> bool:
    """Whether an IP address is a public unicast one (not loopback, private, link-local,
    multicast, reserved or unspecified). An IPv6 address that carries an IPv4 one (IPv4-mapped,
    6to4, NAT64) is judged as that IPv4: a translator would deliver it there."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None or ip.sixtofour is not None:
            ip = ip.ipv4_mapped or ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip in _NAT64_LOCAL:
            return False
    return ip.is_global and not ip.is_multicast


def _checked_connection(host: str, port: int, timeout: object, allow_private: bool) -> socket.socket:
    """A TCP connection to the first reachable allowed address of `host`."""
    timeout = timeout if isinstance(timeout, int | float) else None  # http.client's default: none
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise urllib.error.URLError(f"cannot resolve {host!r}: {err}") from err
    allowed = [i for i in infos if allow_private or is_public_address(i[4][0])]
    if not allowed:
        addresses = sorted({i[4][0] for i in infos})
        raise URLNotAllowed(
            "private_address",
            f"{host!r} resolves to non-public address(es) {addresses} (loopback, private, link-local or "
            "reserved): refused; set download.allow_private_urls (--allow-private-urls) to fetch them",
        )
    error: OSError | None = None
    for family, kind, proto, _, address in allowed:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as err:
            sock.close()
            error = err
    assert error is not None
    raise error


def _connection_classes(allow_private: bool) -> tuple[type, type]:
    class CheckedHTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = _checked_connection(self.host, self.port, self.timeout, allow_private)

    class CheckedHTTPSConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = _checked_connection(self.host, self.port, self.timeout, allow_private)
            self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)

    return CheckedHTTPConnection, CheckedHTTPSConnection


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows up to `max_redirects` hops, each only to http(s); its address is checked when
    the hop connects (the checked connections of `_opener` make every connection)."""

    def __init__(self, max_redirects: int) -> None:
        self.max_redirections = max_redirects

    def http_error_302(self, req, fp, code, msg, headers):
        # Checked before urllib's own handling, which turns a disallowed scheme into an HTTP error.
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            target = urljoin(req.full_url, location)
            if urlparse(target).scheme.lower() not in ALLOWED_SCHEMES:
                raise URLNotAllowed(
                    "bad_scheme", f"redirected to {target!r}: only http and https URLs are fetched"
                )
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener(cfg: DownloadConfig) -> urllib.request.OpenerDirector:
    """Only http(s), through checked connections, no proxies, no file:// / ftp:// / data: handlers."""
    http_cls, https_cls = _connection_classes(cfg.allow_private_urls)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_cls, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_cls, req)

    opener = urllib.request.OpenerDirector()
    for handler in (
        HTTPHandler(),
        HTTPSHandler(),
        _CheckedRedirects(cfg.max_redirects),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


def _read_capped(resp, max_bytes: int) -> bytes | None:
    """The body in chunks; None as soon as it passes `max_bytes` (the rest is never read)."""
    parts, size = [], 0
    while True:
        chunk = resp.read(_CHUNK)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > max_bytes:
            return None
        parts.append(chunk)


def _attempt(url: str, cfg: DownloadConfig) -> tuple[DownloadResult, bool]:
    """One fetch → (result, retryable)."""
    scheme = urlparse(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        detail = f"scheme {scheme or '(none)'!r}: only http and https URLs are fetched"
        return _fail(url, "bad_scheme", detail, "url_not_allowed"), False
    request = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
    try:
        with _opener(cfg).open(request, timeout=cfg.timeout_s) as resp:
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith(_ALLOWED_CONTENT):
                return _fail(url, "bad_content_type", f"Content-Type {ctype!r} is not an image"), False
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cfg.max_bytes:
                return _fail(
                    url, "too_large", f"Content-Length {length} > max_bytes={cfg.max_bytes}", "too_large"
                ), False
            data = _read_capped(resp, cfg.max_bytes)
            if data is None:
                return _fail(url, "too_large", f"body > max_bytes={cfg.max_bytes}", "too_large"), False
            if length is not None and length.isdigit() and len(data) != int(length):
                return _fail(url, "truncated", f"got {len(data)} of {length} bytes"), True
            return DownloadResult(url=url, data=data, outcome="ok"), False
    except URLNotAllowed as err:
        return _fail(url, err.outcome, str(err), "url_not_allowed"), False
    except urllib.error.HTTPError as err:
        return _fail(url, f"http_{err.code}", f"HTTP {err.code} {err.reason}"), err.code in RETRYABLE_HTTP
    except http.client.IncompleteRead as err:
        return _fail(url, "truncated", f"got {len(err.partial)} bytes, expected {err.expected} more"), True
    except TimeoutError as err:
        return _fail(url, "timeout", f"no response within {cfg.timeout_s}s: {err}"), True
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            return _fail(url, "timeout", f"no response within {cfg.timeout_s}s"), True
        if isinstance(err.reason, URLNotAllowed):  # raised inside a connect, wrapped by urllib
            return _fail(url, err.reason.outcome, str(err.reason), "url_not_allowed"), False
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
