"""A real `ray start --head` with token authentication, for the Jobs API tests and benchmark.

Its own temp dir, ports and token file, so it never meets another Ray on a shared machine;
stopped by the ids of its own processes (`ray stop` would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.gloo import free_port

_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)
# Worker ports below Linux's ephemeral range (where free_port draws) and above Ray's default
# 10002-19999 (where other local clusters' workers live).
_WORKER_PORTS = (20000, 32000)
_WORKER_PORT_SPAN = 400
# Never forwarded to the head: a test must hand storage settings to a job with `--env`.
_STORAGE_ENV_PREFIXES = ("AWS_", "STORAGE_EMULATOR_HOST", "GOOGLE_")


@dataclass
class RayHead:
    process: subprocess.Popen
    temp_dir: Path
    token_file: Path
    dashboard_port: int
    gcs_port: int
    nodes: list[subprocess.Popen] = field(default_factory=list)  # `ray start` of nodes that joined

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()


def start_head(
    num_cpus: int = 8,
    timeout_s: float = 240.0,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    ports: Mapping[str, int] | None = None,
) -> RayHead:
    """Start the head and return once its Jobs API answers an authenticated request.
    `extra_args` go on its `ray start` line, `extra_env` into its environment, `ports` (flag →
    port) replace free ones (e.g. an autoscaler's config must name the GCS port beforehand)."""
    # Short path: Ray puts unix sockets under it (their paths are limited to ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="mplug-rh-", dir="/tmp"))
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    ports = {flag: free_port() for flag in _PORT_FLAGS} | dict(ports or {})
    low = _WORKER_PORTS[0] + secrets.randbelow(_WORKER_PORTS[1] - _WORKER_PORTS[0] - _WORKER_PORT_SPAN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STORAGE_ENV_PREFIXES)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0")
    # As after `source .venv/bin/activate`: the head's PATH finds the venv's python, which is
    # the `python` a job's entrypoint runs with.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra_env or {})
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [
        ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
        "--min-worker-port", str(low), "--max-worker-port", str(low + _WORKER_PORT_SPAN),
    ]  # fmt: skip
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    cmd += list(extra_args)
    log = open(temp_dir / "ray_start.log", "wb")  # noqa: SIM115 - kept open for the process's life
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc, temp_dir, token_file, ports["--dashboard-port"], ports["--port"])
    try:
        _wait_ready(head, timeout_s)
    except BaseException:
        stop_head(head)
        raise
    return head


def _node_env(head: RayHead) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STORAGE_ENV_PREFIXES)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token_file), RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def join_node(head: RayHead, num_cpus: int = 0, timeout_s: float = 120.0) -> subprocess.Popen:
    """A second raylet on this machine, joined to `head` without a temp dir of its own: it
    shares the head's session folder, as every node of Ray's fake multi-node autoscaler does,
    and its log monitor publishes the same worker files the head's does. Stopped with the head."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    low = _WORKER_PORTS[0] + secrets.randbelow(_WORKER_PORTS[1] - _WORKER_PORTS[0] - _WORKER_PORT_SPAN)
    cmd = [
        ray, "start", "--address", head.gcs_address, "--block", "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(num_cpus), "--disable-usage-stats",
        "--min-worker-port", str(low), "--max-worker-port", str(low + _WORKER_PORT_SPAN),
    ]  # fmt: skip
    for flag in _PORT_FLAGS:
        if flag not in ("--port", "--dashboard-port", "--ray-client-server-port"):  # the head's own
            cmd += [flag, str(free_port())]
    log = open(head.temp_dir / f"ray_start_node{len(head.nodes) + 1}.log", "wb")  # noqa: SIM115 - the process's
    node = subprocess.Popen(
        cmd, env=_node_env(head), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head.nodes.append(node)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"ray start (node) exited with {node.returncode}: see {log.name}")
        if _alive_nodes(head) >= 1 + len(head.nodes):
            return node
        time.sleep(1.0)
    raise TimeoutError(f"the node did not join {head.gcs_address} within {timeout_s:.0f}s")


def _alive_nodes(head: RayHead) -> int:
    """Live nodes of the cluster, as the State API lists them (`ray list nodes`)."""
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {head.token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            rows = json.loads(answer.read())["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return 0
    return sum(1 for row in rows if row.get("state") == "ALIVE")


def _wait_ready(head: RayHead, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"}
    )
    while True:
        if head.process.poll() is not None:
            raise RuntimeError(
                f"ray start exited with {head.process.returncode}: see {head.temp_dir / 'ray_start.log'}"
            )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Jobs API at {head.dashboard_url} did not answer within {timeout_s:.0f}s")
        time.sleep(0.5)


def _processes_of(head: RayHead) -> list[psutil.Process]:
    """`ray start` and everything it started: its descendants, plus any process naming the
    head's temp dir on its command line (the daemons Ray detaches)."""
    found: dict[int, psutil.Process] = {}
    for started in (head.process, *head.nodes):
        try:
            root = psutil.Process(started.pid)
            found[root.pid] = root
            found.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    marker = str(head.temp_dir)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or []):
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def stop_head(head: RayHead) -> None:
    procs = _processes_of(head)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)
    for started in (head.process, *head.nodes):
        started.wait(timeout=10)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
