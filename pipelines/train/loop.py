"""The one training loop every Ray Train worker runs (one per data-parallel rank), for
pretraining and every finetuning task alike: the task (`pipelines/tasks`) supplies the model,
the step's losses and the evaluation; this loop supplies the rest.

It reads as five phases, each a function below:
1. `start_or_resume`: the model, its weights (a checkpoint, or the init sources), the
   optimizer, and each rank's random streams;
2. `run_epoch`: the optimizer steps of one epoch over this rank's rows in the fixed order;
3. `log_and_report`: a logged row (history, console, Ray Train report, checkpoint);
4. `evaluate`: the task's metrics on the held-out split;
5. `export_final`: `save_pretrained` into STORAGE/RUN/final/.

Reports and the epoch: a row's `epoch` is epochs of data seen, fractional inside an epoch and
whole only once the epoch is over and (when one is due) evaluated, so the first report at epoch
N carries epoch N's evaluation, which is what Tune's ASHA (time attribute `epoch`) decides on.
Every report carries the newest evaluation (`eval_*`, and `eval_epoch`, when it was made).
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipelines.batches import collate_rows, to_device
from pipelines.tasks.base import StepContext, Task
from pipelines.train.checkpoint import CheckpointError, TrainState, load_state, save_state, set_rng_state
from pipelines.train.config import TrainConfig
from pipelines.train.metrics import StepMeter, format_step_line, peak_flops
from pipelines.train.optim import build_job_optimizer
from pipelines.train.parallel import full_optim_state, full_state_dict, load_optim_state, parallelize, unwrap
from pipelines.train.step import autocast, train_step

# Worker lines go through logging, not print: Ray Train V2 tees a worker's print to both stdout
# and its logger, so every printed line reached the driver twice. Its worker root logger writes
# INFO to the console (forwarded to the driver once) and to the run's structured app log.
log = logging.getLogger(__name__)
RESUME_READS = 3  # downloads of a checkpoint before a resume gives up on it


@dataclass(frozen=True)
class TrainPlan:
    """What the driver works out once, before any worker starts (`launch.plan_run`)."""

    task: str
    job: dict  # TrainConfig.model_dump()
    model_config: dict  # MPlugConfig.to_dict(), overrides applied
    total_steps: int
    steps_per_epoch: int  # at the largest worker count (the loop recomputes it for the actual one)
    run_uri: str  # STORAGE/RUN: where metrics.csv, curves.png and final/ go
    flops_per_sample: float  # model FLOPs of one training sample (forward + backward)
    train_rows: int
    eval_rows: int
    global_batch: int  # at the largest worker count
    weight_sources: list[str] = field(default_factory=list)  # one line per source, in load order
    # The model class `model.init` saved (its config.json), None when it does not say (an
    # official checkpoint) or there is no init: read once by the plan, before Ray.
    init_architecture: str | None = None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def synced_batches(batches: Iterable[dict], device: torch.device) -> Iterator[dict]:
    """Yield batches while EVERY rank still has one.

    Shards are complete, not equal (see `pipelines/data/order.py`): one rank may run out a batch
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


def step_groups(batches: Iterable[dict], accum: int) -> Iterator[tuple[list[dict], bool]]:
    """The micro-batches of each optimizer step (`accum` of them; a last incomplete group is
    dropped) and whether that step is the epoch's last. One step is read ahead to know it."""
    it = iter(batches)

    def group() -> list[dict] | None:
        micro = []
        for batch in it:
            micro.append(batch)
            if len(micro) == accum:
                return micro
        return None

    current = group()
    while current is not None:
        following = group()
        yield current, following is None
        current = following


def build_task(plan: TrainPlan) -> Task:
    from mplug import MPlugConfig
    from pipelines.tasks import task_class

    job = TrainConfig.model_validate(plan.job)
    return task_class(plan.task)(job, MPlugConfig.from_dict(plan.model_config))


