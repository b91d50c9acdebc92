"""Single-GPU pretraining throughput and MFU: `base` at 256 px, bf16, the largest batch that fits.

The one prepared script for a lent GPU. It trains the model of a shipped job config (preset and
overrides, image size) with the job's optimizer, all four objectives, momentum update and
queue, on batches already on the device (data loading is measured elsewhere:
`train_overhead.py`, `stream_throughput.py`). It finds the largest per-GPU batch that fits by
doubling, then bisecting, then times `--steps` steps after `--warmup`, and prints samples/s
and MFU = `mplug.flops.pretraining_step_flops` × samples/s ÷ the GPU's dense bf16 peak.

    python benchmarks/gpu_train_throughput.py                         # base, 256 px, bf16
    python benchmarks/gpu_train_throughput.py --config pretrain_large --max-batch 512
    python benchmarks/gpu_train_throughput.py --config pretrain_tiny --device cpu --start-batch 4 --max-batch 8  # smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(config: str, device: torch.device, gradient_checkpointing: bool):
    from jobs.cli import resolve_config
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config
    from pipelines.train.launch import build_model_config
    from pipelines.train.optim import build_job_optimizer

    job = load_config(resolve_config(config))
    cfg = build_model_config(job)
    task = task_class(job.task)(job, cfg)
    model = task.build_model().to(device).train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # The schedule length is irrelevant to throughput; long enough never to end.
    optimizer, scheduler = build_job_optimizer(model, job.optim, total_steps=10**6)
    return job, cfg, task, model, optimizer, scheduler


def train_steps(task, model, optimizer, scheduler, batch: dict, steps: int, bf16: bool) -> None:
    """`steps` of the training loop's own `train_step` (distillation at full α)."""
    from pipelines.tasks.base import StepContext
    from pipelines.train.step import train_step

    for i in range(steps):
        ctx = StepContext(step=10**6 + i, epoch=1, steps_per_epoch=1)
        train_step(model, task, [batch], optimizer, scheduler, ctx, grad_clip=5.0,
                   precision="bf16" if bf16 else "fp32")  # fmt: skip


def fits(task, model, optimizer, scheduler, batch_size: int, bf16: bool) -> bool:
    """Two training steps at `batch_size` without running out of device memory."""
    device = next(model.parameters()).device
    try:
        train_steps(task, model, optimizer, scheduler, task.example_batch(batch_size, device=device), 2, bf16)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def largest_batch(task, model, optimizer, scheduler, start: int, limit: int, bf16: bool) -> int:
    """Double from `start` until a batch fails or `limit` is reached, then bisect."""
    ok, bad, b = 0, None, start
    while b <= limit:
        if not fits(task, model, optimizer, scheduler, b, bf16):
            bad = b
            break
        ok, b = b, b * 2
        print(f"  batch {ok} fits", flush=True)
    if ok == 0:
        raise SystemExit(f"even batch {start} does not fit")
    if bad is None:
        return ok
    while bad - ok > max(1, ok // 16):
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(task, model, optimizer, scheduler, mid, bf16) else (ok, mid)
        print(f"  bisect: fits {ok}, fails {bad}", flush=True)
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pretrain_base", help="a shipped job config name or a YAML path")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--batch-size", type=int, help="skip the search and use this per-GPU batch")
    p.add_argument("--start-batch", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()

    from mplug import flops
    from pipelines.train.metrics import peak_flops

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = args.precision == "bf16"
    job, cfg, task, model, optimizer, scheduler = build(args.config, device, args.gradient_checkpointing)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.config}: {cfg.image_size} px, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {name}"
    )
    batch = args.batch_size or largest_batch(
        task, model, optimizer, scheduler, args.start_batch, args.max_batch, bf16
    )

    inputs = task.example_batch(batch, device=device)
    train_steps(task, model, optimizer, scheduler, inputs, args.warmup, bf16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    train_steps(task, model, optimizer, scheduler, inputs, args.steps, bf16)
    sync()
    elapsed = time.perf_counter() - t0

    samples_per_s = batch * args.steps / elapsed
    # Pretraining's ITC cost grows with the batch (and the queue): count it at this batch.
    per_sample = (
        flops.pretraining_step_flops(cfg, batch_size=batch)
        if job.task == "pretrain"
        else task.flops_per_sample()
    )
    peak = peak_flops(device)
    result = {
        "config": args.config,
        "device": name,
        "image_size": cfg.image_size,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "batch_size": batch,
        "samples_per_s": samples_per_s,
        "step_s": elapsed / args.steps,
        "gflop_per_sample": per_sample / 1e9,
        "achieved_tflops": per_sample * samples_per_s / 1e12,
        "mfu": per_sample * samples_per_s / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
