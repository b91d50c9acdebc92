"""Talking to a Ray cluster's Jobs API, for `mplug submit` and `mplug jobs`.

Four questions, one function each: where the cluster is (`resolve_address`), which token it
wants (`find_token`, Ray's own loader), what the job runs (`parse_mplug_command`,
`entrypoint`) and what ships with it (`project_runtime_env`). `connect` builds the client and
`cluster_errors` turns the client's failures into one line naming what is wrong.

The token is only ever placed in the request headers: never printed, logged, put into the
job's metadata, its runtime_env or its command line (`check_no_token_in` refuses a job that
would carry it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Ray's precedence for the Jobs API address: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS.
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
PACKAGE_NAME = "mplug-ray"
# Commands that act on a cluster from here; running them on the cluster makes no sense.
LOCAL_ONLY_COMMANDS = ("submit", "jobs")
# Never shipped as job env_vars: the cluster authenticates its own drivers.
_TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Left out of a checkout upload on top of .gitignore/.rayignore (keeps it to the sources).
CHECKOUT_EXCLUDES = [".git", ".venv", "demo_out", "runs", "*.egg-info", ".pytest_cache", ".ruff_cache"]
SHIP_MODES = ("auto", "checkout", "pip", "installed")
# Arguments naming a YAML of jobs/configs (or a path/URI): checked before submitting.
CONFIG_FLAGS = ("config", "space")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class SubmissionError(Exception):
    """One line naming what is wrong; the command prints it and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ---- where the cluster is ---------------------------------------------------------------------
def resolve_address(explicit: str | None) -> tuple[str | None, str]:
    """The Jobs API address and where it came from: `--address`, else RAY_API_SERVER_ADDRESS,
    else RAY_ADDRESS; (None, "auto") lets Ray look for a cluster started on this machine."""
    if explicit:
        return explicit, "--address"
    for name in ADDRESS_ENV:
        if os.environ.get(name):
            return os.environ[name], f"${name}"
    return None, "auto"


@contextlib.contextmanager
def _address_env_hidden() -> Iterator[None]:
    """Ray's client lets the address variables override its argument; `--address` must win."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---- which token it wants -----------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """Headers for the Jobs API. `source` names where the token came from (never the token)."""

    headers: dict[str, str] = field(repr=False)
    source: str | None

    @property
    def token(self) -> str | None:
        value = next((v for k, v in self.headers.items() if k.lower() == "authorization"), None)
        return value.split(" ", 1)[1] if value and " " in value else value


def token_source() -> str:
    """Where Ray's loader looks first that is set: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, the
    default file (the order of ray.rpc.AuthenticationTokenLoader)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"$RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return DEFAULT_TOKEN_FILE


def find_token() -> Credentials:
    """The token as Ray's own clients find it, as the `Authorization: Bearer` header Ray sends.

    Ray's HTTP client attaches it only when this process has RAY_AUTH_MODE=token; we ask the
    same loader with the mode check off, so a user need not set the mode to submit. Headers
    from RAY_JOB_HEADERS (JSON, as the `ray job` CLI reads them, e.g. for a proxy) come first;
    an Authorization header there is kept and the token is not added.
    """
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    headers = _job_headers()
    if any(k.lower() == "authorization" for k in headers):
        return Credentials(headers=headers, source="$RAY_JOB_HEADERS")
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since the last lookup
    try:
        auth = loader.get_token_for_http_header(ignore_auth_mode=True)
    except AuthenticationError:
        raise SubmissionError(
            f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')!r}: the token file cannot be read "
            "or is empty"
        ) from None
    if not auth:
        return Credentials(headers=headers, source=None)
    return Credentials(headers={**headers, **auth}, source=token_source())


def _job_headers() -> dict[str, str]:
    text = os.environ.get("RAY_JOB_HEADERS")
    if not text:
        return {}
    try:
        headers = json.loads(text)
    except json.JSONDecodeError:
        headers = None
    if not isinstance(headers, dict):
        raise SubmissionError('RAY_JOB_HEADERS is not a JSON object (e.g. {"X-Proxy-Key": "…"})')
    return {str(k): str(v) for k, v in headers.items()}


def check_no_token_in(credentials: Credentials, **parts: Any) -> None:
    """Refuse to send a job whose command, metadata or env_vars hold the token itself."""
    token = credentials.token
    if not token:
        return
    for name, value in parts.items():
        if token in json.dumps(value):
            raise SubmissionError(
                f"the job's {name} contains the cluster's auth token: it would be stored with the job "
                "and shown to anyone who lists jobs; remove it (the cluster authenticates its own drivers)"
            )


# ---- the client and its errors ----------------------------------------------------------------------
@dataclass
class Cluster:
    client: Any  # ray.job_submission.JobSubmissionClient
    address: str
    credentials: Credentials


# Ray's client narrates every packaging step at INFO and warns that .git/.venv are skipped;
# `mplug submit` prints one line saying what ships instead. Size warnings still show.
_CLIENT_LOG_LEVELS = {
    "ray._private.runtime_env.working_dir": logging.ERROR,
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
    "ray.dashboard.modules.job.sdk": logging.WARNING,
}


