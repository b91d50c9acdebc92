"""`mplug train`, `mplug finetune`, `mplug pretrain`: any task of the registry on Ray Train.

`pretrain` is `train --task pretrain`; `finetune --task T` is `train` for a finetuning task
and requires weights to start from (`--init` or `model.init`).
"""

from __future__ import annotations

import argparse

from jobs.cli import add_command, check_config, check_task_keys


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
    "tracking": "run.tracking",
}

COMMON = "Relaunching the same command resumes the run from its latest checkpoint in STORAGE/NAME."
CONFIG_ORDER = "Values come from the YAML, then --set, then the flags (each flag overrides one config key)."


def _from_config(dest: str) -> str:
    return f"default: the config's {FLAG_KEYS[dest]}"


def add_job_arguments(p: argparse.ArgumentParser, configs: list[str]) -> None:
    """The flags every training command shares (`mplug tune` reuses them for its base config)."""
    p.add_argument(
        "--config", metavar="NAME|YAML",
        help=f"job YAML (path or URI) or a shipped config: {', '.join(configs)} (default: the built-in "
        "defaults of every key)",
    )  # fmt: skip
    p.add_argument("--data", action="append", metavar="URI",
                   help=f"output folder of `mplug ingest`; repeat to mix corpora ({_from_config('data')})")  # fmt: skip
    p.add_argument("--eval-data", action="append", metavar="URI",
                   help=f"held-out ingest output scored during training ({_from_config('eval_data')})")  # fmt: skip
    p.add_argument("--storage", metavar="URI",
                   help=f"where the run folder NAME is kept: s3://, gs://, a path ({_from_config('storage')})")  # fmt: skip
    p.add_argument(
        "--name", help=f"run name; relaunching with the same name resumes ({_from_config('name')})"
    )
    p.add_argument(
        "--init", metavar="URI",
        help="weights to start from: a run of ours (STORAGE/RUN[/final]) or an official mplug_*.pth "
        f"({_from_config('init')})",
    )  # fmt: skip
    p.add_argument("--init-vision", metavar="URI",
                   help=f"OpenAI CLIP checkpoint for the vision tower, ViT-B/16 or ViT-L/14 ({_from_config('init_vision')})")  # fmt: skip
    p.add_argument("--init-text", metavar="URI",
                   help=f"Hugging Face BERT folder for text encoder, fusion and decoder ({_from_config('init_text')})")  # fmt: skip
    p.add_argument("--num-workers", type=_workers, metavar="N|MIN,MAX",
                   help=f"Ray Train workers; MIN,MAX for an elastic group ({_from_config('num_workers')})")  # fmt: skip
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help=f"one GPU per worker ({_from_config('use_gpu')})")  # fmt: skip
    p.add_argument("--cpus-per-worker", type=float, metavar="N",
                   help=f"CPUs reserved per worker ({_from_config('cpus_per_worker')})")  # fmt: skip
    p.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help=f"data parallelism: ddp (replicas) or fsdp (sharded) ({_from_config('strategy')})")  # fmt: skip
    p.add_argument("--max-steps", type=int, metavar="N",
                   help=f"optimizer steps; wins over --epochs ({_from_config('max_steps')})")  # fmt: skip
    p.add_argument("--epochs", type=float, metavar="N",
                   help=f"passes over --data when --max-steps is unset ({_from_config('epochs')})")  # fmt: skip
    p.add_argument("--batch-size", type=int, metavar="N",
                   help=f"samples per worker per micro-step ({_from_config('batch_size')})")  # fmt: skip
    p.add_argument(
        "--lr", type=float, help=f"peak learning rate of the non-vision parameters ({_from_config('lr')})"
    )
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help=f"steps between checkpoints ({_from_config('checkpoint_every')})")  # fmt: skip
    p.add_argument("--max-failures", type=int, metavar="N",
                   help=f"worker-group restarts from the last checkpoint; -1: unlimited ({_from_config('max_failures')})")  # fmt: skip
    p.add_argument("--tracking", action="append", choices=["mlflow", "tensorboard", "wandb"],
                   help="log to an experiment tracker from rank 0; repeat for several (MLflow reads "
                   f"MLFLOW_TRACKING_URI; docs/tracking.md) ({_from_config('tracking')})")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. optim.warmup_steps=50; repeat")  # fmt: skip
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
    p.add_argument(
        "--autoscaling", action="store_true",
        help="the cluster autoscales: skip the check that the worker group fits the current CPUs",
    )  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    from jobs.cli import shipped_configs
    from pipelines.tasks import TASKS

    tasks = sorted(TASKS)  # what the registry holds: `--help` lists only what exists
    finetune_tasks = [t for t in tasks if t != "pretrain"]
    train = add_command(
        sub, "train",
        help=f"train any task of the registry ({', '.join(tasks)}) with Ray Train",
        description=f"Train mPLUG on one task of the registry with a Ray Train TorchTrainer. {CONFIG_ORDER} {COMMON}",
        examples=[
            "mplug train --task pretrain --config pretrain_tiny --data demo_out/processed/train --dry-run",
            "mplug train --task vqa --config finetune_vqa_tiny --data processed/vqa_train "
            "--init runs/pretrain-tiny/final --storage runs --name vqa-tiny",
        ],
    )  # fmt: skip
    train.add_argument("--task", required=True, choices=tasks, help="the task of the registry to train")
    add_job_arguments(train, shipped_configs("train"))
    train.add_argument("--dry-run", action="store_true", help="print the plan and exit; start nothing")
    train.set_defaults(func=run, fixed_task=None, needs_init=False)

    if not finetune_tasks:
        return _register_pretrain(sub)
    finetune = add_command(
        sub, "finetune",
        help="finetune a trained model on a downstream task (requires --init)",
        description="`train` for a finetuning task, starting from trained weights (--init or model.init). "
        f"{CONFIG_ORDER} {COMMON}",
        examples=[
            "mplug finetune --task vqa --config finetune_vqa_tiny --data processed/vqa_train "
            "--eval-data processed/vqa_val --init runs/pretrain-tiny/final --storage runs --name vqa-tiny",
            "mplug finetune --task caption --config finetune_caption_base --init s3://bucket/mplug_base.pth "
            "--data s3://bucket/coco_train --storage s3://bucket/runs --name caption-base",
        ],
    )  # fmt: skip
    finetune.add_argument("--task", required=True, choices=finetune_tasks, help="the downstream task")
    add_job_arguments(finetune, [c for c in shipped_configs("train") if c.startswith("finetune_")])
    finetune.add_argument("--dry-run", action="store_true", help="print the plan and exit; start nothing")
    finetune.set_defaults(func=run, fixed_task=None, needs_init=True)
    _register_pretrain(sub)


