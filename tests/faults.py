"""A storage fault injector: moto's S3 server behind a WSGI middleware that fails chosen requests.

moto has no fault injection, so the tests' S3 endpoint is moto's own WSGI app
(`DomainDispatcherApplication(create_backend_app)`, as `moto_server` serves it) wrapped in
`FaultMiddleware` and served threaded by werkzeug in a process of its own. A failed request never
reaches moto, so it has no side effect: exactly what a throttled or broken S3 front end does.

Fault kinds, each what a real S3 answers under trouble:
- `503`: `503 SlowDown` with S3's XML error body ("Please reduce your request rate.");
- `500`: `500 InternalError` with its XML body;
- `reset`: the connection is reset (TCP RST) before any response byte.

Rules are deterministic (no randomness), set and read over HTTP on the same port, so the test
process, Ray workers and subprocesses all go through the same switch:
- `every(n)`: every n-th matching request fails (kinds taken in turn);
- `first_attempts(k)`: the first k attempts of each distinct request (method, path, query, Range)
  fail, the next succeeds;
- `match=` (a regex on "METHOD /path?query") and `methods=` narrow either rule; `every(1, match=...)`
  makes the matching objects unreadable for good (faults that outlast every retry).

Control endpoint (paths no S3 bucket can have: bucket names cannot start with `_`):
`GET /_faults` → {"rule": ..., "injected": {"503": n, "500": n, "reset": n, "total": n},
"requests": n}; `POST /_faults/rule` with a rule as JSON (`{"mode": "off"}` turns faults off, the
counts stay); `POST /_faults/reset` zeroes the counts.

Use from tests: the session's `s3_endpoint` runs behind it (faults off); the `s3_faults` fixture is
an `S3Faults` client. Stand-alone (benchmarks): `python -m tests.faults --port N`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("503", "500", "reset")
CONTROL_PREFIX = "/_faults"

_XML_ERRORS = {
    "503": ("503 Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": (
        "500 Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
}


@dataclass
class Rule:
    """Which requests fail. mode: off | every | first_attempts."""

    mode: str = "off"
    n: int = 0  # every: the n-th, 2n-th, ... matching request fails
    k: int = 0  # first_attempts: attempts 1..k of each distinct request fail
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    match: str | None = None  # regex searched in "METHOD /path?query"
    methods: list[str] | None = None  # e.g. ["GET", "HEAD"]; None: every method

    def __post_init__(self) -> None:
        if self.mode not in ("off", "every", "first_attempts"):
            raise ValueError(f"fault mode {self.mode!r}: valid are off, every, first_attempts")
        if self.mode == "every" and self.n < 1:
            raise ValueError(f"every(n): n must be >= 1, got {self.n}")
        if self.mode == "first_attempts" and self.k < 1:
            raise ValueError(f"first_attempts(k): k must be >= 1, got {self.k}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"fault kinds {self.kinds!r}: choose one or more of {list(KINDS)}")
        if self.match is not None:
            re.compile(self.match)


class _Reset(ConnectionError):
    """Raised inside the app to make werkzeug drop the connection (see FaultRequestHandler)."""


class FaultMiddleware:
    """WSGI middleware: answers the control endpoint, fails requests its rule selects, passes the
    rest to `app` untouched. Thread-safe (werkzeug serves each request on its own thread)."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.rule = Rule()
        self.matched = 0  # matching requests seen under the current rule
        self.attempts: Counter = Counter()  # first_attempts: per distinct request
        self.injected: Counter = Counter()
        self.requests = 0  # S3 requests seen (any rule)

    # ---- control ----
    def state(self) -> dict:
        with self.lock:
            injected = {k: self.injected[k] for k in KINDS}
            return {
                "rule": asdict(self.rule),
                "injected": {**injected, "total": sum(injected.values())},
                "requests": self.requests,
            }

    def _control(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        try:
            if method == "POST" and path == f"{CONTROL_PREFIX}/rule":
                size = int(environ.get("CONTENT_LENGTH") or 0)
                rule = Rule(**json.loads(environ["wsgi.input"].read(size) or b"{}"))
                with self.lock:
                    self.rule, self.matched = rule, 0
                    self.attempts.clear()
            elif method == "POST" and path == f"{CONTROL_PREFIX}/reset":
                with self.lock:
                    self.injected.clear()
                    self.requests = 0
            elif not (method == "GET" and path == CONTROL_PREFIX):
                raise ValueError(f"unknown control request {method} {path}")
        except (ValueError, TypeError) as err:
            body = json.dumps({"error": str(err)}).encode()
            start_response("400 Bad Request", [("Content-Type", "application/json")])
            return [body]
        body = json.dumps(self.state()).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    # ---- faults ----
    def _pick(self, environ: dict) -> str | None:
        """The fault kind to inject for this request, or None to pass it on."""
        method = environ["REQUEST_METHOD"]
        query = environ.get("QUERY_STRING", "")
        target = f"{method} {environ.get('PATH_INFO', '')}" + (f"?{query}" if query else "")
        with self.lock:
            self.requests += 1
            rule = self.rule
            if rule.mode == "off":
                return None
            if rule.methods is not None and method not in rule.methods:
                return None
            if rule.match is not None and not re.search(rule.match, target):
                return None
            if rule.mode == "every":
                self.matched += 1
                if self.matched % rule.n:
                    return None
                fault_no = self.matched // rule.n
            else:
                identity = (target, environ.get("HTTP_RANGE", ""))
                self.attempts[identity] += 1
                fault_no = self.attempts[identity]
                if fault_no > rule.k:
                    return None
            kind = rule.kinds[(fault_no - 1) % len(rule.kinds)]
            self.injected[kind] += 1
            return kind

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(CONTROL_PREFIX):
            return self._control(environ, start_response)
        kind = self._pick(environ)
        if kind is None:
            return self.app(environ, start_response)
        if kind == "reset":
            sock = environ.get("werkzeug.socket")
            if sock is not None:  # linger 0: closing sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise _Reset("fault injected: connection reset")
        status, code, message = _XML_ERRORS[kind]
        resource = environ.get("PATH_INFO", "")
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
            f"<RequestId>fault-{kind}</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        if kind == "503":
            headers.append(("Retry-After", "0"))
        start_response(status, headers)
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]


