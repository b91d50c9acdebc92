"""Driver side of training, in three steps with their own functions:

1. `plan_run(job)`: validate everything (config, model, task, data, weight sources) before Ray
   starts, and work out steps, batch and FLOPs: a `TrainPlan`.
2. `build_trainer(plan)`: the Ray Train `TorchTrainer` (data streams, scaling, storage,
   failure handling). A Tune trial calls it with its own run name and callbacks.
3. `fit(trainer, plan)`: run it and print the summary.

`run_training(job)` does the three (after connecting to Ray); `--dry-run` stops after 1.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Any

from pipelines import storage
from pipelines.train.config import ConfigError, TrainConfig, check_placeholders
from pipelines.train.loop import TrainPlan, build_task, train_loop_per_worker

# Forwarded to workers so a custom storage endpoint (MinIO, moto, a GCS emulator) reaches them;
# credentials are left to the cluster's own environment (instance roles, secrets), never copied
# or printed.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "STORAGE_EMULATOR_HOST",
    # Experiment tracking (pipelines/train/tracking.py): where to, not who (tokens and API keys too
    # are the cluster's own).
    "MLFLOW_TRACKING_URI",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "WANDB_MODE",
    "WANDB_ENTITY",
    "WANDB_BASE_URL",
)


def forwarded_env() -> dict[str, str]:
    """What this process's workers (and Tune's trial processes) get from its environment: the
    storage endpoints, the tracking destination and the storage retry settings."""
    return {**{k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}, **storage.settings_env()}


def build_model_config(job: TrainConfig):
    """The MPlugConfig this job trains; an invalid preset/override combination raises here."""
    from mplug import MPlugConfig

    try:
        cfg = MPlugConfig.preset(job.model.preset, **job.model.overrides)
        if job.data.image_size is not None:
            cfg.vision_config.image_size = job.data.image_size
        if job.data.max_text_len is not None:
            cfg.max_text_len = job.data.max_text_len
        cfg = MPlugConfig.from_dict(cfg.to_dict())  # validate the combination once more
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"invalid model config (model.preset={job.model.preset!r}, model.overrides, data.image_size, "
            f"data.max_text_len): {err}"
        ) from None
    return cfg


def count_rows(data_uris: list[str], what: str = "data.uris") -> int:
    """Rows of processed data, from each ingest output's stats.json (no data pass needed)."""
    total = 0
    for uri in data_uris:
        stats_uri = storage.join(uri, "stats.json")
        if not storage.exists(stats_uri):
            raise ConfigError(f"{what}: {uri!r} has no stats.json: pass an output folder of `mplug ingest`")
        total += int(json.loads(storage.read_text(stats_uri))["written"])
    return total


def _worker_range(job: TrainConfig) -> tuple[int, int]:
    n = job.scaling.num_workers
    return (n, n) if isinstance(n, int) else (n[0], n[1])


def storage_run_uri(job: TrainConfig) -> str:
    return storage.join(job.run.storage, job.run.name)


def absolute_paths(job: TrainConfig) -> TrainConfig:
    """The job with every local path absolute: a relative one means the launching process's
    folder, and Ray workers run in folders of their own (data, weights, the run folder)."""

    def one(uri: str | None) -> str | None:
        return None if uri is None else storage.absolute(uri)

    m, d, v = job.model, job.data, job.vqa
    return job.model_copy(update={
        "run": job.run.model_copy(update={"storage": storage.absolute(job.run.storage)}),
        "data": d.model_copy(update={"uris": [one(u) for u in d.uris], "eval_uris": [one(u) for u in d.eval_uris]}),
        "model": m.model_copy(update={"init": one(m.init), "init_vision": one(m.init_vision), "init_text": one(m.init_text)}),
        "vqa": v.model_copy(update={"answer_list": one(v.answer_list)}),
    })  # fmt: skip


def plan_run(job: TrainConfig) -> TrainPlan:
    """Everything a run needs, checked before Ray or any worker starts; raises ConfigError."""
    from pipelines.tasks import task_class
    from pipelines.train.init import check_sources, resolve_init
    from pipelines.train.tracking import check_tracking

    job = absolute_paths(job)
    cls = task_class(job.task)
    check_placeholders(job.model_dump(mode="json"))  # a shipped `CHANGE-ME` names the flag to pass
    check_tracking(job.run.tracking)  # a missing package or tracking URI, before Ray starts
    if not job.data.uris:
        raise ConfigError("data.uris is empty: pass --data URI (an output of `mplug ingest`)")
    model_cfg = build_model_config(job)
    task = cls(job, model_cfg)
    try:
        task.transform(train=True)
        task.transform(train=False)
        sources = check_sources(job.model)
        init = resolve_init(job.model.init) if job.model.init else None
        if init is not None:
            task.check_init(init)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    rows = count_rows(job.data.uris)
    eval_rows = count_rows(job.data.eval_uris, "data.eval_uris") if job.data.eval_uris else 0
    global_batch = job.data.batch_size * job.optim.grad_accum_steps * _worker_range(job)[1]
    steps_per_epoch = rows // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data has {rows} rows, fewer than one global batch ({global_batch} = data.batch_size × "
            f"optim.grad_accum_steps × workers); lower data.batch_size"
        )
    total = job.run.max_steps or math.ceil(job.run.epochs * steps_per_epoch)
    return TrainPlan(
        task=job.task,
        job=job.model_dump(mode="json"),
        model_config=model_cfg.to_dict(),
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        run_uri=storage_run_uri(job),
        flops_per_sample=task.flops_per_sample(),
        train_rows=rows,
        eval_rows=eval_rows,
        global_batch=global_batch,
        weight_sources=sources,
        init_architecture=init.architecture if init is not None else None,
    )


