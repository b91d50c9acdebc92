"""The one training loop every Ray Train worker runs (one per data-parallel rank), for
pretraining and every finetuning task alike: the task (`pipelines/tasks`) supplies the model,
the step's losses and the evaluation; this loop supplies the rest (weights, resume, data,
accumulation, logging, evaluation schedule, checkpoints, the exported model)."""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipelines.data.stream import collate_rows
from pipelines.tasks.base import StepContext, Task
from pipelines.train.checkpoint import TrainState, load_state, save_state
from pipelines.train.config import TrainConfig
from pipelines.train.metrics import StepMeter, format_step_line, peak_flops
from pipelines.train.optim import build_job_optimizer
from pipelines.train.parallel import full_optim_state, full_state_dict, load_optim_state, parallelize, unwrap
from pipelines.train.step import autocast, train_step

# Worker lines go through logging, not print: Ray Train V2 tees a worker's print to both stdout
# and its logger, so every printed line reached the driver twice. Its worker root logger writes
# INFO to the console (forwarded to the driver once) and to the run's structured app log.
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPlan:
    """What the driver works out once, before any worker starts (`launch.plan_run`)."""

    task: str
    job: dict  # TrainConfig.model_dump()
    model_config: dict  # MPlugConfig.to_dict(), overrides applied
    total_steps: int
    steps_per_epoch: int
    run_uri: str  # STORAGE/RUN: where metrics.csv, curves.png and final/ go
    flops_per_sample: float  # model FLOPs of one training sample (forward + backward)
    train_rows: int
    eval_rows: int
    global_batch: int
    weight_sources: list[str] = field(default_factory=list)  # one line per source, in load order


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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


def build_task(plan: TrainPlan) -> Task:
    from mplug import MPlugConfig
    from pipelines.tasks import task_class

    job = TrainConfig.model_validate(plan.job)
    return task_class(plan.task)(job, MPlugConfig.from_dict(plan.model_config))


