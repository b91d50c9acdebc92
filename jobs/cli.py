"""The one `mplug` command. Each subcommand lives in its own module with `register(sub)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Shipped job configs; `--config NAME` finds `NAME.yaml` here.
CONFIG_DIR = Path(__file__).parent / "configs"

# Subcommand modules, in the order `mplug --help` lists them. Later work adds entries here.
COMMAND_MODULES = (
    "jobs.env_cmd",
    "jobs.synth_cmd",
    "jobs.ingest_cmd",
    "jobs.train_cmd",
    "jobs.eval_cmd",
    "jobs.tune_cmd",
    "jobs.submit_cmd",
    "jobs.jobs_cmd",
    "jobs.demo",
)


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
        description="mPLUG on Ray: the vision-language model and its Ray Data / Train / Tune pipeline. "
        "`mplug COMMAND --help` is the reference of each command.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A config error exits 2, any other error 1, each as one line naming
    what is wrong (`--debug` shows the traceback instead)."""
    from pipelines.train.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"mplug {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI's edge: everything below raises, this line reports
        if args.debug:
            raise
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        if lines and lines[0].startswith(
            "Traceback"
        ):  # a remote error carries its traceback: its last line says what
            lines = lines[-1:]
        message = "\n".join(lines) if isinstance(err, ConfigError) else (lines[0] if lines else "")
        kind = "" if isinstance(err, ConfigError | FileNotFoundError) else f"{type(err).__name__}: "
        print(f"mplug {args.command}: {kind}{message} (--debug shows the traceback)", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
