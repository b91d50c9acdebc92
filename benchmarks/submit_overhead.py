"""What `mplug submit` adds before training starts, on a local token-auth Ray head.

The same small pretraining runs two ways against one `ray start --head` (token auth on):
directly (`mplug pretrain --address GCS`, a driver on this machine) and submitted (`mplug submit
--wait -- pretrain …`, a Ray job whose driver the cluster starts). Measured from launching the
command to the first `[mplug] step 1/` line, and to the end; for submissions also to the
`submitted` line (client: parse, package, upload) and to `Running entrypoint` (the cluster:
supervisor actor, runtime_env). Runs alternate so machine load falls on both alike.

    .venv/bin/python benchmarks/submit_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.ray_head import RayHead, start_head, stop_head  # noqa: E402

FIRST_STEP = "[mplug] step 1/"


def driver_env(head: RayHead) -> dict[str, str]:
    """A user's shell for this cluster: its token file; RAY_AUTH_MODE for the direct driver's
    ray.init (the Jobs client does not need it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token_file))
    return env


def timed(cmd: list[str], env: dict[str, str], marks: dict[str, str]) -> dict[str, float]:
    """Seconds from launch to the first line containing each mark, and to the end."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *cmd],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    seen: dict[str, float] = {}
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        for name, mark in marks.items():
            if name not in seen and mark in line:
                seen[name] = time.monotonic() - t0
    if proc.wait() != 0 or "first step" not in seen:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{''.join(tail)}")
    seen["end"] = time.monotonic() - t0
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rows", type=int, default=120, help="synthetic scenes (80%% go to training)")
    args = parser.parse_args()

    from pipelines.synth.world import render_corpus

    work = Path(tempfile.mkdtemp(prefix="mplug-submit-bench-"))
    head = start_head(num_cpus=8)
    try:
        env = driver_env(head)
        raw = render_corpus(str(work / "raw"), num=args.rows, fmt="parquet", seed=0, image_size=64)
        data = str(work / "processed")
        ingest = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "ingest", "--input", raw["train"], "--format", "parquet",
             "--output", data, "--image-size", "64", "--min-image-size", "32", "--quiet",
             "--address", head.gcs_address],
            cwd=REPO, env=env, capture_output=True, text=True,
        )  # fmt: skip
        if ingest.returncode != 0:
            raise SystemExit(f"ingest failed ({ingest.returncode}):\n{ingest.stderr[-3000:]}")

        def train(name: str) -> list[str]:
            return [
                "pretrain", "--config", "pretrain_tiny", "--data", data, "--storage", str(work / "runs"),
                "--name", name, "--max-steps", str(args.steps), "--batch-size", "8",
                "--num-workers", str(args.workers), "--checkpoint-every", str(args.steps),
                "--set", "run.log_every=1", "--set", "optim.warmup_steps=1",
            ]  # fmt: skip

        results: dict[str, list[dict[str, float]]] = {"direct": [], "submit": []}
        for r in range(args.repeats):
            order = ["direct", "submit"] if r % 2 == 0 else ["submit", "direct"]
            for way in order:
                name = f"{way}-{r}"
                if way == "direct":
                    cmd = [*train(name)[:1], "--address", head.gcs_address, *train(name)[1:]]
                    marks = {"first step": FIRST_STEP}
                else:
                    cmd = ["submit", "--address", head.dashboard_url, "--wait", "--", *train(name)]
                    marks = {
                        "submitted": "submitted to",
                        "entrypoint": "Running entrypoint",
                        "first step": FIRST_STEP,
                    }
                results[way].append(timed(cmd, env, marks))
                print(way, r, {k: round(v, 1) for k, v in results[way][-1].items()}, flush=True)
    finally:
        stop_head(head)
        shutil.rmtree(work, ignore_errors=True)

    def median(way: str, key: str) -> float:
        return statistics.median(run[key] for run in results[way])

    print(
        f"\n{args.repeats} run(s) each, {args.workers} worker(s), {args.steps} steps, {os.cpu_count()} cores"
    )
    print(
        f"{'':10} {'submitted':>10} {'entrypoint':>11} {'first step':>11} {'end':>8}   (median s from launch)"
    )
    for way in ("direct", "submit"):
        cells = [f"{median(way, k):10.1f}" if way == "submit" else f"{'-':>10}" for k in ("submitted",)]
        cells.append(f"{median(way, 'entrypoint'):11.1f}" if way == "submit" else f"{'-':>11}")
        print(
            f"{way:10} " + " ".join(cells) + f" {median(way, 'first step'):11.1f} {median(way, 'end'):8.1f}"
        )
    print(
        f"overhead to the first step: {median('submit', 'first step') - median('direct', 'first step'):+.1f} s"
    )


if __name__ == "__main__":
    main()