def train_loop_per_worker(config: dict) -> None:
    """`config`: {"plan": TrainPlan fields, "chunks": an object ref to the training data's
    chunks (`pipelines/data/order.py`), "transform_tasks": this rank's transform tasks}."""
    import ray
    import ray.train
    import ray.train.torch

    from pipelines.train.init import load_initial_weights

    plan = TrainPlan(**config["plan"])
    chunks = ray.get(config["chunks"])
    task = build_task(plan)
    job = task.job
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # The same initial weights and ITC queues on every rank: FSDP2 shards each rank's own
    # init without a broadcast (DDP would broadcast rank 0's, but need not).
    _seed(job.run.seed)
    model = task.build_model()
    state, optim_state = TrainState(world_size=world, strategy=job.scaling.strategy), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # the checkpoint holds every weight: no init source is read
        with checkpoint.as_directory() as d:
            loaded = load_state(Path(d), rank=rank)
        model.load_state_dict(loaded.model_state)
        state, optim_state = loaded.state, loaded.optim_state
        state.resumed_from.append(state.step)
        state.world_size = world
        if rank == 0:
            log.info(f"[mplug] resumed from step {state.step} (checkpoint {checkpoint.path})")
    else:
        for line in load_initial_weights(model, job.model) + task.after_initial_weights(model):
            if rank == 0:
                log.info(f"[mplug] {line}")
    _seed(job.run.seed * 1000 + rank)  # per-rank masks, negatives and augmentation
    if job.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    model = parallelize(
        model, strategy=job.scaling.strategy, device=device, find_unused_parameters=task.unused_parameters
    )
    optimizer, scheduler = build_job_optimizer(model, job.optim, plan.total_steps)
    if optim_state is not None:
        load_optim_state(model, optimizer, optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])

    accum = job.optim.grad_accum_steps
    if rank == 0:
        log.info(
            f"[mplug] task {task.name}: {world} worker(s) on {device}, {torch.get_num_threads()} torch "
            f"threads each, {plan.total_steps} steps of {plan.global_batch} samples"
        )
    peak = peak_flops(device)
    eval_shard = ray.train.get_dataset_shard("eval") if plan.eval_rows else None
    meter, window, window_steps = StepMeter(), {}, 0
    latest_eval: dict[str, float] = {}  # carried in every later report (not in the history)
    exported = False  # final/ written (at the last step, before its report)
    if eval_shard is not None and job.run.eval_at_start:
        row = {"step": float(state.step), "epoch": float(state.epoch)}
        latest_eval = _evaluate(model, task, eval_shard, job, device, rank)
        state.history.append({**row, **latest_eval})
        _report(model, optimizer, scheduler, state, rank, {**row, **latest_eval}, plan, checkpoint=False)
    model.train()

    samples = SampleLog(plan.run_uri, rank) if job.run.log_sample_keys else None
    # A resumed run continues its epoch where the checkpoint was taken: each rank's rows of an
    # epoch are a fixed sequence, so it skips the rows its steps have already trained on.
    skip_rows = (state.step - state.epoch_start_step) * job.data.batch_size * accum
    if skip_rows and state.world_size != world:
        skip_rows = 0  # another worker count deals the chunks otherwise: the epoch restarts
    while state.step < plan.total_steps:
        batches = _epoch_batches(
            task, job, chunks, state.epoch, rank, world, skip_rows, config["transform_tasks"]
        )
        batches = (to_device(b, device) for b in batches)
        meter.restart()
        step_at_epoch_start, micro = state.epoch_start_step if skip_rows else state.step, []
        state.epoch_start_step, skip_rows = step_at_epoch_start, 0
        for batch in synced_batches(batches, device):
            if samples is not None:
                samples.add(state.epoch, batch["key"])
            micro.append(batch)
            if len(micro) < accum:
                continue
            meter.batch_arrived()  # the wait covers every micro-batch of the step
            step_ctx = StepContext(state.step, state.epoch, plan.steps_per_epoch)
            result = train_step(
                model, task, micro, optimizer, scheduler, step_ctx,
                grad_clip=job.optim.grad_clip, precision=job.scaling.precision,
            )  # fmt: skip
            micro = []
            state.step += 1
            state.samples_seen += plan.global_batch
            meter.step_done(plan.global_batch)
            for name, value in result.values.items():
                window[name] = window[name] + value if name in window else value
            window_steps += 1

            final = state.step >= plan.total_steps
            if state.step % job.run.log_every == 0 or final or state.step % job.run.checkpoint_every == 0:
                # Epochs of data seen (fractional), the time Tune's ASHA schedules by.
                done = min(1.0, (state.step - step_at_epoch_start) / plan.steps_per_epoch)
                row = {"step": float(state.step), "epoch": state.epoch + done}
                row.update({k: float(v.item()) / window_steps for k, v in window.items()})  # the host sync
                row["lr"] = scheduler.get_last_lr()[-1]
                row.update(meter.window())
                if result.grad_norm is not None:
                    row["grad_norm"] = float(result.grad_norm.item())
                if peak is not None:
                    row["mfu"] = plan.flops_per_sample * row["samples_per_s"] / (peak * world)
                window, window_steps = {}, 0
                if final and eval_shard is not None:
                    latest_eval = _evaluate(model, task, eval_shard, job, device, rank)
                    row.update(latest_eval)
                state.history.append(row)
                if rank == 0:
                    log.info("[mplug] " + format_step_line(row, plan.total_steps))
                if final:
                    # Export before the last report: a Tune scheduler that sees the run reach its
                    # time budget (ASHA's max_t) stops the trial on that report, before the loop ends.
                    _export_final(model, state, plan, rank)
                    exported = True
                _report(model, optimizer, scheduler, state, rank, {**latest_eval, **row}, plan, checkpoint=True,
                        samples=samples)  # fmt: skip
            if final:
                break
        if state.step == step_at_epoch_start and state.step < plan.total_steps:
            raise RuntimeError(
                f"rank {rank}: a whole epoch gave no optimizer step: the shard has fewer than "
                f"batch_size × grad_accum_steps = {job.data.batch_size * accum} rows; lower data.batch_size"
            )
        state.epoch += 1
        if (
            state.step < plan.total_steps
            and eval_shard is not None
            and state.epoch % job.run.eval_every_epochs == 0
        ):
            row = {"step": float(state.step), "epoch": float(state.epoch)}
            row.update(_evaluate(model, task, eval_shard, job, device, rank))
            state.history.append(row)
            _report(model, optimizer, scheduler, state, rank, row, plan, checkpoint=False)

    if not exported:
        _export_final(model, state, plan, rank)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of a collated batch onto the device; ids stay host-side."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _evaluate(
    model, task: Task, shard, job: TrainConfig, device: torch.device, rank: int
) -> dict[str, float]:
    """The task's metrics on the eval split: each rank predicts its shard, rank 0 scores them
    all. Every rank returns the same dict (`eval_<metric>`) after one broadcast."""
    eval_model = _eval_copy(model, task, device)
    predictions: list[dict] = []
    with torch.no_grad(), autocast(device, job.scaling.precision):
        for batch in shard.iter_torch_batches(
            batch_size=job.data.eval_batch_size or job.data.batch_size, collate_fn=collate_rows
        ):
            predictions.extend(task.predict(eval_model, to_device(batch, device)))
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, predictions)
        predictions = [p for part in parts for p in part]
    metrics: list = [None]
    if rank == 0:
        with torch.no_grad():
            scored = task.score(predictions, eval_model, task.eval_setup(job.data.eval_uris))
        metrics[0] = {f"eval_{k}": float(v) for k, v in scored.items() if v is not None}
    if distributed:
        dist.broadcast_object_list(metrics, src=0)
    model.train()
    if rank == 0:
        log.info(f"[mplug] eval {task.primary_metric} {metrics[0][f'eval_{task.primary_metric}']:.3f}")
    return metrics[0]