def describe_plan(plan: TrainPlan) -> str:
    """The plan in one screen (what `--dry-run` prints)."""
    job = TrainConfig.model_validate(plan.job)
    task = build_task(plan)
    cfg = task.model_config
    lo, hi = _worker_range(job)
    workers = f"{lo}" if lo == hi else f"{lo}..{hi} (elastic)"
    gpu = "1 GPU + " if job.scaling.use_gpu else ""
    import torch

    with torch.device("meta"):
        params = task.build_model().num_parameters_without_momentum()
    lines = [
        f"== plan: task {plan.task!r}, run {job.run.name!r} → {plan.run_uri}",
        f"  model        preset {job.model.preset}, {params / 1e6:.1f}M parameters (without momentum copies), "
        f"{cfg.image_size} px, {cfg.num_visual_tokens} visual tokens, text {cfg.max_text_len} tokens",
        f"  cost         {plan.flops_per_sample / 1e9:.2f} GFLOP per training sample (forward + backward)",
        f"  data         {plan.train_rows} training rows from {len(job.data.uris)} input(s)"
        + (
            f", {plan.eval_rows} eval rows (every {job.run.eval_every_epochs} epoch(s) and at the end)"
            if plan.eval_rows
            else ", no evaluation during training"
        ),  # fmt: skip
        f"  batch        {job.data.batch_size} per worker × {job.optim.grad_accum_steps} accumulation × "
        f"{hi} workers = {plan.global_batch} global",
        f"  steps        {plan.total_steps} ({plan.steps_per_epoch} per epoch, "
        f"{plan.total_steps / plan.steps_per_epoch:.2f} epochs)",
        f"  workers      {workers} × ({gpu}{job.scaling.cpus_per_worker:g} CPU), {job.scaling.strategy}, "
        f"precision {job.scaling.precision}",
        f"  primary      {task.primary_metric} ({task.mode})",
    ]
    sources = plan.weight_sources or ["none: training from scratch"]
    lines.append("  weights      " + ("\n               ".join(sources)))
    return "\n".join(lines)


def _check_resumable(job: TrainConfig, run_uri: str) -> None:
    """A relaunch resumes the run's latest checkpoint, whose optimizer state is laid out per
    strategy (DDP: by parameter index; FSDP2: by name): refuse the other one up front."""
    from pipelines.train.checkpoint import checkpointed_strategy

    previous = checkpointed_strategy(run_uri)
    if previous is not None and previous != job.scaling.strategy:
        raise ConfigError(
            f"run {job.run.name!r} in {job.run.storage} was checkpointed with scaling.strategy={previous!r} "
            f"and cannot resume with {job.scaling.strategy!r}: relaunch with --strategy {previous}, or "
            "start a new run with another --name"
        )


def check_capacity(job: TrainConfig, cluster: dict[str, float]) -> None:
    """On a fixed cluster, a worker group bigger than its CPUs (or GPUs) waits forever: fail."""
    lo = _worker_range(job)[0]
    need = lo * job.scaling.cpus_per_worker
    have = cluster.get("CPU", 0)
    # Leave at least one logical CPU for Ray Data's read/preprocess tasks.
    if need > have - 1:
        raise ConfigError(
            f"scaling: {lo} workers × {job.scaling.cpus_per_worker} CPU need {need:g} CPUs but the cluster "
            f"has {have:g} (and Ray Data needs ≥ 1 free); lower scaling.cpus_per_worker or num_workers"
        )
    if job.scaling.use_gpu and cluster.get("GPU", 0) < lo:
        raise ConfigError(f"scaling.use_gpu=true with {lo} workers but the cluster has no {lo} GPUs")


