"""`mplug jobs list|status|logs|stop`: the jobs on a Ray cluster (those of `mplug submit` and any other)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime

from jobs.cli import add_command
from jobs.submission import SubmissionError, cluster_errors, connect, job_command, masked_runtime_env


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "jobs",
        help="list the jobs on a Ray cluster, show one's status or logs, stop one",
        description="The jobs of a Ray cluster through its Jobs API, with the same address and token "
        "lookup as `mplug submit`.",
        examples=[
            "mplug jobs list --address http://head:8265",
            "mplug jobs logs pretrain-base --follow --address http://head:8265",
        ],
    )  # fmt: skip
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text, example in (
        ("list", "every job: id, status, start time, command", "mplug jobs list --address http://head:8265"),
        ("status", "one job's status, message, command and what shipped with it",
         "mplug jobs status pretrain-base --address http://head:8265"),
        ("logs", "one job's driver log (--follow: until it ends)",
         "mplug jobs logs pretrain-base --follow --address http://head:8265"),
        ("stop", "ask a running job to stop", "mplug jobs stop pretrain-base --address http://head:8265"),
    ):  # fmt: skip
        a = add_command(actions, name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                        examples=[example])  # fmt: skip
        if name != "list":
            a.add_argument("job_id", metavar="ID", help="the submission id (`mplug jobs list`)")
        if name == "logs":
            a.add_argument("--follow", action="store_true", help="stream new lines until the job ends")
        a.add_argument(
            "--address", help="dashboard address, e.g. http://127.0.0.1:8265 (default: as `mplug submit`)"
        )
        a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cluster = connect(args.address)
        with cluster_errors(cluster.address, cluster.credentials, getattr(args, "job_id", None)):
            return ACTIONS[args.action](cluster.client, args)
    except SubmissionError as err:
        print(f"mplug jobs {args.action}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def list_jobs(client, args: argparse.Namespace) -> int:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [
        (j.submission_id or j.job_id or "-", j.status.value, _when(j.start_time), job_command(j))
        for j in jobs
    ]
    if not rows:
        print("no jobs")
        return 0
    widths = [max(len(r[i]) for r in [("ID", "STATUS", "STARTED", ""), *rows]) for i in range(3)]
    for row in [("ID", "STATUS", "STARTED", "COMMAND"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def status(client, args: argparse.Namespace) -> int:
    j = client.get_job_info(args.job_id)
    lines = [
        ("status", j.status.value),
        ("command", job_command(j)),
        ("entrypoint", j.entrypoint),
        ("started", _when(j.start_time)),
        ("ended", _when(j.end_time)),
        ("exit code", "-" if j.driver_exit_code is None else str(j.driver_exit_code)),
        ("message", (j.message or "-").strip().splitlines()[-1] if (j.message or "").strip() else "-"),
        ("runtime_env", json.dumps(masked_runtime_env(j.runtime_env), sort_keys=True)),
    ]
    print(f"job {args.job_id}")
    for key, value in lines:
        print(f"  {key:<12} {value}")
    return 0


def logs(client, args: argparse.Namespace) -> int:
    if not args.follow:
        sys.stdout.write(client.get_job_logs(args.job_id))
        return 0

    async def stream() -> None:
        async for chunk in client.tail_job_logs(args.job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(stream())
    return 0


def stop(client, args: argparse.Namespace) -> int:
    if client.stop_job(args.job_id):
        print(f"job {args.job_id}: stop requested (`mplug jobs status {args.job_id}` shows when it ends)")
    else:
        print(f"job {args.job_id} is not running ({client.get_job_status(args.job_id).value})")
    return 0


ACTIONS = {"list": list_jobs, "status": status, "logs": logs, "stop": stop}
