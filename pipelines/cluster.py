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
    return _info(ray, local=False)


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
