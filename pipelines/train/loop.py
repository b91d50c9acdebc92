"""The pretraining loop every Ray Train worker runs (one per data-parallel rank)."""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipelines.train.checkpoint import TrainState, load_state, save_state
from pipelines.train.config import PretrainConfig
from pipelines.train.metrics import StepMeter, format_step_line, peak_flops
from pipelines.train.optim import build_job_optimizer
from pipelines.train.parallel import (
    full_optim_state,
    full_state_dict,
    gradient_sync,
    load_optim_state,
    parallelize,
    unwrap,
)

# Worker lines go through logging, not print: Ray Train V2 tees a worker's print to both stdout
# and its logger, so every printed line reached the driver twice. Its worker root logger writes
# INFO to the console (forwarded to the driver once) and to the run's structured app log.
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPlan:
    """What the driver works out once, before any worker starts."""

    job: dict  # PretrainConfig.model_dump()
    model_config: dict  # MPlugConfig.to_dict(), overrides applied
    total_steps: int
    alpha_ramp_steps: int  # distillation α ramps up over the first epoch, as the official code
    run_uri: str  # STORAGE/RUN: where metrics.csv, curves.png and final/ go
    flops_per_sample: float  # model FLOPs of one training sample (forward + backward)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def synced_batches(batches: Iterable[dict], device: torch.device) -> Iterator[dict]:
    """Yield batches while EVERY rank still has one.

    Shards are complete, not equal (see `train_data_config`): one rank may run out a batch
    early. A rank that stopped alone would leave the others blocked in DDP's all-reduce, so all
    ranks agree each step (one 1-element all-reduce) and end the epoch together.
    """
    distributed = dist.is_available() and dist.is_initialized()
    it = iter(batches)
    while True:
        batch = next(it, None)
        if distributed:
            flag = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if int(flag.item()) == 0:
                return
        elif batch is None:
            return
        yield batch


def train_loop_per_worker(plan_dict: dict) -> None:
    import ray.train
    import ray.train.torch

    from mplug import MPlugConfig, MPlugForPretraining, init_text_from_bert

    plan = TrainPlan(**plan_dict)
    job = PretrainConfig.model_validate(plan.job)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # The same initial weights and ITC queues on every rank: FSDP2 shards each rank's own
    # init without a broadcast (DDP would broadcast rank 0's, but need not).
    _seed(job.run.seed)
    model = MPlugForPretraining(MPlugConfig.from_dict(plan.model_config))
    _seed(job.run.seed * 1000 + rank)  # per-rank masks, negatives and augmentation
    if job.model.init_text_from_packaged_bert:
        from mplug.tokenizer import packaged_model_dir

        init_text_from_bert(model, packaged_model_dir())
    if job.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    state, optim_state = TrainState(world_size=world, strategy=job.scaling.strategy), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            loaded = load_state(Path(d), rank=rank)
        model.load_state_dict(loaded.model_state)
        state, optim_state = loaded.state, loaded.optim_state
        state.resumed_from.append(state.step)
        state.world_size = world
        if rank == 0:
            log.info(f"[mplug] resumed from step {state.step} (checkpoint {checkpoint.path})")

    cfg = model.config
    objectives_off = not all((cfg.use_itc, cfg.use_itm, cfg.use_mlm, cfg.use_prefix))
    model = parallelize(
        model, strategy=job.scaling.strategy, device=device, find_unused_parameters=objectives_off
    )
    optimizer, scheduler = build_job_optimizer(model, job.optim, plan.total_steps)
    if optim_state is not None:
        load_optim_state(model, optimizer, optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])

    if rank == 0:
        log.info(
            f"[mplug] {world} worker(s) on {device}, {torch.get_num_threads()} torch threads each, "
            f"{plan.total_steps} steps of {job.data.batch_size * job.optim.grad_accum_steps * world} samples"
        )
    peak = peak_flops(device)
    accum = job.optim.grad_accum_steps
    global_batch = job.data.batch_size * accum * world
    shard = ray.train.get_dataset_shard("train")
    meter, loss_sums, window_steps, micro = StepMeter(), {}, 0, 0
    model.train()

    while state.step < plan.total_steps:
        batches = shard.iter_torch_batches(
            batch_size=job.data.batch_size,
            drop_last=True,
            device=device,
            local_shuffle_buffer_size=job.data.local_shuffle_buffer or None,
            local_shuffle_seed=job.run.seed * 1000 + state.epoch * 10 + rank,
        )
        meter.batch_arrived()
        step_at_epoch_start = state.step
        for batch in synced_batches(batches, device):
            meter.batch_arrived()
            alpha = cfg.distill_alpha * min(1.0, state.step / max(1, plan.alpha_ramp_steps))
            last_micro = micro == accum - 1
            with gradient_sync(model, last_micro), _autocast(device, job.scaling.precision):
                out = model(
                    images=batch["image"],
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    alpha=alpha,
                )
                (out.loss / accum).backward()
            for name in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_prefix"):
                loss_sums[name] = loss_sums.get(name, 0.0) + float(getattr(out, name).detach()) / accum
            micro += 1
            if not last_micro:
                continue
            micro = 0
            grad_norm = None
            if job.optim.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            unwrap(model).momentum_update(out)
            state.step += 1
            window_steps += 1
            state.samples_seen += global_batch
            meter.step_done(global_batch)

            final = state.step >= plan.total_steps
            if state.step % job.run.log_every == 0 or final or state.step % job.run.checkpoint_every == 0:
                row = {"step": float(state.step), "epoch": float(state.epoch), "alpha": alpha}
                row.update({k: v / window_steps for k, v in loss_sums.items()})
                row["lr"] = scheduler.get_last_lr()[-1]
                row.update(meter.window())
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                if peak is not None:
                    row["mfu"] = plan.flops_per_sample * row["samples_per_s"] / (peak * world)
                loss_sums, window_steps = {}, 0
                state.history.append(row)
                if rank == 0:
                    log.info("[mplug] " + format_step_line(row, plan.total_steps))
                _report(model, optimizer, scheduler, state, rank, row, job, final)
            if final:
                break
        if state.step == step_at_epoch_start and state.step < plan.total_steps:
            raise RuntimeError(
                f"rank {rank}: a whole epoch gave no optimizer step: the shard has fewer than "
                f"batch_size × grad_accum_steps = {job.data.batch_size * accum} rows; lower data.batch_size"
            )
        state.epoch += 1

    _export_final(model, state, plan, rank)


