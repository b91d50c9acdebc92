"""`mplug train`, `mplug finetune`, `mplug pretrain`: any task of the registry on Ray Train.

`pretrain` is `train --task pretrain`; `finetune --task T` is `train` for a finetuning task
and requires weights to start from (`--init` or `model.init`).
"""

from __future__ import annotations

import argparse

from jobs.cli import resolve_config


def _workers(text: str) -> int | list[int]:
    """`4` or elastic `2,8` (min,max)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-workers {text!r}: expected N or MIN,MAX") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values
    raise argparse.ArgumentTypeError(f"--num-workers {text!r}: expected N or MIN,MAX")


# CLI flag (argparse dest) → config key.
FLAG_KEYS = {
    "data": "data.uris",
    "eval_data": "data.eval_uris",
    "storage": "run.storage",
    "name": "run.name",
    "init": "model.init",
    "init_vision": "model.init_vision",
    "init_text": "model.init_text",
    "num_workers": "scaling.num_workers",
    "use_gpu": "scaling.use_gpu",
    "cpus_per_worker": "scaling.cpus_per_worker",
    "strategy": "scaling.strategy",
    "max_steps": "run.max_steps",
    "epochs": "run.epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "checkpoint_every": "run.checkpoint_every",
    "max_failures": "run.max_failures",
}


def add_job_arguments(p: argparse.ArgumentParser, configs: str) -> None:
    """The flags every training command shares (`mplug tune` reuses them for its base config)."""
    p.add_argument("--config", help=f"job YAML (path/URI) or a shipped name: {configs}")
    p.add_argument("--data", action="append", help="output URI of `mplug ingest`; repeat to mix corpora")
    p.add_argument("--eval-data", action="append", help="held-out ingest output scored during training")
    p.add_argument("--storage", help="URI under which the run folder NAME is kept (s3://, gs://, local)")
    p.add_argument("--name", help="run name (stable: relaunching with the same name resumes)")
    p.add_argument(
        "--init", help="weights to start from: a run of ours (STORAGE/RUN[/final]) or an official .pth"
    )
    p.add_argument("--init-vision", help="OpenAI CLIP checkpoint for the vision tower (ViT-B/16, ViT-L/14)")
    p.add_argument("--init-text", help="Hugging Face BERT folder for text encoder, fusion and decoder")
    p.add_argument("--num-workers", type=_workers, help="N, or MIN,MAX for an elastic worker group")
    p.add_argument(
        "--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker"
    )
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--strategy", choices=["ddp", "fsdp"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="per worker, per micro-step")
    p.add_argument("--lr", type=float)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--max-failures", type=int)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. optim.warmup_steps=50",
    )
    p.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS, else a local instance")
    p.add_argument(
        "--autoscaling",
        action="store_true",
        help="the cluster autoscales: skip the check that the worker group fits the current CPUs",
    )


def _shipped(prefix: str) -> str:
    from jobs.cli import CONFIG_DIR

    return ", ".join(sorted(p.stem for p in CONFIG_DIR.glob(f"{prefix}*.yaml"))) or "(none)"


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.tasks import TASKS

    tasks = sorted(TASKS)  # what the registry holds: `--help` lists only what exists
    finetune_tasks = [t for t in tasks if t != "pretrain"]
    common = "Relaunching the same command resumes the run from its latest checkpoint in STORAGE/NAME."
    train = sub.add_parser(
        "train",
        help=f"train any task of the registry ({', '.join(tasks)}) with Ray Train",
        description=f"Train mPLUG on one task of the registry with a Ray Train TorchTrainer. {common}",
    )
    train.add_argument("--task", required=True, choices=tasks)
    add_job_arguments(train, _shipped(""))
    train.add_argument("--dry-run", action="store_true", help="print the plan and exit; start nothing")
    train.set_defaults(func=run, fixed_task=None, needs_init=False)

    if not finetune_tasks:
        return _register_pretrain(sub, common)
    finetune = sub.add_parser(
        "finetune",
        help="finetune a trained model on a downstream task (requires --init)",
        description=f"`train` for a finetuning task, starting from trained weights (--init or model.init). {common}",
    )
    finetune.add_argument("--task", required=True, choices=finetune_tasks)
    add_job_arguments(finetune, _shipped("finetune_"))
    finetune.add_argument("--dry-run", action="store_true", help="print the plan and exit; start nothing")
    finetune.set_defaults(func=run, fixed_task=None, needs_init=True)
    _register_pretrain(sub, common)


def _register_pretrain(sub: argparse._SubParsersAction, common: str) -> None:
    pretrain = sub.add_parser(
        "pretrain",
        help="pretrain mPLUG (ITC, ITM, MLM, PrefixLM) on processed shards: `train --task pretrain`",
        description=f"Pretrain mPLUG with a Ray Train TorchTrainer. {common}",
    )
    add_job_arguments(pretrain, _shipped("pretrain_"))
    pretrain.add_argument("--dry-run", action="store_true", help="print the plan and exit; start nothing")
    pretrain.set_defaults(func=run, fixed_task="pretrain", needs_init=False)


def config_from_args(args: argparse.Namespace):
    """The validated job config: YAML, then `--set`, then the flags; `--task` must agree with a
    YAML that names its task."""
    from pipelines.train.config import ConfigError, load_config, parse_set_args

    overrides = parse_set_args(args.set)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    job = load_config(resolve_config(args.config), overrides)
    task = getattr(args, "fixed_task", None) or getattr(args, "task", None) or job.task
    if args.config and "task" in job.model_fields_set and job.task != task:
        raise ConfigError(f"config {args.config!r} is for task {job.task!r}, not {task!r}")
    job = job.model_copy(update={"task": task})
    if getattr(args, "needs_init", False) and not job.model.init:
        raise ConfigError(
            f"finetune --task {task} needs weights to start from: pass --init URI or set model.init"
        )
    return job


def run(args: argparse.Namespace) -> int:
    from pipelines.train.launch import run_training

    job = config_from_args(args)
    result = run_training(job, address=args.address, autoscaling=args.autoscaling, dry_run=args.dry_run)
    return 0 if result is None or result.error is None else 1
