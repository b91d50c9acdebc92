"""`mplug submit` / `mplug jobs` against a real `ray start --head` with token authentication.

The head gets no storage settings: the job reaches moto S3 only through `--env`. Each
submission runs as a user runs it (`python -m jobs.cli …` in its own process and environment).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_head import RayHead, join_node, start_head, stop_head

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STORAGE_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
)
_RAY_CLIENT_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_JOB_HEADERS",
)


@pytest.fixture(scope="module")
def head() -> RayHead:
    """A head, and a second node on this machine that shares its log folder (as every node of
    Ray's fake multi-node autoscaler does): two log monitors publish every worker line."""
    h = start_head(num_cpus=8)
    try:
        join_node(h, num_cpus=0)
        yield h
    finally:
        stop_head(h)


def user_env(head: RayHead, token: str, home: Path) -> dict[str, str]:
    """A user's shell: the S3 settings exported; the token from its file ("file"), none at all
    ("none", and an empty home, so no ~/.ray/auth_token either) or a wrong one ("wrong").
    RAY_AUTH_MODE is not set: `mplug submit` must not need it."""
    env = {k: v for k, v in os.environ.items() if k not in _RAY_CLIENT_ENV}
    if token == "file":
        env["RAY_AUTH_TOKEN_PATH"] = str(head.token_file)
    elif token == "wrong":
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    else:
        env["HOME"] = str(home)
    return env


def mplug(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def jobs_client(head: RayHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})


def wait_until_started(client, job_id: str, proc: subprocess.Popen, deadline_s: float = 300):
    """The job's status once it has left PENDING (or the submitting process has ended)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        ids = {j.submission_id for j in client.list_jobs()}
        if job_id in ids:
            status = client.get_job_status(job_id)
            if status.value != "PENDING":
                return status
        if proc.poll() is not None and job_id not in ids:
            pytest.fail(f"`mplug submit` ended ({proc.returncode}) without submitting: {proc.communicate()}")
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not start within {deadline_s:.0f}s")


def test_pretraining_submitted_with_token_lands_in_s3_and_refusals_are_clear(head, s3_bucket, tmp_path):
    from pipelines.synth.world import render_corpus

    env = user_env(head, "file", tmp_path)
    outputs: list[str] = []
    submit = ["submit", "--address", head.dashboard_url, *[a for n in STORAGE_ENV for a in ("--env", n)]]

    # Data: rendered here, ingested on the cluster.
    raw = render_corpus(s3_bucket.uri("raw"), num=60, fmt="parquet", seed=3, image_size=64)
    processed = s3_bucket.uri("processed")
    ingest = mplug(
        [*submit, "--wait", "--", "ingest", "--input", raw["train"], "--format", "parquet",
         "--output", processed, "--image-size", "64", "--min-image-size", "32"],
        env,
    )  # fmt: skip
    outputs += [ingest.stdout, ingest.stderr]
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    assert "SUCCEEDED" in ingest.stdout

    # The training, followed (--wait) in the background while the refusals run.
    job_id = f"pretrain-{secrets.token_hex(4)}"
    train_cmd = [
        "pretrain", "--config", "pretrain_tiny", "--data", processed, "--storage", s3_bucket.uri("runs"),
        "--name", "submitted", "--max-steps", "4", "--batch-size", "8", "--num-workers", "1",
        "--checkpoint-every", "4", "--set", "run.log_every=2", "--set", "optim.warmup_steps=1",
    ]  # fmt: skip
    train = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *submit, "--wait", "--name", job_id, "--", *train_cmd],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = jobs_client(head)
        wait_until_started(client, job_id, train)

        twin = mplug([*submit, "--name", job_id, "--", *train_cmd], env, timeout=120)
        outputs += [twin.stdout, twin.stderr]
        assert twin.returncode == 1
        assert twin.stderr.startswith(f"mplug submit: job {job_id!r} ") and "already" in twin.stderr
        assert len(twin.stderr.strip().splitlines()) == 1
        if not client.get_job_status(job_id).is_terminal():  # so it was running when refused
            assert f"job {job_id!r} is already RUNNING" in twin.stderr
        assert [j.submission_id for j in client.list_jobs()].count(job_id) == 1

        jobs_before = len(client.list_jobs())
        for token, says in (("none", "none was found"), ("wrong", "is wrong")):
            refused = mplug([*submit, "--", "env"], user_env(head, token, tmp_path), timeout=120)
            outputs += [refused.stdout, refused.stderr]
            assert refused.returncode == 1
            line = refused.stderr.strip().splitlines()[-1]
            assert line.startswith("mplug submit: authentication refused by the cluster at") and says in line
            assert "Traceback" not in refused.stderr
        # A GCS address makes Ray's client look the dashboard up over gRPC: it says what to do.
        via_gcs = mplug(["submit", "--address", head.gcs_address, "--", "env"], env, timeout=120)
        outputs += [via_gcs.stdout, via_gcs.stderr]
        assert via_gcs.returncode == 1
        assert "pass the dashboard address" in via_gcs.stderr.strip().splitlines()[-1]
        assert len(client.list_jobs()) == jobs_before

        out, err = train.communicate(timeout=900)
    finally:
        if train.poll() is None:
            train.kill()
            train.communicate()
    outputs += [out, err]
    assert train.returncode == 0, (out[-4000:], err[-3000:])
    assert "step 4/4" in out and f"job {job_id} SUCCEEDED" in out
    # Each worker line once, though two nodes' log monitors sent it (it came 2-3 times before).
    for line in ("[mplug] step 2/4 ", "[mplug] step 4/4 ", "[mplug] task pretrain: "):
        assert sum(line in ln for ln in out.splitlines()) == 1, (
            line,
            [ln for ln in out.splitlines() if line in ln or "repeated" in ln],
        )

    # The artefacts are in object storage.
    fs = s3_bucket.s3fs
    run = f"{s3_bucket.name}/runs/submitted"
    assert fs.exists(f"{run}/final") and fs.ls(f"{run}/final")
    assert fs.exists(f"{run}/metrics.csv")
    assert any(p.rsplit("/", 1)[-1] == "checkpoint_00000004" for p in fs.ls(run))

    # A search that finetunes the submitted pretraining, as a user goes on: one retrieval trial
    # (the image-text pairs at hand), scored every epoch. This checks that a search runs as a job
    # and leaves its results in object storage; what a search decides is the Tune test's subject.
    # While it runs, `mplug jobs` reads the ended training back; env var values stay hidden. Each
    # call in its own process, as every other call here: Ray caches the token it loads for the
    # life of a process, and this process's Ray (the shared test instance) has another.
    tune_id = f"tune-{secrets.token_hex(4)}"
    tune = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *submit, "--wait", "--name", tune_id, "--", "tune", "--task",
         "retrieval", "--config", "finetune_retrieval_tiny", "--space", "tune_tiny", "--data", processed,
         "--eval-data", processed, "--init", s3_bucket.uri("runs/submitted/final"), "--storage",
         s3_bucket.uri("tune"), "--name", "search", "--num-samples", "1", "--scheduler", "fifo", "--epochs", "1",
         "--batch-size", "8", "--num-workers", "1", "--set", "run.checkpoint_every=10000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address = ["--address", head.dashboard_url]
        said = {}
        for action in (["status", job_id], ["list"], ["logs", job_id], ["stop", job_id]):
            done = mplug(["jobs", *action, *address], env, timeout=120)
            outputs += [done.stdout, done.stderr]
            assert done.returncode == 0, done.stderr[-3000:]
            said[action[0]] = done.stdout
        tune_out, tune_err = tune.communicate(timeout=900)
    finally:
        if tune.poll() is None:
            tune.kill()
            tune.communicate()
    assert "SUCCEEDED" in said["status"] and f"mplug {' '.join(train_cmd[:3])}" in said["status"]
    assert '"AWS_SECRET_ACCESS_KEY": "***"' in said["status"]
    assert any(job_id in ln and "SUCCEEDED" in ln for ln in said["list"].splitlines())
    assert "step 4/4" in said["logs"]
    assert said["stop"].strip() == f"job {job_id} is not running (SUCCEEDED)"

    outputs += [tune_out, tune_err]
    assert tune.returncode == 0, (tune_out[-4000:], tune_err[-3000:])
    assert f"job {tune_id} SUCCEEDED" in tune_out
    search = f"{s3_bucket.name}/tune/search"
    with fs.open(f"{search}/results.csv") as f:
        results = f.read().decode().splitlines()
    header, row = results[0].split(","), results[1].split(",")
    assert len(results) == 2 and row[header.index("status")] == "finished", results
    assert "optim.lr" in header and "best_eval_r_mean" in header
    assert fs.exists(f"{search}/best.yaml") and fs.exists(f"{search}/search.png")
    assert fs.exists(f"{search}/{row[header.index('trial')]}/final/config.json")

    # The token is in no output, no job's logs and no job's stored details.
    token = head.token
    for job in client.list_jobs():
        outputs += [client.get_job_logs(job.submission_id), job.model_dump_json()]
    assert not [text for text in outputs if token in text]