def _eval_copy(model, task: Task, device: torch.device):
    """The model to evaluate with: the bare module, or under FSDP2 a gathered full copy (an
    evaluation generates different lengths on each rank, which sharded collectives cannot follow)."""
    from pipelines.train.parallel import is_sharded

    if not is_sharded(model):
        return unwrap(model).eval()
    state = full_state_dict(model)  # a collective: every rank takes part
    copy = task.build_model()
    copy.load_state_dict(state)
    return copy.to(device).eval()


def _epoch_batches(task: Task, job: TrainConfig, chunks, epoch: int, rank: int, world: int, skip_rows: int,
                   transform_tasks: int):  # fmt: skip
    """This rank's training batches of `epoch`, in the fixed order (`pipelines/data/order.py`)."""
    from pipelines.data.order import rank_windows
    from pipelines.data.stream import image_row_bytes, rank_epoch_dataset

    cfg = task.model_config
    window = max(1, job.data.local_shuffle_buffer // max(1, max(c.rows for c in chunks)))
    windows = rank_windows(chunks, seed=job.run.seed, epoch=epoch, rank=rank, world=world, window=window,
                           skip_rows=skip_rows)  # fmt: skip
    ds = rank_epoch_dataset(
        windows, task.transform(train=True), columns=task.columns, seed=job.run.seed, epoch=epoch,
        batch_size=job.data.batch_size, transform_tasks=transform_tasks,
        row_bytes=image_row_bytes(cfg.image_size, cfg.max_text_len, getattr(task, "images_per_row", 1)),
    )  # fmt: skip
    # Tensors, plus ids where a task needs them (SCST's image ids) and the row keys.
    return ds.iter_torch_batches(batch_size=job.data.batch_size, drop_last=True, collate_fn=collate_rows)


class SampleLog:
    """`run.log_sample_keys`: the keys of the rows each rank trained on, written with every
    checkpoint to RUN/samples/epoch<E>-rank<R>-upto<STEP>.txt, so what an epoch saw can be
    audited (a resumed epoch's files add up to an uninterrupted epoch's)."""

    def __init__(self, run_uri: str, rank: int) -> None:
        self.run_uri, self.rank = run_uri, rank
        self.pending: dict[int, list[str]] = {}

    def add(self, epoch: int, keys: list[str]) -> None:
        self.pending.setdefault(epoch, []).extend(str(k) for k in keys)

    def flush(self, step: int) -> None:
        from pipelines import storage

        for epoch, keys in self.pending.items():
            name = f"epoch{epoch:04d}-rank{self.rank}-upto{step:08d}.txt"
            storage.write_text(storage.join(self.run_uri, "samples", name), "\n".join(keys) + "\n")
        self.pending = {}


def _report(model, optimizer, scheduler, state: TrainState, rank: int, row: dict, plan: TrainPlan,
            checkpoint: bool, samples: SampleLog | None = None) -> None:  # fmt: skip
    import ray.train

    job = TrainConfig.model_validate(plan.job)
    metrics = {k: float(v) for k, v in row.items()}
    final = state.step >= plan.total_steps
    if not checkpoint or not (final or state.step % job.run.checkpoint_every == 0):
        ray.train.report(metrics)
        return
    if samples is not None:
        samples.flush(state.step)
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
        _write_curves(state, plan.run_uri)


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
