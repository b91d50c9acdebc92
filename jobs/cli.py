"""The one `mplug` command. Each subcommand lives in its own module with `register(sub)`."""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

# Shipped job configs; `--config NAME` finds `NAME.yaml` here.
CONFIG_DIR = Path(__file__).parent / "configs"
PACKAGE_NAME = "mplug-ray"

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

# What each kind of shipped config is called, and what a user is told it is.
CONFIG_PREFIXES = {"ingest": ("ingest_",), "train": ("pretrain_", "finetune_"), "space": ("tune_",)}
KIND_NAMES = {"ingest": "an ingest config", "train": "a training config", "space": "a search space"}
KIND_USES = {
    "ingest": "`mplug ingest --config`",
    "train": "`mplug pretrain/finetune/train/tune --config`",
    "space": "`mplug tune --space`",
}
# The sections of a training config that hold task options, and which of them each task reads
# (the video tasks read their image task's and `video`); tests/unit/test_cli.py pins this
# against the tasks' code.
TASK_SECTIONS = ("vqa", "caption", "retrieval", "grounding", "video")
SECTIONS_READ = {
    "vqa": ("vqa",),
    "caption": ("caption",),
    "retrieval": ("retrieval",),
    "grounding": ("grounding",),
    "video_retrieval": ("retrieval", "video"),
    "video_qa": ("vqa", "video"),
    "video_caption": ("caption", "video"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag shows its default; descriptions are wrapped paragraph by paragraph and the
    indented example lines of an epilog are kept as written (copy-pasteable commands).

    A flag whose default is None says in its own help what happens without it ("default: the
    config's optim.lr"); `tests/unit/test_cli.py` holds every flag to that."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if all(line.startswith(" ") or line.endswith(":") for line in lines):  # examples: kept
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                                subsequent_indent=indent))  # fmt: skip
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, argparse.SUPPRESS)
            or re.search(r"\bdefault\b", text)
        ):
            return text
        if action.nargs == 0 and action.default is False:  # store_true
            return f"{text} (default: off)"
        if action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error told in one line (exit status 2) that names the help to read."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but an unknown flag is reported by the subcommand it was given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser: argparse.ArgumentParser = self
            while True:
                subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
                chosen = getattr(parsed, subs[0].dest, None) if subs else None
                if chosen is None:
                    break
                parser = subs[0].choices[chosen]
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def add_command(
    sub: argparse._SubParsersAction, name: str, *, help: str, description: str, examples: list[str]
) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatting: its help ends with runnable examples."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter
    )