def make_request_handler() -> type:
    """moto's request handler, plus: a `_Reset` raised by the middleware closes the socket at once
    (with linger 0 set, the kernel sends RST; werkzeug has already drained the request body)."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class FaultRequestHandler(MotoRequestHandler):
        def connection_dropped(self, error: BaseException, environ: dict | None = None) -> None:
            if isinstance(error, _Reset):
                self.close_connection = True
                self.connection.close()  # the fd closes when rfile does, in finish(): RST, no FIN

    return FaultRequestHandler


def serve(host: str, port: int, ready: Callable[[int], None] | None = None) -> None:
    """Serve moto behind the fault middleware until the process is stopped."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = FaultMiddleware(DomainDispatcherApplication(create_backend_app))
    server = make_server(host, port, app, threaded=True, request_handler=make_request_handler())
    server.request_queue_size = 128  # many Ray workers connect at once
    if ready is not None:
        ready(server.server_address[1])
    server.serve_forever()


# ---- the client tests use -----------------------------------------------------------------------
class S3Faults:
    """Switch faults on the injector at `endpoint` (http://host:port) and read what it injected.

    `every(20)` fails 5% of requests; `first_attempts(2)` fails each request twice then lets it
    through; both return self, and as a context manager turn faults off on exit:
    `with s3_faults.every(20, kinds=("503",)): ...`."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.endpoint + CONTROL_PREFIX + path, data=data, method=method)
        # A control request is never faulted, and goes around any proxy the environment names.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            return json.loads(resp.read())

    def _set(self, **rule: Any) -> S3Faults:
        Rule(**rule)  # validate here, so a bad rule fails in the test, not as a 400
        self._call("POST", "/rule", rule)
        return self

    def every(
        self,
        n: int,
        kinds: Iterable[str] = KINDS,
        match: str | None = None,
        methods: Iterable[str] | None = None,
    ) -> S3Faults:
        """Fail every n-th matching request (1/n of them), cycling through `kinds`."""
        return self._set(mode="every", n=n, kinds=list(kinds), match=match,
                         methods=None if methods is None else list(methods))  # fmt: skip

    def first_attempts(
        self,
        k: int,
        kinds: Iterable[str] = KINDS,
        match: str | None = None,
        methods: Iterable[str] | None = None,
    ) -> S3Faults:
        """Fail the first k attempts of every distinct matching request; the (k+1)-th passes."""
        return self._set(mode="first_attempts", k=k, kinds=list(kinds), match=match,
                         methods=None if methods is None else list(methods))  # fmt: skip

    def off(self) -> S3Faults:
        """No more faults; the counts stay readable."""
        return self._set(mode="off")

    def reset(self) -> S3Faults:
        """Zero the counts of injected faults and seen requests."""
        self._call("POST", "/reset")
        return self

    def state(self) -> dict:
        return self._call("GET", "")

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected since the last reset, by kind, and their `total`."""
        return self.state()["injected"]

    @property
    def requests(self) -> int:
        """S3 requests the injector saw since the last reset (failed ones included)."""
        return self.state()["requests"]

    def __enter__(self) -> S3Faults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.off()


def wait_ready(endpoint: str, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Block until the injector at `endpoint` answers its control endpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the fault-injecting S3 server for {endpoint} exited before it listened")
        try:
            S3Faults(endpoint).state()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the fault-injecting S3 server did not answer at {endpoint} within {timeout}s")


def spawn(port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """Start the injector (moto behind the middleware, faults off) in a process of its own, in
    its own session so it can be stopped by its process group; returns once it answers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults", "--host", host, "--port", str(port)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://{host}:{port}", alive=lambda: proc.poll() is None)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop a process `spawn` started (by its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto S3 behind a fault injector (tests/faults.py)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
