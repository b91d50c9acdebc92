"""Killing a driver the way a crash does: for the tests that check a relaunch picks up the work."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def sigkill_when(
    cmd: list[str],
    log: Path,
    ready: Callable[[], object],
    *,
    timeout_s: float,
    what: str,
    env: dict[str, str] | None = None,
    poll_s: float = 0.5,
) -> None:
    """Run `cmd` in its own session until `ready()` is truthy, then SIGKILL its whole process
    group. Output goes to `log`, a file and not a pipe: a full pipe nobody reads would stall the
    driver. Fails with the log's tail if the command ends first or `what` has not happened in time."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, f"ended before {what}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f}s"
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