def connect(address: str | None) -> Cluster:
    """A Jobs API client for `address` (see `resolve_address`), with the token attached."""
    from ray.job_submission import JobSubmissionClient

    for name, level in _CLIENT_LOG_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    address, origin = resolve_address(address)
    credentials = find_token()
    if address is None:
        shown = "the local cluster (auto-detected; pass --address)"
    else:
        shown = address if origin == "--address" else f"{address} (from {origin})"
    with cluster_errors(shown, credentials), _address_env_hidden():
        client = JobSubmissionClient(address, headers=dict(credentials.headers))
    return Cluster(client=client, address=client.get_address(), credentials=credentials)


@contextlib.contextmanager
def cluster_errors(address: str, credentials: Credentials, job_id: str | None = None) -> Iterator[None]:
    """Map what Ray's client raises to a SubmissionError of one line."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        raise SubmissionError(_auth_message(str(err), address, credentials)) from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise SubmissionError(
            f"no Ray cluster answers at {address}: is the head running, and is this its dashboard "
            "address (http://HEAD:8265)?"
        ) from None
    except ValueError as err:
        raise SubmissionError(f"{address} is not a Ray dashboard address: {err}") from None
    except RuntimeError as err:
        text = str(err)
        if job_id and ("404" in text or "does not exist" in text):
            raise SubmissionError(
                f"no job {job_id!r} on the cluster at {address} (`mplug jobs list`)"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise SubmissionError(f"the cluster at {address} answered: {first}") from None


def _auth_message(text: str, address: str, credentials: Credentials) -> str:
    if not address.startswith(("http://", "https://")) and os.environ.get("RAY_AUTH_MODE") != "token":
        # Ray's client finds the dashboard of a GCS address (or of no address) over gRPC, and its
        # gRPC client sends the token only in RAY_AUTH_MODE=token.
        return (
            f"authentication refused by the cluster at {address} while Ray's client looked up its "
            "dashboard over GCS: pass the dashboard address (--address http://HEAD:8265), or set "
            "RAY_AUTH_MODE=token"
        )
    if text.startswith("Authentication required") or credentials.source is None:
        return (
            f"authentication refused by the cluster at {address}: it requires a token and none was found "
            f"(set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in {DEFAULT_TOKEN_FILE})"
        )
    return (
        f"authentication refused by the cluster at {address}: the token from {credentials.source} is wrong "
        "(use the token the cluster was started with)"
    )


# ---- what the job runs -------------------------------------------------------------------------------
def parse_mplug_command(words: list[str]) -> argparse.Namespace:
    """Check `words` (an `mplug` subcommand and its arguments) with the real `mplug` parser,
    here, before anything is submitted; a `--config`/`--space` must name a shipped config, a
    file or a URI. Returns the parsed arguments."""
    from jobs.cli import build_parser, check_config, resolve_config
    from pipelines.train.config import ConfigError

    if not words:
        raise SubmissionError("no command after `--`: e.g. `mplug submit -- env`", exit_code=2)
    if words[0] in LOCAL_ONLY_COMMANDS:
        raise SubmissionError(f"`mplug {words[0]}` runs here, not on the cluster", exit_code=2)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args(words)
        except SystemExit:
            lines = [ln for ln in errors.getvalue().strip().splitlines() if ln.strip()]
            reason = (
                lines[-1].split("error: ", 1)[-1].split(" (see `", 1)[0] if lines else "it only prints help"
            )
            raise SubmissionError(
                f"not a valid mplug command: `mplug {shlex.join(words)}`: {reason}", exit_code=2
            ) from None
    for flag in CONFIG_FLAGS:
        value = getattr(args, flag, None)
        if value is None:
            continue
        kind = "space" if flag == "space" else "ingest" if args.command == "ingest" else "train"
        task = None if kind == "ingest" else getattr(args, "fixed_task", None) or getattr(args, "task", None)
        try:
            # A shipped name or a local file is checked in full here; a URI may need the
            # cluster's credentials, and is read there.
            if "://" not in resolve_config(value, kind=kind, flag=f"--{flag}"):
                check_config(value, kind, task=task, flag=f"--{flag}")
        except ConfigError as err:
            raise SubmissionError(str(err), exit_code=2) from None
    return args


def check_job_config(args: argparse.Namespace) -> None:
    """The job's merged config (`args` from `parse_mplug_command`), checked as its command checks
    it before Ray starts (task, `--set` keys, `--init` for finetuning, a shipped `CHANGE-ME` with
    the flag to pass), so a job that would stop there is refused here, not submitted. A config
    given as a URI may need the cluster's credentials: it is read there."""
    from jobs.cli import resolve_config
    from pipelines.train.config import ConfigError, check_placeholders

    config = getattr(args, "config", None)
    kind = "ingest" if args.command == "ingest" else "train"
    try:
        if config is not None and "://" in resolve_config(config, kind=kind):
            return
        if args.command in ("train", "pretrain", "finetune", "tune"):
            from jobs.train_cmd import config_from_args

            check_placeholders(config_from_args(args).model_dump(mode="json"))
        elif args.command == "ingest":
            from jobs.ingest_cmd import PLACEHOLDER_FLAGS, build_config

            check_placeholders(build_config(args).model_dump(mode="json"), PLACEHOLDER_FLAGS)
    except ConfigError as err:
        raise SubmissionError(str(err), exit_code=2) from None