@dataclass
class Worker:
    """One rank's run: what every phase reads and updates."""

    plan: TrainPlan
    task: Task
    job: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: Any
    optimizer: Any
    scheduler: Any
    state: TrainState
    chunks: list
    transform_tasks: int
    eval_shard: Any = None
    meter: StepMeter = field(default_factory=StepMeter)
    window: dict[str, torch.Tensor] = field(default_factory=dict)  # summed values since the last log
    window_steps: int = 0
    latest_eval: dict[str, float] = field(default_factory=dict)  # carried in every later report
    samples: SampleLog | None = None
    eval_setup: Any = None  # the task's EvalSetup, read once on rank 0
    exported: bool = False
    peak: float | None = None
    tracker: Any = None  # pipelines/train/tracking.Tracker: on world rank 0, with run.tracking

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step with the worker group as it is (elastic groups vary)."""
        return self.job.data.batch_size * self.job.optim.grad_accum_steps * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.plan.train_rows // self.global_batch)

    def epoch_progress(self) -> float:
        """Epochs of data seen: the finished epochs plus the share of this one, below 1 until it ends."""
        done = (self.state.step - self.state.epoch_start_step) / self.steps_per_epoch
        return self.state.epoch + min(done, 1.0 - 1e-6)


def train_loop_per_worker(config: dict) -> None:
    """`config`: {"plan": TrainPlan fields, "chunks": an object ref to the training data's
    chunks (`pipelines/data/order.py`), "transform_tasks": this rank's transform tasks}."""
    w = start_or_resume(config)
    if w.eval_shard is not None and w.job.run.eval_at_start:
        evaluate(w)
        log_and_report(w, {"step": float(w.state.step), "epoch": w.epoch_progress()}, checkpoint=False)
    while w.state.step < w.plan.total_steps:
        run_epoch(w)
    if not w.exported:
        export_final(w)
    if w.tracker is not None:
        w.tracker.finish()


# ---- 1. start or resume --------------------------------------------------------------------------
def start_or_resume(config: dict) -> Worker:
    """Build the model and optimizer and load their state: a checkpoint when Ray Train hands one
    (a restarted worker group, a relaunched run), else the configured initial weights. A resumed
    rank continues its own random streams (MLM masks, ITM negatives, dropout) from the checkpoint,
    restored last, after everything that draws from them at start-up."""
    import ray
    import ray.train
    import ray.train.torch

    from pipelines.train.init import load_initial_weights

    plan = TrainPlan(**config["plan"])
    task = build_task(plan)
    job = task.job
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # The same initial weights and ITC queues on every rank: FSDP2 shards each rank's own
    # init without a broadcast (DDP would broadcast rank 0's, but need not).
    seed_everything(job.run.seed)
    model = task.build_model()
    state, optim_state, rng = TrainState(world_size=world, strategy=job.scaling.strategy), None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # the checkpoint holds every weight: no init source is read
        loaded = _read_checkpoint(checkpoint, rank)
        model.load_state_dict(loaded.model_state)
        state, optim_state, rng = loaded.state, loaded.optim_state, loaded.rng
        state.resumed_from.append(state.step)
        if rank == 0:
            log.info(f"[mplug] resumed from step {state.step} (checkpoint {checkpoint.path})")
    else:
        for line in load_initial_weights(model, job.model) + task.after_initial_weights(
            model, init_architecture=plan.init_architecture
        ):
            if rank == 0:
                log.info(f"[mplug] {line}")
    if job.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = parallelize(
        model, strategy=job.scaling.strategy, device=device, find_unused_parameters=task.unused_parameters
    )
    optimizer, scheduler = build_job_optimizer(model, job.optim, plan.total_steps)
    if optim_state is not None:
        load_optim_state(model, optimizer, optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
    checkpoint_world = state.world_size
    w = Worker(
        plan=plan, task=task, job=job, rank=rank, world=world, device=device, model=model,
        optimizer=optimizer, scheduler=scheduler, state=state, chunks=ray.get(config["chunks"]),
        transform_tasks=config["transform_tasks"], peak=peak_flops(device),
        eval_shard=ray.train.get_dataset_shard("eval") if plan.eval_rows else None,
        latest_eval=_newest_evaluation(state.history),
    )  # fmt: skip
    _announce_worker_group(w, checkpoint_world)
    if job.run.log_sample_keys:
        w.samples = SampleLog(plan.run_uri, rank)
    if rank == 0 and job.run.tracking:  # the tracked run, found again after a restart
        from pipelines.train.tracking import Tracker

        w.tracker = Tracker.for_plan(plan)
        if w.tracker is not None:
            w.tracker.start(plan, resumed_from_step=state.step if checkpoint is not None else None)
    if rng is not None and checkpoint_world == world:
        set_rng_state(rng)
    else:  # a new run, or a worker group of another size: fresh per-rank streams
        seed_everything(job.run.seed * 1000 + rank)
    return w


def _newest_evaluation(history: list[dict[str, float]]) -> dict[str, float]:
    """The last evaluation of a resumed run's history, to carry on in its reports."""
    for row in reversed(history):
        evals = {k: v for k, v in row.items() if k.startswith("eval_")}
        if evals:
            return {**evals, "eval_epoch": row["epoch"]}
    return {}


def _announce_worker_group(w: Worker, checkpoint_world: int) -> None:
    """Say how many workers train and what that makes of the batch and the epoch; after a resume
    with another worker count (an elastic group that lost or gained a node), say so in one line:
    the interrupted epoch then restarts from its first row (the rows are dealt otherwise)."""
    lo_hi = w.job.scaling.num_workers
    elastic = not isinstance(lo_hi, int) and lo_hi[0] != lo_hi[1]
    if w.rank == 0:
        log.info(
            f"[mplug] task {w.task.name}: {w.world} worker(s) on {w.device}, {torch.get_num_threads()} torch "
            f"threads each, {w.plan.total_steps} steps of {w.global_batch} samples"
            + (
                f" ({w.steps_per_epoch} per epoch)"
                if elastic or w.global_batch != w.plan.global_batch
                else ""
            )
        )
    if w.state.step and checkpoint_world != w.world:
        if w.rank == 0:
            log.info(
                f"[mplug] worker group changed from {checkpoint_world} to {w.world} worker(s) (a node was lost "
                f"or added): global batch now {w.global_batch}; epoch {w.state.epoch} restarts from its first row"
            )
        w.state.epoch_start_step = w.state.step
    w.state.world_size = w.world


# ---- 2. one epoch --------------------------------------------------------------------------------
def run_epoch(w: Worker) -> None:
    """The optimizer steps of epoch `state.epoch` (or what is left of it after a resume), then
    the epoch's evaluation and its report. Ends early at the run's last step."""
    state, job = w.state, w.job
    # A resumed run continues its epoch where the checkpoint was taken: each rank's rows of an
    # epoch are a fixed sequence, so it skips the rows its steps have already trained on.
    skip_rows = (state.step - state.epoch_start_step) * job.data.batch_size * job.optim.grad_accum_steps
    batches = (to_device(b, w.device) for b in _epoch_batches(w, skip_rows))
    w.meter.restart()
    stepped = False
    for micro, last_of_epoch in step_groups(synced_batches(batches, w.device), job.optim.grad_accum_steps):
        if w.samples is not None:
            for batch in micro:
                w.samples.add(state.epoch, batch["key"])
        w.meter.batch_arrived()  # the wait covers every micro-batch of the step
        step_ctx = StepContext(state.step, state.epoch, w.steps_per_epoch)
        result = train_step(
            w.model, w.task, micro, w.optimizer, w.scheduler, step_ctx,
            grad_clip=job.optim.grad_clip, precision=job.scaling.precision,
        )  # fmt: skip
        stepped = True
        state.step += 1
        state.samples_seen += w.global_batch
        w.meter.step_done(w.global_batch)
        for name, value in result.values.items():
            w.window[name] = w.window[name] + value if name in w.window else value
        w.window_steps += 1
        final = state.step >= w.plan.total_steps
        if last_of_epoch:
            _end_epoch(w)
        if w.eval_shard is not None and (
            final or (last_of_epoch and state.epoch % job.run.eval_every_epochs == 0)
        ):
            evaluate(w)
        if (
            final
            or last_of_epoch
            or state.step % job.run.log_every == 0
            or state.step % job.run.checkpoint_every == 0
        ):
            row = _step_row(w, result)
            if final:
                # Export before the last report: a Tune scheduler that sees the run reach its
                # time budget (ASHA's max_t) stops the trial on that report, before the loop ends.
                export_final(w)
            log_and_report(w, row, checkpoint=True)
        if final:
            return
    if not stepped:
        if skip_rows:  # resumed after the epoch's last step: nothing of it was left
            _end_epoch(w)
            return
        raise RuntimeError(
            f"rank {w.rank}: a whole epoch gave no optimizer step: the shard has fewer than batch_size × "
            f"grad_accum_steps = {job.data.batch_size * job.optim.grad_accum_steps} rows; lower data.batch_size"
        )


def _end_epoch(w: Worker) -> None:
    w.state.epoch += 1
    w.state.epoch_start_step = w.state.step


def _step_row(w: Worker, result) -> dict[str, float]:
    """The logged row of the step just done: the window's mean values, lr, throughput."""
    row = {"step": float(w.state.step), "epoch": w.epoch_progress()}
    if w.window_steps:
        row.update({k: float(v.item()) / w.window_steps for k, v in w.window.items()})  # the host sync
    row["lr"] = w.scheduler.get_last_lr()[-1]
    row.update(w.meter.window())
    if result.grad_norm is not None:
        row["grad_norm"] = float(result.grad_norm.item())
    if w.peak is not None:
        row["mfu"] = w.plan.flops_per_sample * row["samples_per_s"] / (w.peak * w.world)
    w.window, w.window_steps = {}, 0
    return row


# ---- 3. log and report ---------------------------------------------------------------------------
def log_and_report(w: Worker, row: dict[str, float], checkpoint: bool) -> None:
    """Append `row` to the history, print it, and report it to Ray Train with the newest
    evaluation; with a checkpoint when `checkpoint` and one is due (every
    `run.checkpoint_every` steps, and the last step). The curves (metrics.csv, curves.png) are
    rewritten at every checkpoint and every evaluation, so a trial Tune stops keeps them."""
    import ray.train

    state, job = w.state, w.job
    evaluated = w.latest_eval.get("eval_step") == state.step
    if evaluated:  # the history keeps an evaluation in the row of its step
        row = {**row, **{k: v for k, v in w.latest_eval.items() if k not in ("eval_epoch", "eval_step")}}
    state.history.append(row)
    if w.tracker is not None:  # each step once: a resumed run skips what the tracker holds
        w.tracker.log_metrics(row, int(row["step"]))
    if w.rank == 0:
        line = format_step_line(row, w.plan.total_steps) if "loss" in row else _eval_line(row)
        log.info("[mplug] " + line)
    # total_steps: Tune's results tell a trial that ran all its steps from one stopped early.
    metrics = {k: float(v) for k, v in {**w.latest_eval, **row, "total_steps": w.plan.total_steps}.items()}
    final = state.step >= w.plan.total_steps
    checkpoint = checkpoint and (final or state.step % job.run.checkpoint_every == 0)
    if w.rank == 0 and (checkpoint or evaluated):
        _write_curves(state, w.plan.run_uri)  # before the report: Tune may stop the trial on it
    if not checkpoint:
        ray.train.report(metrics)
        return
    if w.samples is not None:
        w.samples.flush(state.step)
    # Every rank gathers (FSDP needs all ranks); only rank 0 writes the model and optimizer.
    model_state = full_state_dict(w.model)
    optim_state = {"optimizer": full_optim_state(w.model, w.optimizer), "scheduler": w.scheduler.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        save_state(
            Path(tmp),
            rank=w.rank,
            model_state=model_state if w.rank == 0 else None,
            optim_state=optim_state if w.rank == 0 else None,
            state=state,
            model_config=_config_json(w.model) if w.rank == 0 else None,
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{state.step:08d}",
            checkpoint_upload_fn=partial(_upload_checkpoint, w),
        )


def _read_checkpoint(checkpoint, rank: int, attempts: int = RESUME_READS):
    """This rank's part of a registered checkpoint, checked against its manifest. Read again when
    the download fails or differs from the manifest: a store under faults can hand back a body
    the SDK calls complete but is not (seen with S3 5xx and resets); what the manifest refuses
    every time is raised."""
    for attempt in range(1, attempts):
        try:
            with checkpoint.as_directory() as d:
                return load_state(Path(d), rank=rank)
        except (CheckpointError, OSError) as err:
            log.warning(f"[mplug] reading checkpoint {checkpoint.path} again ({attempt}/{attempts}): {err}")
    with checkpoint.as_directory() as d:  # the last try: its error is the run's
        return load_state(Path(d), rank=rank)


def _upload_checkpoint(w: Worker, checkpoint, dir_name: str):
    """Ray Train's upload step, ours: write, verify, then mark complete (`upload_checkpoint`);
    Ray registers the checkpoint, the one a resume restores, only after this returns."""
    import ray.train

    from pipelines import storage
    from pipelines.distributed import TorchCollective
    from pipelines.train.checkpoint import upload_checkpoint

    uri = storage.join(w.plan.run_uri, dir_name)
    upload_checkpoint(Path(checkpoint.path), uri, TorchCollective())
    fs, path = storage.pyarrow_fs(uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def _eval_line(row: dict[str, float]) -> str:
    evals = " ".join(
        f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval_") and not k.startswith(("eval_chance_", "eval_num_"))
    )  # fmt: skip
    return f"step {int(row['step'])} epoch {row['epoch']:.2f} | eval {evals}"


def _config_json(model) -> str:
    """The model's config.json as `save_pretrained` writes it (its class in `architectures`), so a
    checkpoint folder says which model it holds."""
    inner = unwrap(model)
    inner.config.architectures = [type(inner).__name__]
    return inner.config.to_json_string()


def _write_curves(state: TrainState, run_uri: str) -> None:
    from pipelines import storage
    from pipelines.train.checkpoint import history_to_csv
    from pipelines.train.metrics import plot_curves_png

    storage.write_text(storage.join(run_uri, "metrics.csv"), history_to_csv(state.history))
    storage.write_bytes(
        storage.join(run_uri, "curves.png"),
        plot_curves_png(state.history, run_uri.rstrip("/").rsplit("/", 1)[-1]),
    )


# ---- 4. evaluate ---------------------------------------------------------------------------------
def evaluate(w: Worker) -> None:
    """The task's metrics on the eval split, as `eval_<metric>`, into `w.latest_eval` (with the
    step and epoch they were made at). Every rank takes part; every rank ends with the same dict."""
    from pipelines.distributed import TorchCollective
    from pipelines.eval.passes import evaluate_batches

    job, comm = w.job, TorchCollective()
    if w.eval_setup is None and comm.rank == 0:  # what scoring needs besides the rows (references)
        w.eval_setup = w.task.eval_setup(job.data.eval_uris)

    def batches() -> Iterator[dict]:
        size = job.data.eval_batch_size or job.data.batch_size
        for batch in w.eval_shard.iter_torch_batches(batch_size=size, collate_fn=collate_rows):
            yield to_device(batch, w.device)

    eval_model = _eval_copy(w.model, w.task, w.device)
    with torch.no_grad(), autocast(w.device, job.scaling.precision):
        scored = evaluate_batches(w.task, eval_model, batches, comm, w.eval_setup).metrics
    w.model.train()
    w.latest_eval = {f"eval_{k}": float(v) for k, v in scored.items() if isinstance(v, int | float)}
    w.latest_eval.update(eval_epoch=w.epoch_progress(), eval_step=float(w.state.step))
    if w.rank == 0:
        metric = f"eval_{w.task.primary_metric}"
        log.info(f"[mplug] eval {w.task.primary_metric} {w.latest_eval[metric]:.3f} (step {w.state.step})")
    w.meter.restart()  # evaluation time is neither data wait nor training


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


# ---- 5. export ---------------------------------------------------------------------------------
def export_final(w: Worker) -> None:
    """`save_pretrained` into STORAGE/RUN/final/ so `from_pretrained` and finetuning start there."""
    from pipelines import storage

    full = full_state_dict(w.model)  # a collective under FSDP: every rank takes part
    w.exported = True
    if w.rank != 0:
        return
    final_uri = storage.join(w.plan.run_uri, "final")
    with tempfile.TemporaryDirectory() as tmp:
        unwrap(w.model).save_pretrained(tmp, state_dict=full)
        for path in sorted(Path(tmp).iterdir()):
            storage.write_bytes(storage.join(final_uri, path.name), path.read_bytes())
    log.info(f"[mplug] exported final model (step {w.state.step}) to {final_uri}")
    if w.tracker is not None:
        w.tracker.log_final_model(final_uri)


# ---- data ------------------------------------------------------------------------------------------
def _epoch_batches(w: Worker, skip_rows: int):
    """This rank's training batches of the current epoch, in the fixed order
    (`pipelines/data/order.py`), the first `skip_rows` rows skipped."""
    from pipelines.data.order import rank_windows
    from pipelines.data.stream import image_row_bytes, rank_epoch_dataset

    task, job, epoch = w.task, w.job, w.state.epoch
    cfg = task.model_config
    window = max(1, job.data.local_shuffle_buffer // max(1, max(c.rows for c in w.chunks)))
    windows = rank_windows(w.chunks, seed=job.run.seed, epoch=epoch, rank=w.rank, world=w.world,
                           window=window, skip_rows=skip_rows)  # fmt: skip
    ds = rank_epoch_dataset(
        windows, task.transform(train=True), columns=task.columns, seed=job.run.seed, epoch=epoch,
        batch_size=job.data.batch_size, transform_tasks=w.transform_tasks,
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