def _register_pretrain(sub: argparse._SubParsersAction) -> None:
    from jobs.cli import shipped_configs

    pretrain = add_command(
        sub, "pretrain",
        help="pretrain mPLUG (ITC, ITM, MLM, PrefixLM) on processed shards: `train --task pretrain`",
        description="Pretrain mPLUG with a Ray Train TorchTrainer on image-text pairs, with four objectives: "
        "image-text contrastive (ITC), image-text matching (ITM), masked language modelling (MLM) and "
        f"prefix language modelling (PrefixLM). {CONFIG_ORDER} {COMMON}",
        examples=[
            "mplug pretrain --config pretrain_tiny --data demo_out/processed/train --storage runs --name tiny",
            "mplug pretrain --config pretrain_base --data s3://bucket/laion --storage s3://bucket/runs "
            "--num-workers 2,8 --autoscaling",
        ],
    )  # fmt: skip
    add_job_arguments(pretrain, [c for c in shipped_configs("train") if c.startswith("pretrain_")])
    pretrain.add_argument("--dry-run", action="store_true", help="print the plan and exit; start nothing")
    pretrain.set_defaults(func=run, fixed_task="pretrain", needs_init=False)


def config_from_args(args: argparse.Namespace):
    """The validated job config: YAML, then `--set`, then the flags. A config written for another
    task than the command's is refused."""
    from pipelines.train.config import ConfigError, load_config, parse_set_args

    task = getattr(args, "fixed_task", None) or getattr(args, "task", None) or "pretrain"
    path = check_config(args.config, "train", task=task)
    overrides = parse_set_args(args.set)
    if overrides.get("task", task) != task:
        raise ConfigError(f"--set task={overrides['task']} contradicts the command's task {task!r}")
    check_task_keys(list(overrides), task)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    job = load_config(path, overrides).model_copy(update={"task": task})
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
