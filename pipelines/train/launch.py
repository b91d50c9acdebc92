"""Driver side of pretraining: validate, plan, build the TorchTrainer, run, summarise."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

from pipelines import storage
from pipelines.train.config import ConfigError, PretrainConfig
from pipelines.train.loop import TrainPlan, storage_run_uri, train_loop_per_worker

# Forwarded to workers so a custom S3 endpoint (MinIO, moto) reaches them; credentials are
# left to the cluster's own environment (instance roles, secrets) and never copied or printed.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def build_model_config(job: PretrainConfig):
    """The MPlugConfig this job trains; an invalid preset/override combination raises here."""
    from mplug import MPlugConfig

    try:
        cfg = MPlugConfig.preset(job.model.preset, **job.model.overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"invalid model config (model.preset={job.model.preset!r}, model.overrides): {err}"
        ) from None
    if job.data.image_size is not None:
        cfg.vision_config.image_size = job.data.image_size
    if job.data.max_text_len is not None:
        cfg.max_text_len = job.data.max_text_len
    return cfg


def count_rows(data_uris: list[str]) -> int:
    """Rows of processed data, from each ingest output's stats.json (no data pass needed)."""
    total = 0
    for uri in data_uris:
        stats_uri = storage.join(uri, "stats.json")
        if not storage.exists(stats_uri):
            raise ConfigError(f"data uri {uri!r} has no stats.json: pass an output folder of `mplug ingest`")
        total += int(json.loads(storage.read_text(stats_uri))["written"])
    return total


def plan_run(job: PretrainConfig) -> TrainPlan:
    from mplug import flops

    if not job.data.uris:
        raise ConfigError("data.uris is empty: pass --data URI (an output of `mplug ingest`)")
    model_cfg = build_model_config(job)
    rows = count_rows(job.data.uris)
    max_workers = (
        job.scaling.num_workers if isinstance(job.scaling.num_workers, int) else job.scaling.num_workers[1]
    )
    global_batch = job.data.batch_size * job.optim.grad_accum_steps * max_workers
    steps_per_epoch = rows // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data has {rows} rows, fewer than one global batch ({global_batch} = data.batch_size × "
            f"optim.grad_accum_steps × workers); lower data.batch_size"
        )
    total = job.run.max_steps or math.ceil(job.run.epochs * steps_per_epoch)
    fwd_bwd = flops.pretraining_step_flops(model_cfg)
    return TrainPlan(
        job=job.model_dump(mode="json"),
        model_config=model_cfg.to_dict(),
        total_steps=total,
        alpha_ramp_steps=steps_per_epoch,
        run_uri=storage_run_uri(job),
        flops_per_sample=float(fwd_bwd),
    )


def _check_resumable(job: PretrainConfig, run_uri: str) -> None:
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


def _check_local_capacity(job: PretrainConfig) -> None:
    """On a fixed cluster, a worker group bigger than its CPUs waits forever: fail instead."""
    import ray

    lo = job.scaling.num_workers if isinstance(job.scaling.num_workers, int) else job.scaling.num_workers[0]
    need = lo * job.scaling.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    # Leave at least one logical CPU for Ray Data's read/preprocess tasks.
    if need > have - 1:
        raise ConfigError(
            f"scaling: {lo} workers × {job.scaling.cpus_per_worker} CPU need {need:g} CPUs but the cluster "
            f"has {have:g} (and Ray Data needs ≥ 1 free); lower scaling.cpus_per_worker or num_workers"
        )
    if job.scaling.use_gpu and ray.cluster_resources().get("GPU", 0) < lo:
        raise ConfigError(f"scaling.use_gpu=true with {lo} workers but the cluster has no {lo} GPUs")


def run_pretraining(job: PretrainConfig, *, address: str | None = None, autoscaling: bool = False):
    """Run (or resume) the job; returns the Ray Train Result. Everything is validated first."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.cluster import init_ray
    from pipelines.data.stream import training_dataset
    from pipelines.train.data_config import train_data_config

    plan = plan_run(job)  # fails before Ray or any worker starts
    _check_resumable(job, plan.run_uri)
    model_cfg = build_model_config(job)
    init_ray(address)
    if not autoscaling:
        _check_local_capacity(job)

    # Training rows hold image, input_ids and attention_mask only (no string `key`), so no
    # `select_columns`: it would add a whole Ray Data stage of copy tasks.
    dataset = training_dataset(
        job.data.uris,
        image_size=model_cfg.vision_config.image_size,
        max_text_len=model_cfg.max_text_len,
        train=True,
        seed=job.run.seed,
        crop_min_scale=job.data.crop_min_scale,
    )
    fs, path = storage.pyarrow_fs(job.run.storage)
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(plan),
        scaling_config=ScalingConfig(
            num_workers=job.scaling.num_workers,
            use_gpu=job.scaling.use_gpu,
            resources_per_worker={
                "CPU": job.scaling.cpus_per_worker,
                **({"GPU": 1} if job.scaling.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=job.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.run.num_to_keep),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
        datasets={"train": dataset},
        dataset_config=train_data_config(),
    )
    result = trainer.fit()
    print(summary(job, plan, result))
    return result


def summary(job: PretrainConfig, plan: TrainPlan, result) -> str:
    m = result.metrics or {}
    lines = [
        "",
        f"== pretraining run {job.run.name!r} finished",
        f"  steps        {int(m.get('step', 0))}/{plan.total_steps}   epoch {int(m.get('epoch', 0))}",
        "  final loss   "
        + "  ".join(
            f"{k} {m[k]:.4f}" for k in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_prefix") if k in m
        ),
        f"  throughput   {m.get('samples_per_s', float('nan')):.1f} samples/s, data wait "
        f"{100 * m.get('data_wait_frac', float('nan')):.0f}%"
        + (f", MFU {100 * m['mfu']:.1f}%" if "mfu" in m else ""),
        f"  checkpoint   {result.checkpoint.path if result.checkpoint else '(none)'}",
        f"  final model  {storage.join(plan.run_uri, 'final')}",
        f"  curves       {storage.join(plan.run_uri, 'metrics.csv')}, {storage.join(plan.run_uri, 'curves.png')}",
    ]
    return "\n".join(lines)
