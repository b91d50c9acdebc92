"""A real MLflow tracking server for the tests: `mlflow server` with a sqlite store on a free
loopback port, in its own process group, stopped by that group's id.

`shared_mlflow_server(request)` starts one server for the whole test session on first use;
`start_mlflow_server` starts one of a test's own (one it may kill)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    store: str  # the sqlite store's URI: readable with the server gone
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """SIGKILL the server's process group (the server and its uvicorn workers)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, timeout_s: float = 180) -> MlflowServer:
    folder.mkdir(parents=True, exist_ok=True)
    port, store = _free_port(), f"sqlite:///{folder}/mlflow.db"
    log = folder / "server.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
             "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", store=store, proc=proc, log=log)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=5) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def shared_mlflow_server(request: pytest.FixtureRequest) -> MlflowServer:
    """The test session's shared server: started on first use, stopped when the session ends."""
    config = request.config
    server = getattr(config, "_mplug_mlflow_server", None)
    if server is None:
        pytest.importorskip("mlflow")
        server = start_mlflow_server(request.getfixturevalue("tmp_path_factory").mktemp("mlflow"))
        config._mplug_mlflow_server = server
        config.add_cleanup(server.stop)
    return server
