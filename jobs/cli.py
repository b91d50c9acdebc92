"""The one `mplug` command. Each subcommand lives in its own module with `register(sub)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `mplug --help` lists them. Later work adds entries here.
COMMAND_MODULES = ("jobs.env_cmd", "jobs.synth_cmd", "jobs.ingest_cmd", "jobs.pretrain_cmd", "jobs.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mplug",
        description="mPLUG on Ray: ingest image-text pairs, pretrain, finetune, tune, evaluate, submit.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
