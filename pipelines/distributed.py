"""The collectives that evaluation and the contrastive objective need, over torch.distributed
when a process group is up and trivially in one process. Tasks and the model library take them
as arguments, so neither imports torch.distributed (the training loop and the evaluation pick
the implementation)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _group_up() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Collective:
    """One process: gathering and broadcasting are identities."""

    rank: int = 0
    world: int = 1

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (what the other ranks pass is ignored)."""
        return obj


class TorchCollective(Collective):
    """Over the default process group (Ray Train's, gloo on CPU, NCCL on GPU); one process when
    there is none. Objects are pickled: send rows and arrays, not models."""

    def __init__(self) -> None:
        up = _group_up()
        self.rank = dist.get_rank() if up else 0
        self.world = dist.get_world_size() if up else 1

    def gather(self, obj: Any) -> list[Any] | None:
        if self.world == 1:
            return [obj]
        parts: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0)
        return parts

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def gather_features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather a no-grad feature batch across data-parallel ranks -> (concatenated, offset of
    this rank's rows): ITC's momentum keys. Identity in one process. Ranks must hold equal batch
    sizes (the training order deals equal steps)."""
    if not _group_up():
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]
