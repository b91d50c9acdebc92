"""Ray's real autoscaler (v2) on one machine, for the cluster tests.

The head is a `ray start --head` of `tests/ray_head.py` (own temp dir, free ports, token auth) that
offers no CPU for work and runs Ray's autoscaler over the fake multi-node provider: each "node" the
autoscaler launches is a real raylet, started by the autoscaler's monitor process on this machine.
`ray.cluster_utils.AutoscalingCluster` is not used: its start and shutdown run `ray stop --force`,
which ends every Ray process on the machine. Everything is stopped by process id.

The wheel lacks the provider's defaults file (`fake_multi_node/example.yaml`), which the monitor
reads at start, so the provider is loaded as `type: external` (whose defaults Ray carries in code).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.ray_head import RayHead, start_head, stop_head

WORKER_TYPE = "cpu-worker"
# The Ray node id (and cloud instance id) the provider gives its head, as Ray's own tests do.
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
_FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


@dataclass
class Cluster:
    head: RayHead
    config_file: Path
    worker_cpus: int
    max_workers: int
    idle_timeout_s: float

    @property
    def gcs_address(self) -> str:
        return self.head.gcs_address


def autoscaling_config(
    gcs_address: str, *, worker_cpus: int, max_workers: int, idle_timeout_s: float
) -> dict:
    """A cluster launcher config for the fake provider: a head with no CPU and one worker type."""
    return {
        "cluster_name": "mplug-autoscaling-test",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "external",
            "module": _FAKE_PROVIDER,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
            # The address the head registered: launched raylets join it (default: port 6379).
            "gcs_address": gcs_address,
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                # A small object store per node: every node's shared memory is this machine's.
                "resources": {"CPU": worker_cpus, "object_store_memory": 256 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "auth": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def start_cluster(
    *, worker_cpus: int = 3, max_workers: int = 2, idle_timeout_s: float = 12.0, timeout_s: float = 240.0
) -> Cluster:
    """The head (with the autoscaler's monitor), returned once its Jobs API answers. The config
    names the GCS port the head is about to take, so the port is chosen first."""
    from ray.util import get_node_ip_address

    from tests.gloo import free_port

    gcs_port = free_port()
    # `ray start --node-ip-address 127.0.0.1` registers the machine's address instead: the
    # launched nodes must name that one, or Ray counts two clusters where there is one.
    gcs_address = f"{get_node_ip_address()}:{gcs_port}"
    config_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    config_file = config_dir / f"mplug-autoscaling-{os.getpid()}-{gcs_port}.json"
    config = autoscaling_config(
        gcs_address,
        worker_cpus=worker_cpus,
        max_workers=max_workers,
        idle_timeout_s=idle_timeout_s,
    )
    config_file.write_text(json.dumps(config, indent=1))
    env = {
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
        # Every process of the cluster (the monitor, the nodes it launches, their workers) inherits
        # this. Ray code that finds "the" cluster by scanning the machine's processes (Ray Train's
        # placement-group cleaner) would otherwise also see the test session's own Ray and fail
        # ("Found multiple active Ray instances"); on a real cluster each machine runs one Ray.
        "RAY_ADDRESS": gcs_address,
    }
    # A lost node is declared dead after ~3 s of failed health checks (default ~15 s).
    system_config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    args = [
        "--autoscaling-config", str(config_file), "--object-store-memory", str(256 * 1024**2), "--system-config", json.dumps(system_config),
    ]  # fmt: skip
    try:
        head = start_head(
            num_cpus=0, timeout_s=timeout_s, extra_args=args, extra_env=env, ports={"--port": gcs_port}
        )
    except BaseException:
        config_file.unlink(missing_ok=True)
        raise
    return Cluster(head, config_file, worker_cpus, max_workers, idle_timeout_s)


def stop_cluster(cluster: Cluster) -> None:
    """Every process of the cluster (the head's, the monitor's and each launched node's), by pid."""
    try:
        stop_head(cluster.head)
    finally:
        cluster.config_file.unlink(missing_ok=True)


# ---- what the cluster says -----------------------------------------------------------------------
def _get(cluster: Cluster, path: str, **query: Any) -> Any:
    url = f"{cluster.head.dashboard_url}{path}?{urllib.parse.urlencode(query, doseq=True)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {cluster.head.token}"})
    for attempt in range(5):
        try:
            with urllib.request.urlopen(request, timeout=20) as answer:
                return json.loads(answer.read())
        except urllib.error.URLError:
            # The State API answers 500 while the head is busy (a node lost, a job starting) on a
            # loaded machine: ask again before failing the test on it.
            if attempt == 4:
                raise
            time.sleep(2.0)


