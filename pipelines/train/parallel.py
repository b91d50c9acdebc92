"""Apply data parallelism to a model built by `mplug/` (which knows nothing of it).

Order matters and is fixed: move to device → activation checkpointing (inside the model, via
its HF switch) → shard/wrap. FSDP2 shards every transformer block first, then the root, so
each block's parameters are gathered only while that block runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

# Module-list attribute names whose children are transformer blocks (timm ViT, BERT, ours).
_BLOCK_LIST_NAMES = ("blocks", "layer", "layers", "resblocks")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES:
            blocks.extend(module)
    return blocks


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP kwargs: no buffer broadcast before every forward. The ITC queues (128 MB at base)
    stay identical on every rank because `momentum_update` enqueues the same gathered features
    everywhere. torch ≥ 2.13 names this `forward_sync_buffers` (and still syncs buffers once at
    init); older releases only have `broadcast_buffers`."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


def parallelize(
    model: nn.Module,
    *,
    strategy: Literal["ddp", "fsdp"],
    device: torch.device,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Wrap `model` for the current process group; a single process gets the bare model. A model
    with ITC (`set_feature_gather`) gathers its momentum keys over the group."""
    model = model.to(device)
    if _world_size() == 1:
        return model
    if hasattr(model, "set_feature_gather"):
        from pipelines.distributed import gather_features

        model.set_feature_gather(gather_features)
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=device_ids,
            find_unused_parameters=find_unused_parameters,
            **_no_forward_buffer_sync(),
        )
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        # FSDP2 finds its root at the first root forward; `unsharded` calls towers before any
        # (momentum keys of a step's first micro-batches, evaluation), so settle it now.
        model._get_fsdp_state()._lazy_init()
        return model
    raise ValueError(f"strategy={strategy!r}: expected 'ddp' or 'fsdp'")


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps (DDP:
    `no_sync`; FSDP2: `set_requires_gradient_sync`); a bare model has nothing to skip."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The module `mplug/` built (DDP hides it under `.module`; FSDP2 keeps the class)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full, CPU state dict on every rank (FSDP2 shards are gathered)."""
    inner = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded the model's parameters (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters())


def full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state that any world size can load (FSDP2: gathered to full tensors)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(unwrap(model), optimizer, options=opts)
    return optimizer.state_dict()


def load_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(unwrap(model), optimizer, state, options=opts)
        return
    optimizer.load_state_dict(state)


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """The bare module with every parameter usable, for calls that bypass the root `forward`
    (momentum keys before a step's micro-batches, evaluation, generation).

    FSDP2 gathers a block's parameters in that block's own forward hook, but the root's (the
    parameters outside every block: embeddings, projections, heads) only inside the root's
    forward: here they are gathered for the duration and resharded after. DDP and a bare model
    need nothing."""
    inner = unwrap(model)
    if not is_sharded(model):
        yield inner
        return
    inner.unshard()
    try:
        yield inner
    finally:
        inner.reshard()


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """The bare module with EVERY parameter gathered on every rank for the duration, and no
    collective in its forwards: for work whose number of forwards differs between ranks (beam
    search stops when its beams end, at another step on each rank), which sharded forwards, each
    an all-gather every rank must join, cannot follow. Costs a full copy of the parameters on
    each rank while it lasts. DDP and a bare model need nothing."""
    inner = unwrap(model)
    if not is_sharded(model):
        yield inner
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in inner.modules() if isinstance(m, FSDPModule)]
    # Keep every module unsharded after its forward; put each group's setting back after.
    saved = [(g, g.post_forward_mesh_info) for m in sharded for g in m._get_fsdp_state()._fsdp_param_groups]
    inner.set_reshard_after_forward(False)
    for module in sharded:  # the same modules in the same order on every rank: matched all-gathers
        module.unshard()
    try:
        yield inner
    finally:
        for module in sharded:
            module.reshard()
        for group, mesh_info in saved:
            group.post_forward_mesh_info = mesh_info
