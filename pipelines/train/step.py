"""THE training step: one optimizer step of any task over its micro-batches.

The Ray Train loop, the tests and the benchmarks all call `train_step`, so what they measure
and check is what trains.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines.tasks.base import StepContext, Task
from pipelines.train.parallel import gradient_sync, unwrap


def autocast(device: torch.device, precision: str):
    """bf16 autocast for `precision` "bf16", or "auto" on a GPU; otherwise full precision."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@dataclass
class StepResult:
    """What one step logs: mean over micro-batches of each logged value, as detached tensors
    (read them with `.item()` only at log steps: every read is a host sync on a GPU), and the
    gradient norm before clipping when clipping is on."""

    values: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None


def train_step(
    model: nn.Module,
    task: Task,
    micro_batches: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: StepContext,
    *,
    grad_clip: float | None = None,
    precision: str = "fp32",
) -> StepResult:
    """Forward/backward every micro-batch (gradients synced on the last only), clip, step the
    optimizer and the schedule, then the task's post-step update (momentum encoders, queues).

    The loss of each micro-batch is divided by their number, so accumulating k micro-batches
    of b rows gives the gradient of one batch of k·b rows for losses that are per-row means.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    device = next(model.parameters()).device
    n = len(micro_batches)
    with autocast(device, precision):
        prepared = task.prepare_step(model, micro_batches, ctx)
    sums: dict[str, torch.Tensor] = {}
    output = None
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, i == n - 1), autocast(device, precision):
            loss, values, output = task.loss(model, batch, i, prepared, ctx)
            (loss / n).backward()
        for name, value in values.items():
            value = value.detach().float() / n
            sums[name] = sums[name] + value if name in sums else value
    grad_norm = None
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    task.after_step(unwrap(model), prepared, output)
    return StepResult(sums, grad_norm)
