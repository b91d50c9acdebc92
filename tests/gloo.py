"""Run a function on N CPU processes joined in one gloo process group, as data-parallel ranks."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, fn: Callable, world: int, port: int, results: dict, args: tuple, timeout_s: float
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))  # fmt: skip
    try:
        results[rank] = fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """`fn(rank, *args)` on `world` spawned processes; returns each rank's (picklable) result.
    `fn` must be importable (a module-level function), as spawn pickles it by name. A collective
    that waits longer than `timeout_s` (ranks that disagree) fails instead of hanging."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        shared = manager.dict()
        mp.start_processes(
            _rank_main,
            args=(fn, world, free_port(), shared, args, timeout_s),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [shared[r] for r in range(world)]
