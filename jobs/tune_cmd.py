"""`mplug tune`: hyperparameter search over a task's finetuning with Ray Tune."""

from __future__ import annotations

import argparse

from jobs.cli import add_command, check_config, shipped_configs
from jobs.train_cmd import add_job_arguments, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.tasks import TASKS

    p = add_command(
        sub, "tune",
        help="search finetuning hyperparameters with Ray Tune (ASHA, optional Optuna); resumable",
        description="Each trial finetunes through the training core with its sampled values and is scored on "
        "--eval-data every epoch; ASHA (asynchronous successive halving) stops the weaker trials early. "
        "Results go to STORAGE/NAME (results.csv, best.yaml, search.png, every trial's run). Relaunching "
        "the same command finishes an interrupted search.",
        examples=[
            "mplug tune --task snli_ve --config finetune_snli_ve_tiny --space tune_tiny --data processed/snli_ve_train "
            "--eval-data processed/snli_ve_val --init runs/pretrain-tiny/final --storage runs --name search "
            "--num-samples 4",
            "mplug tune --task vqa --config finetune_vqa_base --space tune_vqa --init s3://bucket/mplug_base.pth "
            "--data s3://bucket/vqa_train --eval-data s3://bucket/vqa_val --storage s3://bucket/tune "
            "--name vqa-lr --search optuna",
        ],
    )  # fmt: skip
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="the task every trial finetunes")
    p.add_argument("--space", required=True, metavar="NAME|YAML",
                   help=f"search-space YAML (path or URI) or a shipped one: {', '.join(shipped_configs('space'))}")  # fmt: skip
    add_job_arguments(p, [c for c in shipped_configs("train") if c.startswith("finetune_")])
    p.add_argument("--num-samples", type=int, default=4, metavar="N", help="trials (× the grid's points)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: as many as the cluster's CPUs/GPUs hold now; "
                   "required with --autoscaling)")  # fmt: skip
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha stops weak trials early; fifo runs every trial to the end")  # fmt: skip
    p.add_argument("--search", choices=["random", "optuna"], default="random",
                   help="how values are drawn: at random, or proposed by Optuna from the trials so far")  # fmt: skip
    p.add_argument(
        "--trial-retries", type=int, default=1, metavar="N", help="times a failed trial is retried"
    )
    p.set_defaults(func=run, fixed_task=None, needs_init=False)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.config import ConfigError
    from pipelines.tune.driver import plan_search, run_search
    from pipelines.tune.space import load_space

    if not args.name or not args.storage:
        raise ConfigError("tune needs --storage URI and --name SEARCH (the search's folder: STORAGE/SEARCH)")
    if args.autoscaling and args.max_concurrent is None:
        raise ConfigError(
            "tune --autoscaling: pass --max-concurrent N (trials at once): what an autoscaling cluster "
            "holds now says nothing of what it grows to"
        )
    space_uri = check_config(args.space, "space", task=args.task, flag="--space")
    base = config_from_args(args)
    if base.task != "pretrain" and not base.model.init:
        raise ConfigError(
            f"tune --task {base.task} finetunes: pass --init URI (or set model.init) to start from"
        )
    space = load_space(space_uri)
    plan = plan_search(
        base, space, storage_uri=base.run.storage, name=base.run.name, num_samples=args.num_samples,
        max_concurrent=args.max_concurrent, scheduler=args.scheduler, search=args.search,
        trial_retries=args.trial_retries,
    )  # fmt: skip
    grid = run_search(plan, space, address=args.address)
    return 0 if not grid.errors or len(grid.errors) < len(grid) else 1