def _state_rows(cluster: Cluster, resource: str, **query: Any) -> list[dict]:
    body = _get(cluster, f"/api/v0/{resource}", limit=1000, **query)
    return body["data"]["result"]["result"]


def alive_worker_nodes(cluster: Cluster) -> list[dict]:
    """Live nodes other than the head (the State API's view, `ray list nodes`)."""
    rows = _state_rows(cluster, "nodes")
    return [r for r in rows if r.get("state") == "ALIVE" and not r.get("is_head_node")]


def autoscaler_events(cluster: Cluster) -> list[str]:
    """The autoscaler's cluster events ("Adding 2 node(s) of type cpu-worker.", "Removing …"), read
    from the event log its monitor writes in the head's session folder (one JSON event a line).
    Read from the file, not the State API's cluster_events: after a node's loss that endpoint
    answered HTTP 500 for minutes on this machine, while the file is the events' own record."""
    log = cluster.head.temp_dir / "session_latest" / "logs" / "events" / "event_AUTOSCALER.log"
    if not log.exists():
        return []
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    messages = []
    for i, line in enumerate(lines):
        try:
            messages.append(json.loads(line)["message"])
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            # The last line, caught mid-write: it is read complete on the next look.
    return messages


def alive_actors(cluster: Cluster) -> list[dict]:
    return [r for r in _state_rows(cluster, "actors", detail="true") if r.get("state") == "ALIVE"]


def cluster_status(cluster: Cluster) -> dict:
    """The autoscaler's own report (`ray.autoscaler.v2.sdk.get_cluster_status`, what `ray status`
    prints), as a dict: active/idle/pending nodes by type, launches, failures. Asked from a process
    of its own, holding the cluster's token (this one is connected to another Ray instance)."""
    code = (
        "import dataclasses, json, sys\n"
        "from ray.autoscaler.v2.sdk import get_cluster_status\n"
        "print(json.dumps(dataclasses.asdict(get_cluster_status(sys.argv[1])), default=str))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster.head.token_file))
    done = subprocess.run(
        [sys.executable, "-c", code, cluster.gcs_address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"get_cluster_status failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_node_ids(status: dict) -> set[str]:
    """Ray node ids of the worker-type nodes the autoscaler reports active or idle."""
    nodes = status["active_nodes"] + status["idle_nodes"]
    return {n["node_id"] for n in nodes if n["ray_node_type_name"] == WORKER_TYPE}


def wait_for(what: str, check, timeout_s: float, poll_s: float = 1.0, alive=None):
    """Poll `check()` until it returns something truthy (returned); fail naming `what` after
    `timeout_s` (a guard, generous: the machine may be loaded) or once `alive()` says the process
    the state depends on has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            value = None  # the dashboard is busy or restarting its view: ask again
        if value:
            return value
        if alive is not None and not alive():
            raise AssertionError(f"gave up waiting for {what}: the job ended")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(poll_s)


# ---- losing a node -------------------------------------------------------------------------------
def node_processes(cluster: Cluster, node_id: str) -> list[psutil.Process]:
    """The raylet of a launched node and everything under it (its workers and agents). The fake
    provider starts each node's processes with RAY_OVERRIDE_NODE_ID_FOR_TESTING=<its node id>."""
    marker = str(cluster.head.temp_dir)
    raylets = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "raylet" not in (proc.info["name"] or "") or not any(marker in a for a in cmdline):
                continue
            if proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                raylets.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found = {}
    for raylet in raylets:
        found[raylet.pid] = raylet
        try:
            found.update({p.pid: p for p in raylet.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def preempt_node(cluster: Cluster, node_id: str) -> int:
    """The node vanishes as a reclaimed spot instance does: its raylet and every process under it
    SIGKILLed at once, nothing shut down cleanly. Returns the number of processes killed."""
    procs = node_processes(cluster, node_id)
    if not procs:
        raise AssertionError(f"no raylet of node {node_id} found under {cluster.head.temp_dir}")
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=10)
    return len(procs)
