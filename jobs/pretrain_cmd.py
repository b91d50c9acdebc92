"""`mplug pretrain`: distributed mPLUG pretraining on Ray Train."""

from __future__ import annotations

import argparse
import sys

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain mPLUG (ITC, ITM, MLM, PrefixLM) on processed shards with Ray Train",
        description="Pretrain mPLUG with a Ray Train TorchTrainer. Relaunching the same command resumes "
        "the run from its latest checkpoint in STORAGE/NAME.",
    )
    p.add_argument(
        "--config", help="job YAML (path/URI) or a shipped name: pretrain_tiny, pretrain_base, pretrain_large"
    )
    p.add_argument("--data", action="append", help="output URI of `mplug ingest`; repeat to mix corpora")
    p.add_argument("--storage", help="URI under which the run folder NAME is kept (s3://, gs://, local)")
    p.add_argument("--name", help="run name (stable: relaunching with the same name resumes)")
    p.add_argument("--num-workers", type=_workers, help="N, or MIN,MAX for an elastic worker group")
    p.add_argument(
        "--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker"
    )
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--strategy", choices=["ddp", "fsdp"])
    p.add_argument("--max-steps", type=int)
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
    p.set_defaults(func=run)


FLAG_KEYS = {
    "data": "data.uris",
    "storage": "run.storage",
    "name": "run.name",
    "num_workers": "scaling.num_workers",
    "use_gpu": "scaling.use_gpu",
    "cpus_per_worker": "scaling.cpus_per_worker",
    "strategy": "scaling.strategy",
    "max_steps": "run.max_steps",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "checkpoint_every": "run.checkpoint_every",
    "max_failures": "run.max_failures",
}


def config_from_args(args: argparse.Namespace):
    from pipelines.train.config import load_config, parse_set_args

    overrides = parse_set_args(args.set)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    return load_config(resolve_config(args.config), overrides)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.config import ConfigError
    from pipelines.train.launch import run_pretraining

    try:
        job = config_from_args(args)
        result = run_pretraining(job, address=args.address, autoscaling=args.autoscaling)
    except ConfigError as err:
        print(f"mplug pretrain: {err}", file=sys.stderr)
        return 2
    return 0 if result.error is None else 1
