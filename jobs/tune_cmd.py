"""`mplug tune`: hyperparameter search over a task's finetuning with Ray Tune."""

from __future__ import annotations

import argparse

from jobs.cli import CONFIG_DIR, resolve_config
from jobs.train_cmd import add_job_arguments, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.tasks import TASKS

    spaces = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("tune_*.yaml"))) or "(none)"
    p = sub.add_parser(
        "tune",
        help="search finetuning hyperparameters with Ray Tune (ASHA, optional Optuna); resumable",
        description="Each trial finetunes through the training core with its sampled values and is scored on "
        "--eval-data every epoch. Results go to STORAGE/NAME (results.csv, best.yaml, search.png, every "
        "trial's run). Relaunching the same command finishes an interrupted search.",
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--space", required=True, help=f"search-space YAML (path/URI) or a shipped name: {spaces}")
    add_job_arguments(p, ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("finetune_*.yaml"))))
    p.add_argument("--num-samples", type=int, default=4, help="trials (× the grid's points)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster holds)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument("--search", choices=["random", "optuna"], default="random")
    p.add_argument("--trial-retries", type=int, default=1, help="times a failed trial is retried")
    p.set_defaults(func=run, fixed_task=None, needs_init=False)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.config import ConfigError
    from pipelines.tune.driver import plan_search, run_search
    from pipelines.tune.space import load_space

    if not args.name or not args.storage:
        raise ConfigError("tune needs --storage URI and --name SEARCH (the search's folder: STORAGE/SEARCH)")
    base = config_from_args(args)
    if base.task != "pretrain" and not base.model.init:
        from pipelines.train.config import ConfigError

        raise ConfigError(
            f"tune --task {base.task} finetunes: pass --init URI (or set model.init) to start from"
        )
    space = load_space(resolve_config(args.space))
    plan = plan_search(
        base, space, storage_uri=base.run.storage, name=base.run.name, num_samples=args.num_samples,
        max_concurrent=args.max_concurrent, scheduler=args.scheduler, search=args.search,
        trial_retries=args.trial_retries,
    )  # fmt: skip
    grid = run_search(plan, space, address=args.address)
    return 0 if not grid.errors or len(grid.errors) < len(grid) else 1