def package_version() -> str:
    """The installed package's version, from its metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE_NAME)
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


# ---- configs ----------------------------------------------------------------------------------
def shipped_configs(kind: str | None = None) -> list[str]:
    """Names of the shipped configs (of one kind: ingest, train, space)."""
    prefixes = CONFIG_PREFIXES[kind] if kind else ("",)
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem.startswith(prefixes))


def task_configs(task: str) -> list[str]:
    """The shipped training configs of one task."""
    prefix = "pretrain_" if task == "pretrain" else f"finetune_{task}_"
    return [c for c in shipped_configs("train") if c.startswith(prefix)]


def closest(name: str, candidates: list[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(Path(name).stem, candidates, n=n, cutoff=0.4)


def resolve_config(
    name_or_path: str | None, *, kind: str | None = None, flag: str = "--config"
) -> str | None:
    """A YAML path or URI, or the name of a shipped config (e.g. `pretrain_tiny`).

    A name that is neither shipped nor an existing file is a ConfigError naming the closest
    shipped configs (of `kind` when given); a URI is checked when it is read."""
    from pipelines.train.config import ConfigError

    if name_or_path is None:
        return None
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and shipped.is_file():
        return str(shipped)
    if "://" in name_or_path or Path(name_or_path).is_file():
        return name_or_path
    pool = shipped_configs(kind)
    near = closest(name_or_path, pool) or closest(name_or_path, shipped_configs())
    hint = f"closest shipped: {', '.join(near)}" if near else f"shipped: {', '.join(pool)}"
    raise ConfigError(
        f"{flag} {name_or_path!r} does not exist (no shipped config or file of that name); {hint}"
    )


def _read_mapping(uri: str, flag: str, value: str) -> dict[str, Any]:
    import yaml

    from pipelines import storage
    from pipelines.train.config import ConfigError

    if not storage.exists(uri):
        raise ConfigError(f"{flag} {value!r}: {uri} does not exist")
    try:
        loaded = yaml.safe_load(storage.read_text(uri)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag} {value!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{flag} {value!r}: top level must be a mapping of keys, got {type(loaded).__name__}"
        )
    return loaded


def config_kind(raw: dict[str, Any]) -> str | None:
    """ingest, train or space, by the keys a YAML holds (None: none of them, or a mix)."""
    from pipelines.train.config import TrainConfig

    keys = set(raw)
    if keys == {"parameters"}:
        return "space"
    if keys and keys <= set(TrainConfig.model_fields):
        return "train"
    from pipelines.data.ingest import IngestConfig

    if keys and keys <= set(IngestConfig.model_fields):
        return "ingest"
    return None


def space_task(name_or_path: str) -> str | None:
    """The task a shipped search space `tune_TASK` is for (its keys are checked apart)."""
    from pipelines.train.config import TASK_NAMES

    stem = Path(name_or_path).stem
    return stem[5:] if stem.startswith("tune_") and stem[5:] in TASK_NAMES else None


def check_config(
    name_or_path: str | None, kind: str, *, task: str | None = None, flag: str = "--config"
) -> str | None:
    """Resolve `--config`/`--space` and refuse, before anything starts, a config that does not
    exist, one of another kind (a search space as --config, a training config as ingest's) or,
    with `task`, one written for another task. Returns the path or URI to load."""
    from pipelines.train.config import ConfigError

    uri = resolve_config(name_or_path, kind=kind, flag=flag)
    if uri is None:
        return None
    raw = _read_mapping(uri, flag, name_or_path)
    found = config_kind(raw)
    if found is not None and found != kind:
        raise ConfigError(
            f"{flag} {name_or_path!r} is {KIND_NAMES[found]}, for {KIND_USES[found]}, not {KIND_NAMES[kind]}; "
            f"shipped: {', '.join(fitting_configs(kind, task))}"
        )
    if task is None:
        return uri
    if kind == "train":
        written_for = raw.get("task", "pretrain")
        missing = "task" not in raw
    else:
        written_for, missing = space_task(name_or_path), False
        check_task_keys([str(k) for k in raw.get("parameters") or {}], task, flag=f"{flag} {name_or_path!r}:")
    if written_for is not None and written_for != task:
        raise ConfigError(
            f"{flag} {name_or_path!r} is for task {written_for!r}"
            + (" (a config without `task:` is a pretraining config)" if missing else "")
            + f", not {task!r}; shipped for {task}: {', '.join(fitting_configs(kind, task)) or 'none'}"
        )
    return uri


def fitting_configs(kind: str, task: str | None) -> list[str]:
    """The shipped configs to suggest: of `kind`, and for `task` when there is one."""
    if task is None:
        return shipped_configs(kind)
    if kind == "train":
        return task_configs(task)
    if kind == "space":
        return [c for c in (f"tune_{task}", "tune_tiny") if c in shipped_configs("space")]
    return shipped_configs(kind)


def check_task_keys(keys: list[str], task: str, flag: str = "--set") -> None:
    """Refuse options of a section the task does not read (e.g. `--set caption.max_length=20`
    for vqa): nothing would read them."""
    from pipelines.train.config import ConfigError

    for key in keys:
        section = key.split(".", 1)[0]
        if section in TASK_SECTIONS and section not in SECTIONS_READ.get(task, ()):
            readers = ", ".join(t for t, read in SECTIONS_READ.items() if section in read)
            raise ConfigError(
                f"{flag} {key}: a {section} option (read by {readers}), and this is task {task!r}: "
                "nothing would read it"
            )


# ---- the command --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mplug",
        description="mPLUG on Ray: the vision-language model and its Ray Data / Train / Tune pipeline. "
        "`mplug COMMAND --help` is the reference of each command.",
        epilog="examples:\n  mplug demo\n  mplug pretrain --help\n\n"
        "Exit status: 0 done; 1 failed; 2 invalid command line or config.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def error_line(err: BaseException) -> str:
    """What the CLI prints for an error: one line. A remote error's traceback is cut to its last
    line (what went wrong); a config error's key-per-line listing is joined with '; '."""
    from pipelines.train.config import ConfigError

    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        lines = lines[-1:]
    if isinstance(err, ConfigError) and len(lines) > 1:
        head = lines[0].rstrip(":")
        return f"{head}: {'; '.join(lines[1:])}"
    return lines[0] if lines else type(err).__name__


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
        if isinstance(err, ConfigError):  # the user's input: what to change, no traceback to offer
            print(f"mplug {args.command}: {error_line(err)}", file=sys.stderr)
            return 2
        kind = "" if isinstance(err, FileNotFoundError) else f"{type(err).__name__}: "
        print(f"mplug {args.command}: {kind}{error_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
