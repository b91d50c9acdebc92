"""AdamW with mPLUG's two learning rates, and the warmup-then-cosine schedule.

Official recipe: the vision tower trains at a lower rate than the rest (1e-5 vs 1e-4 for
pretraining); biases and norm weights get no weight decay.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pipelines.train.config import OptimSection

VISUAL_PREFIXES = ("visual_encoder.", "visual_adapter.")


def _strip_wrappers(name: str) -> str:
    # DDP prefixes "module.", torch.compile prefixes "_orig_mod."; FSDP2 keeps names.
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def param_groups(model: nn.Module, lr: float, visual_lr: float, weight_decay: float) -> list[dict]:
    """Four groups: {visual, rest} × {decay, no decay}. Frozen (momentum) params are left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _strip_wrappers(name)
        visual = name.startswith(VISUAL_PREFIXES)
        # Biases, LayerNorm weights, embeddings' scalars: 1-D tensors. Temperature is 0-D.
        no_decay = param.ndim <= 1
        groups.setdefault((visual, no_decay), []).append(param)
    out = []
    for (visual, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": visual_lr if visual else lr,
                "base_lr": visual_lr if visual else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"{'visual' if visual else 'text'}{'_no_decay' if no_decay else ''}",
            }
        )
    return out


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1, then cosine from 1 down to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    visual_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    total_steps: int,
    min_lr: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, lr, visual_lr, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    # Each group decays to min_lr (not min_lr × its own ratio), as the official cosine scheduler.
    lambdas = [
        (
            lambda step, base=g["base_lr"]: lr_factor(
                step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min(1.0, min_lr / base)
            )
        )
        for g in groups
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return optimizer, scheduler


def build_job_optimizer(
    model: nn.Module, optim: OptimSection, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """`build_optimizer` with a job config's `optim` section (the trainer and benchmarks)."""
    return build_optimizer(
        model,
        lr=optim.lr,
        visual_lr=optim.visual_lr,
        weight_decay=optim.weight_decay,
        betas=optim.betas,
        warmup_steps=optim.warmup_steps,
        total_steps=total_steps,
        min_lr=optim.min_lr,
    )
