"""Connecting to (or starting) the Ray cluster a command runs on."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

# On a small machine a Train worker group reserves every CPU and Ray Data's tasks then wait
# forever with no error. Local clusters therefore advertise more logical CPUs than cores:
# the work is I/O- and PyTorch-bound, and oversubscription only costs some context switches.
LOCAL_CPU_OVERSUBSCRIPTION = 4
MIN_LOCAL_LOGICAL_CPUS = 8


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    local: bool
    cpus: float
    gpus: float


def local_logical_cpus() -> int:
    return max(MIN_LOCAL_LOGICAL_CPUS, (os.cpu_count() or 1) * LOCAL_CPU_OVERSUBSCRIPTION)


def init_ray(address: str | None = None, *, quiet: bool = False, num_cpus: int | None = None) -> ClusterInfo:
    """Join `address` (or $RAY_ADDRESS); with neither, start a local instance sized not to starve.

    `address="local"` always starts a fresh local instance.
    """
    import ray

    from pipelines.driver_logs import install_replay_filter

    install_replay_filter()  # worker lines once, where several nodes share a log folder
    if ray.is_initialized():
        return _info(ray, local=False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    # The dashboard serves the State API, which Ray Train's placement-group cleaner polls: without
    # it, workers of stopped trials keep their placement groups and it logs a warning a second.
    kwargs: dict = {"log_to_driver": not quiet}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    if address in (None, "local"):
        ray.init(
            num_cpus=num_cpus or local_logical_cpus(),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **kwargs,
        )
        return _info(ray, local=True)
    ray.init(address=address, **kwargs)
    keep_cluster_actors_here()
    return _info(ray, local=False)


# Ray Data's and Ray Train's cluster-wide actors: detached, one per cluster, 0 CPU, and placed for
# good on the node of the process that first asks for one. Left to themselves they start inside a
# training worker (a rank's data stream, a Tune trial's Train controller), and on an autoscaling
# cluster that worker node then never counts as idle and is never scaled down. (module, function)
# of Ray's own get-or-create; the usage actor only exists while Ray's usage stats are on.
_CLUSTER_ACTORS = (
    ("ray.data._internal.stats", "get_or_create_stats_actor"),
    ("ray.data._internal.stats_summary_actor", "_get_or_create_stats_summary_actor"),
    (
        "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator",
        "get_or_create_autoscaling_coordinator",
    ),
)
_USAGE_ACTOR = ("ray.data._internal.usage.actor", "get_or_create_usage_collection_actor")


def keep_cluster_actors_here() -> list[str]:
    """Create Ray's cluster-wide actors from this driver, so they live on its node (a submitted job's
    driver runs on the head) instead of pinning whichever worker node asks first. An actor that
    already exists is left where it is. Returns the names of those Ray lacks (another Ray version),
    each logged as a warning: its actor may then keep a worker node from scaling down."""
    import importlib

    wanted = list(_CLUSTER_ACTORS)
    try:
        from ray.data._internal.usage.collector import usage_collection_disabled

        if not usage_collection_disabled():
            wanted.append(_USAGE_ACTOR)
    except ImportError:
        wanted.append(_USAGE_ACTOR)
    missing = []
    for module, function in wanted:
        try:
            get_or_create = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{function}")
            continue
        get_or_create()
    for name in missing:
        logging.getLogger(__name__).warning(
            f"this Ray has no {name}: the actor it made may keep a worker node of an autoscaling cluster "
            "from scaling down (docs/clusters.md, scale-down)"
        )
    return missing


def _info(ray, *, local: bool) -> ClusterInfo:
    res = ray.cluster_resources()
    ctx = ray.get_runtime_context()
    return ClusterInfo(
        address=getattr(ctx, "gcs_address", "") or "",
        local=local,
        cpus=float(res.get("CPU", 0)),
        gpus=float(res.get("GPU", 0)),
    )


def quiet_ray_data() -> None:
    """Progress bars off (tests, logs); the CLI leaves them on so long work shows progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
