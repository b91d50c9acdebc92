"""The one `mplug` command. Each subcommand lives in its own module with `register(sub)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Shipped job configs; `--config NAME` finds `NAME.yaml` here.
CONFIG_DIR = Path(__file__).parent / "configs"

# Subcommand modules, in the order `mplug --help` lists them. Later work adds entries here.
COMMAND_MODULES = ("jobs.env_cmd", "jobs.synth_cmd", "jobs.ingest_cmd", "jobs.pretrain_cmd", "jobs.demo")


def resolve_config(name_or_path: str | None) -> str | None:
    """A YAML path or URI, or the name of a shipped config (e.g. `pretrain_tiny`)."""
    if name_or_path is None:
        return None
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and shipped.is_file():
        return str(shipped)
    return name_or_path


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
