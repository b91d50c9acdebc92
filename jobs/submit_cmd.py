"""`mplug submit`: run any `mplug` command on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from jobs.cli import add_command
from jobs.submission import (
    SHIP_MODES,
    SubmissionError,
    check_job_config,
    check_job_id,
    check_no_token_in,
    cluster_errors,
    connect,
    entrypoint,
    get_job,
    job_env_vars,
    job_metadata,
    parse_mplug_command,
    project_runtime_env,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "submit",
        help="run an mplug command on a Ray cluster (Ray Jobs API, token auth)",
        examples=[
            "mplug submit --address http://head:8265 --wait -- pretrain --config pretrain_tiny "
            "--data s3://bucket/processed --storage s3://bucket/runs --name tiny",
            "mplug submit --address http://head:8265 --env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY "
            "--name ingest-laion -- ingest --config ingest_laion_urls --input s3://bucket/laion.parquet "
            "--output s3://bucket/processed/laion",
        ],
        description="Submit `mplug SUBCOMMAND ARGS…` (the words after `--`) as a Ray job, e.g. "
        "`mplug submit --wait -- pretrain --config pretrain_tiny --data s3://… --storage s3://…`. "
        "The command is checked here with the real parser first. The token is found as Ray's clients "
        "find it ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and sent only as the "
        "request's Authorization header. Exit status: 0 submitted (with --wait: the job succeeded); "
        "the job's own exit status when it failed under --wait; 1 refused or failed; 2 invalid command.",
    )  # fmt: skip
    p.add_argument(
        "--address",
        help="the cluster's dashboard (Jobs API) address, e.g. http://127.0.0.1:8265 (default: "
        "$RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, else a cluster started on this machine)",
    )
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument(
        "--name",
        help="the job's submission id: a named job is never started twice (a second submit says it "
        "exists) (default: an id Ray generates)",
    )
    p.add_argument("--gpus", type=float, default=None, metavar="N",
                   help="GPUs reserved for the command's driver process (default: none)")  # fmt: skip
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable's value to the job (storage credentials/endpoint); repeat. "
        "Values are stored in the job's runtime_env, visible to whoever can list the cluster's jobs",
    )
    p.add_argument(
        "--ship",
        choices=SHIP_MODES,
        default="auto",
        help="how the project reaches the cluster: checkout (this source tree as working_dir, honouring "
        ".gitignore), pip (a pinned mplug-ray==VERSION requirement), installed (the nodes have it); "
        "auto: checkout when running from a checkout, else pip",
    )
    p.add_argument(
        "--python",
        default="python",
        help="the interpreter that runs the command on the head, found on the PATH `ray start` ran with; "
        "give a full path if that is not the environment with Ray",
    )
    p.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- SUBCOMMAND [ARGS…]: the mplug command to run"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return submit(args)
    except SubmissionError as err:
        print(f"mplug submit: {err}", file=sys.stderr)
        return err.exit_code


def submit(args: argparse.Namespace) -> int:
    words = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    check_job_config(parse_mplug_command(words))  # fails here, before any cluster is contacted
    job_id = check_job_id(args.name) if args.name else None
    shipped = project_runtime_env(args.ship, job_env_vars(args.env))
    cluster = connect(args.address)
    if job_id is not None:
        _refuse_existing(cluster, job_id)
    command, metadata = entrypoint(words, args.python), job_metadata(words, shipped)
    check_no_token_in(cluster.credentials, command=command, metadata=metadata, env_vars=shipped.runtime_env)
    print(f"mplug submit: shipping {shipped.description}", flush=True)
    with cluster_errors(cluster.address, cluster.credentials, job_id):
        try:
            job_id = cluster.client.submit_job(
                entrypoint=command,
                runtime_env=shipped.runtime_env,
                metadata=metadata,
                submission_id=job_id,
                entrypoint_num_gpus=args.gpus,
            )
        except RuntimeError as err:
            if job_id and "already exists" in str(err):  # submitted by someone else meanwhile
                _refuse_existing(cluster, job_id)
            raise
    print(f"mplug submit: job {job_id} submitted to {cluster.address}: mplug {' '.join(words)}", flush=True)
    if not args.wait:
        print(f"  follow: mplug jobs logs {job_id} --follow    stop: mplug jobs stop {job_id}")
        return 0
    return follow(cluster, job_id)


def _refuse_existing(cluster, job_id: str) -> None:
    details = get_job(cluster, job_id)
    if details is None:
        return
    if not details.status.is_terminal():
        raise SubmissionError(
            f"job {job_id!r} is already {details.status.value} on {cluster.address}: not starting a second one "
            f"(follow it: mplug jobs logs {job_id} --follow; stop it: mplug jobs stop {job_id})"
        )
    raise SubmissionError(
        f"job {job_id!r} already ran on {cluster.address} ({details.status.value}) and Ray never reuses a "
        "submission id: pick another --name (a training's own --name still resumes its checkpoints)"
    )


def follow(cluster, job_id: str) -> int:
    """Stream the job's logs until it ends; its exit status: 0 SUCCEEDED, the driver's own
    status (or 1) FAILED, 1 STOPPED. Ctrl-C stops following, not the job."""
    try:
        with cluster_errors(cluster.address, cluster.credentials, job_id):
            asyncio.run(_stream_logs(cluster.client, job_id))
            details = _wait_terminal(cluster.client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nmplug submit: stopped following; job {job_id} keeps running (mplug jobs stop {job_id})",
            file=sys.stderr,
        )
        return 130
    status = details.status.value
    if status == "SUCCEEDED":
        print(f"mplug submit: job {job_id} SUCCEEDED")
        return 0
    message = (details.message or "").strip().splitlines()
    print(f"mplug submit: job {job_id} {status}" + (f": {message[-1]}" if message else ""), file=sys.stderr)
    return (details.driver_exit_code or 1) if status == "FAILED" else 1


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait_terminal(client, job_id: str, poll_s: float = 0.5):
    """The log stream closes when the job ends; its status may land a moment later."""
    while True:
        details = client.get_job_info(job_id)
        if details.status.is_terminal():
            return details
        time.sleep(poll_s)