def storage_run_uri(job: PretrainConfig) -> str:
    from pipelines import storage

    return storage.join(job.run.storage, job.run.name)


def _report(model, optimizer, scheduler, state: TrainState, rank: int, row: dict, job, final: bool) -> None:
    import ray.train

    metrics = {k: float(v) for k, v in row.items()}
    if not (final or state.step % job.run.checkpoint_every == 0):
        ray.train.report(metrics)
        return
    # Every rank gathers (FSDP needs all ranks); only rank 0 writes the model and optimizer.
    model_state = full_state_dict(model)
    optim_state = {"optimizer": full_optim_state(model, optimizer), "scheduler": scheduler.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        save_state(
            Path(tmp),
            rank=rank,
            model_state=model_state if rank == 0 else None,
            optim_state=optim_state if rank == 0 else None,
            state=state,
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{state.step:08d}",
        )
    if rank == 0:
        _write_curves(state, storage_run_uri(job))


def _write_curves(state: TrainState, run_uri: str) -> None:
    from pipelines import storage
    from pipelines.train.checkpoint import history_to_csv
    from pipelines.train.metrics import plot_curves_png

    storage.write_text(storage.join(run_uri, "metrics.csv"), history_to_csv(state.history))
    storage.write_bytes(
        storage.join(run_uri, "curves.png"),
        plot_curves_png(state.history, run_uri.rstrip("/").rsplit("/", 1)[-1]),
    )


def _export_final(model, state: TrainState, plan: TrainPlan, rank: int) -> None:
    """`save_pretrained` into STORAGE/RUN/final/ so `from_pretrained` and finetuning start there."""
    from pipelines import storage

    full = full_state_dict(model)  # a collective under FSDP: every rank takes part
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        unwrap(model).save_pretrained(tmp, state_dict=full)
        final_uri = storage.join(plan.run_uri, "final")
        for path in sorted(Path(tmp).iterdir()):
            storage.write_bytes(storage.join(final_uri, path.name), path.read_bytes())
    log.info(f"[mplug] exported final model (step {state.step}) to {storage.join(plan.run_uri, 'final')}")