def build_trainer(
    plan: TrainPlan,
    *,
    run_name: str | None = None,
    storage_uri: str | None = None,
    callbacks: list[Any] | None = None,
    transform_tasks: int | None = None,
):
    """The TorchTrainer of `plan` (Ray must be up). `run_name`/`storage_uri` override the job's
    (a Tune trial names its run from its trial id); `callbacks` go into the RunConfig."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.data.order import chunk_rows, plan_chunks
    from pipelines.data.stream import default_transform_tasks, image_row_bytes, processed_files, task_dataset
    from pipelines.train.data_config import train_data_config

    job = TrainConfig.model_validate(plan.job)
    task = build_task(plan)
    cfg = task.model_config
    hi = _worker_range(job)[1]
    tasks = (
        transform_tasks
        or job.data.transform_tasks
        or default_transform_tasks(hi * job.scaling.cpus_per_worker)
    )
    row_bytes = image_row_bytes(cfg.image_size, cfg.max_text_len, images=getattr(task, "images_per_row", 1))
    # Training rows: each rank builds its own epoch stream in a fixed order from the chunk table
    # (footers read once here, shared through the object store); evaluation rows stream through
    # Ray Train's split.
    chunks = ray.put(plan_chunks(processed_files(job.data.uris), chunk_rows(plan.train_rows, hi)))
    datasets = {}
    if plan.eval_rows:
        datasets["eval"] = task_dataset(
            job.data.eval_uris, task.transform(train=False), columns=task.columns, train=False,
            transform_tasks=tasks, row_bytes=row_bytes, keep_keys=task.eval_setup(job.data.eval_uris).keys,
        )  # fmt: skip
    fs, path = storage.pyarrow_fs(storage_uri or job.run.storage)
    # The storage retry settings too (storage.SETTINGS_ENV): workers retry as the driver does.
    env = forwarded_env()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": asdict(plan), "chunks": chunks, "transform_tasks": max(1, tasks // hi)},
        scaling_config=ScalingConfig(
            num_workers=job.scaling.num_workers,
            elastic_resize_monitor_interval_s=job.scaling.elastic_resize_interval_s,
            use_gpu=job.scaling.use_gpu,
            resources_per_worker={
                "CPU": job.scaling.cpus_per_worker,
                **({"GPU": 1} if job.scaling.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=run_name or job.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.run.num_to_keep),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=callbacks,
        ),
        datasets=datasets or None,
        dataset_config=train_data_config(),
    )


def fit(trainer, plan: TrainPlan, *, quiet: bool = False):
    """Run the trainer; print the one-screen summary; return Ray Train's Result."""
    result = trainer.fit()
    if not quiet:
        print(summary(plan, result))
    return result


def run_training(
    job: TrainConfig, *, address: str | None = None, autoscaling: bool = False, dry_run: bool = False
):
    """Plan, connect to (or start) Ray, build the trainer, fit. Returns the Result (None on a
    dry run, which prints the plan and starts nothing)."""
    import ray

    from pipelines.cluster import init_ray

    plan = plan_run(job)  # fails before Ray or any worker starts
    _check_resumable(job, plan.run_uri)
    if dry_run:
        print(describe_plan(plan))
        return None
    print(describe_plan(plan), flush=True)
    init_ray(address)
    if not autoscaling:
        check_capacity(job, ray.cluster_resources())
    return fit(build_trainer(plan), plan)


run_pretraining = run_training  # `mplug pretrain` is `train --task pretrain`


def summary(plan: TrainPlan, result) -> str:
    job = TrainConfig.model_validate(plan.job)
    task = build_task(plan)
    history = _history(plan.run_uri)
    m = result.metrics or {}
    last = next((r for r in reversed(history) if "loss" in r), m)
    losses = "  ".join(f"{k} {last[k]:.4f}" for k in last if k == "loss" or k.startswith("loss_"))
    lines = [
        "",
        f"== {plan.task} run {job.run.name!r} " + ("finished" if result.error is None else f"FAILED: {failure_line(result.error)}"),
        f"  steps        {int(last.get('step', 0))}/{plan.total_steps}   epoch {int(last.get('epoch', 0))}",
        f"  final loss   {losses or '(none logged)'}",
        f"  throughput   {last.get('samples_per_s', float('nan')):.1f} samples/s, data wait "
        f"{100 * last.get('data_wait_frac', float('nan')):.0f}%" + (f", MFU {100 * last['mfu']:.1f}%" if "mfu" in last else ""),
    ]  # fmt: skip
    evals = [r for r in history if f"eval_{task.primary_metric}" in r]
    if evals:
        key = f"eval_{task.primary_metric}"
        best = (max if task.mode == "max" else min)(evals, key=lambda r: r[key])
        lines.append(
            f"  eval         {task.primary_metric} {evals[-1][key]:.2f} at the end, best {best[key]:.2f} (epoch {int(best['epoch'])})"
        )
    lines += [
        f"  checkpoint   {result.checkpoint.path if result.checkpoint else '(none)'}",
        f"  final model  {storage.join(plan.run_uri, 'final')}",
        f"  curves       {storage.join(plan.run_uri, 'metrics.csv')}, {storage.join(plan.run_uri, 'curves.png')}",
    ]
    return "\n".join(lines)


def failure_line(error: BaseException) -> str:
    """What failed, in one line: the innermost `SomethingError: message` of the (worker) traceback
    Ray Train wraps the error in, else its first line."""
    import re

    text = str(error)
    causes = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception): .+)$", text, flags=re.MULTILINE)
    if causes:
        return causes[-1]
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _history(run_uri: str) -> list[dict[str, float]]:
    from pipelines.train.checkpoint import history_from_csv

    uri = storage.join(run_uri, "metrics.csv")
    return history_from_csv(storage.read_text(uri)) if storage.exists(uri) else []