def entrypoint(words: list[str], python: str = "python") -> str:
    """The job's shell command. `python -m jobs.cli` (not `mplug`) so that an uploaded checkout
    (the job's working directory, first on its PYTHONPATH) wins over any installed copy;
    `python` is looked up on the head's PATH, the one `ray start` ran with."""
    return shlex.join([python, "-m", "jobs.cli", *words])


def check_job_id(name: str) -> str:
    if not _JOB_ID.fullmatch(name):
        raise SubmissionError(
            f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            exit_code=2,
        )
    return name


# ---- what ships with it ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShippedProject:
    runtime_env: dict[str, Any] = field(repr=False)
    mode: str  # checkout | pip | installed
    description: str


def checkout_root() -> Path | None:
    """The source checkout this `jobs` package runs from, if it runs from one (an editable
    install or the repository itself), else None (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or not all((root / d).is_dir() for d in ("mplug", "pipelines", "jobs")):
        return None
    return root if f'name = "{PACKAGE_NAME}"' in pyproject.read_text() else None


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE_NAME)
    except PackageNotFoundError:
        raise SubmissionError(
            f"--ship pip: the {PACKAGE_NAME} package is not installed here, so there is no version to pin"
        ) from None


def job_env_vars(names: list[str]) -> dict[str, str]:
    """`--env NAME` values from this environment (storage credentials and endpoints)."""
    values = {}
    for name in names:
        if name in _TOKEN_ENV or name.startswith("RAY_AUTH"):
            raise SubmissionError(
                f"--env {name}: the auth token is never shipped with a job (the cluster has its own)",
                exit_code=2,
            )
        if name not in os.environ:
            raise SubmissionError(f"--env {name}: not set in this environment", exit_code=2)
        values[name] = os.environ[name]
    return values


def project_runtime_env(mode: str, env_vars: dict[str, str]) -> ShippedProject:
    """What the cluster needs to run our code.

    - `checkout`: this source checkout as the job's working_dir (honouring .gitignore and
      .rayignore, plus CHECKOUT_EXCLUDES); the nodes need only the dependencies.
    - `pip`: a pinned `mplug-ray==VERSION` requirement, installed by Ray in a virtualenv on each
      node (from the package index the cluster reaches).
    - `installed`: nothing; the nodes have the package (setup_commands, or the image).
    - `auto`: `checkout` when this runs from a checkout, else `pip`.
    """
    if mode not in SHIP_MODES:
        raise SubmissionError(f"--ship {mode!r}: expected one of {', '.join(SHIP_MODES)}", exit_code=2)
    root = checkout_root()
    if mode == "auto":
        mode = "checkout" if root is not None else "pip"
    env: dict[str, Any] = {"env_vars": dict(env_vars)} if env_vars else {}
    if mode == "checkout":
        if root is None:
            raise SubmissionError(
                "--ship checkout: this mplug does not run from a source checkout", exit_code=2
            )
        env.update(working_dir=str(root), excludes=list(CHECKOUT_EXCLUDES))
        return ShippedProject(env, "checkout", f"the checkout {root} as the job's working_dir")
    if mode == "pip":
        pin = f"{PACKAGE_NAME}=={installed_version()}"
        env["pip"] = [pin]
        return ShippedProject(env, "pip", f"pip requirement {pin}, installed on each node")
    return ShippedProject(env, "installed", "nothing: the cluster's nodes have mplug installed")


def job_metadata(words: list[str], shipped: ShippedProject) -> dict[str, str]:
    """Stored with the job (shown by `mplug jobs`); names the command, never a secret."""
    return {"mplug_command": shlex.join(words), "mplug_ship": shipped.mode}


# ---- reading jobs back ---------------------------------------------------------------------------------
def get_job(cluster: Cluster, job_id: str):
    """The job's details, or None when the cluster has no job of that id."""
    try:
        with cluster_errors(cluster.address, cluster.credentials, job_id):
            return cluster.client.get_job_info(job_id)
    except SubmissionError as err:
        if str(err).startswith("no job "):
            return None
        raise


def job_command(details) -> str:
    """`mplug …` as the user typed it, else Ray's entrypoint."""
    meta = details.metadata or {}
    return f"mplug {meta['mplug_command']}" if "mplug_command" in meta else details.entrypoint


def masked_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """The runtime_env with env_var values hidden (they may be storage credentials)."""
    env = dict(runtime_env or {})
    if "env_vars" in env:
        env["env_vars"] = {name: "***" for name in env["env_vars"]}
    return env
