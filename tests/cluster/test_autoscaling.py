"""Autoscaling cloud training on Ray's real autoscaler (v2), over its fake multi-node provider.

One cluster for the module (`tests/cluster/autoscaling.py`): a head that offers no CPU for work
and a worker node type of 3 CPUs, 0..2 nodes, a short idle timeout. Every node the autoscaler
launches is a real raylet on this machine. On it, as a user submits them:

1. one elastic pretraining (`--num-workers 1,2 --autoscaling`): the autoscaler launches nodes for
   it, it trains on two workers once both exist, one node is lost mid-run (SIGKILLed as a reclaimed
   spot instance is), the run goes on and finishes its planned steps, the autoscaler replaces the
   node, and afterwards the cluster shrinks back to its head alone;
2. one Tune search of two concurrent trials (`--autoscaling --max-concurrent 2`): the autoscaler
   launches a node for each, the search completes, the cluster shrinks back again.

The figures printed (`[autoscaling] …`) are the ones docs/clusters.md quotes; nothing asserts them.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster.autoscaling import (
    WORKER_TYPE,
    Cluster,
    alive_actors,
    alive_worker_nodes,
    autoscaler_events,
    cluster_status,
    preempt_node,
    start_cluster,
    stop_cluster,
    wait_for,
    worker_node_ids,
)

pytestmark = pytest.mark.cluster

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
    "RAY_JOB_HEADERS",
)
# One Train worker per node: 2 of a node's 3 CPUs, the third for the worker's data stream.
CPUS_PER_WORKER = 2
MAX_STEPS = 12
# Guards only (the machine is shared and loaded); every wait polls for the state it needs.
JOB_TIMEOUT_S = 1200
SCALE_TIMEOUT_S = 300


@dataclass
class Shared:
    """What the module's tests hand on: where the data and the pretrained model are."""

    bucket: str
    processed: str
    pretrained: str | None = None
    figures: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    c = start_cluster(worker_cpus=CPUS_PER_WORKER + 1, max_workers=2, idle_timeout_s=12)
    try:
        yield c
    finally:
        stop_cluster(c)


@pytest.fixture(scope="module")
def shared(ray_session, s3_endpoint) -> Shared:
    """A tiny processed corpus on S3 (synth → ingest on the session's local Ray, as test_pretrain
    makes its own): the cluster's nodes are for the jobs under test."""
    import boto3

    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.synth.world import render_corpus

    bucket = f"autoscaling-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    raw = render_corpus(f"s3://{bucket}/raw", num=160, fmt="parquet", seed=5, image_size=64)
    processed = f"s3://{bucket}/processed"
    run_ingest(
        IngestConfig(input=raw["train"], format="parquet", output=processed, image_size=64, min_image_size=32)
    )
    return Shared(bucket=bucket, processed=processed)


class SubmittedJob:
    """`mplug submit --wait …` in its own process, as a user runs it; its output is collected
    line by line (with the time each arrived) while the test watches the cluster."""

    def __init__(self, cluster: Cluster, job_id: str, command: list[str], ship: str = "checkout"):
        env = {k: v for k, v in os.environ.items() if k not in _RAY_CLIENT_ENV}
        env["RAY_AUTH_TOKEN_PATH"] = str(cluster.head.token_file)
        env["PYTHONUNBUFFERED"] = "1"  # each line as it comes: the test acts on them mid-run
        submit = [
            "submit",
            "--address",
            cluster.head.dashboard_url,
            "--ship",
            ship,
            *[a for n in STORAGE_ENV for a in ("--env", n)],
        ]
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", *submit, "--wait", "--name", job_id, "--", *command],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def running(self) -> bool:
        return self.proc.poll() is None

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, str] | None:
        """The first output line matching `pattern` that arrived after `after` (monotonic)."""
        regex = re.compile(pattern)
        return next(((t, line) for t, line in list(self.lines) if t > after and regex.search(line)), None)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def finish(self, timeout_s: float) -> int:
        try:
            self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=30)
        return self.proc.returncode


def _launched(events: list[str]) -> int:
    """Worker nodes the autoscaler says it added ("Adding 2 node(s) of type cpu-worker.")."""
    return sum(
        int(m.group(1))
        for e in events
        if (m := re.match(rf"Adding (\d+) node\(s\) of type {WORKER_TYPE}", e))
    )


def _scaled_to_head_alone(cluster: Cluster) -> None:
    """After a job: no actor of ours or of Ray's left on a worker node, then every worker node
    removed as idle, the autoscaler's own report listing the head alone."""
    workers = {n["node_id"] for n in alive_worker_nodes(cluster)}
    pinned = [
        (a.get("class_name"), a.get("name")) for a in alive_actors(cluster) if a.get("node_id") in workers
    ]
    assert not pinned, f"actors left on worker nodes keep them from scaling down: {pinned}"
    wait_for(
        "the idle worker nodes removed", lambda: not alive_worker_nodes(cluster), SCALE_TIMEOUT_S, poll_s=2
    )
    status = cluster_status(cluster)
    assert not worker_node_ids(status) and not status["pending_nodes"] and not status["pending_launches"], (
        status
    )
    assert any(
        re.match(rf"Removing \d+ nodes of type {WORKER_TYPE} \(idle\)", e) for e in autoscaler_events(cluster)
    )


def test_elastic_pretraining_grows_survives_a_lost_node_and_scales_to_zero(cluster, shared):
    fs = _s3fs()
    assert not alive_worker_nodes(cluster), "the cluster should start as its head alone"
    runs = f"s3://{shared.bucket}/runs"
    job = SubmittedJob(
        cluster,
        f"elastic-{secrets.token_hex(3)}",
        ["train", "--task", "pretrain", "--config", "pretrain_tiny", "--data", shared.processed,
         "--storage", runs, "--name", "elastic", "--num-workers", "1,2", "--autoscaling",
         "--cpus-per-worker", str(CPUS_PER_WORKER), "--max-steps", str(MAX_STEPS), "--batch-size", "8",
         "--checkpoint-every", "2", "--max-failures", "4", "--set", "run.log_every=1",
         "--set", "optim.warmup_steps=1"],
    )  # fmt: skip
    try:
        # Scale-up: the autoscaler launches worker nodes for the job's workers.
        wait_for("a worker node launched for the job", lambda: alive_worker_nodes(cluster), SCALE_TIMEOUT_S,
                 alive=job.running)  # fmt: skip
        first_node = time.monotonic()
        two = wait_for("training on two workers", lambda: job.first(r"\[mplug\] task pretrain: 2 worker\(s\)"),
                       JOB_TIMEOUT_S, alive=job.running)  # fmt: skip
        status = cluster_status(cluster)
        before = worker_node_ids(status)
        assert len(before) == 2, status
        assert _launched(autoscaler_events(cluster)) >= 2, autoscaler_events(cluster)
        step_on_two = wait_for("a step on two workers", lambda: job.first(r"\[mplug\] step \d+/", after=two[0]),
                               JOB_TIMEOUT_S, alive=job.running)  # fmt: skip
        # A checkpoint Ray Train has registered: the step after the first checkpoint (step 2)
        # starts only once that checkpoint's report returned.
        wait_for("a checkpoint on two workers, registered",
                 lambda: job.first(r"\[mplug\] step ([3-9]|\d\d+)/", after=two[0]), JOB_TIMEOUT_S,
                 alive=job.running)  # fmt: skip
        assert [p for p in fs.ls(f"{shared.bucket}/runs/elastic") if "checkpoint_" in p]

        # Preemption: one of the two nodes vanishes mid-run.
        lost = sorted(before)[-1]
        assert preempt_node(cluster, lost) > 0
        killed = time.monotonic()
        resumed = wait_for("the run restored from its checkpoint after the loss",
                           lambda: job.first(r"\[mplug\] resumed from step \d+", after=killed),
                           JOB_TIMEOUT_S, alive=job.running)  # fmt: skip
        again = wait_for("a step after the loss", lambda: job.first(r"\[mplug\] step \d+/", after=resumed[0]),
                         JOB_TIMEOUT_S, alive=job.running)  # fmt: skip
        # Smaller (1 worker) if it restarted before the autoscaler's replacement joined, else on 2
        # again: whichever, the log says so.
        group = job.first(r"\[mplug\] task pretrain: \d+ worker\(s\)", after=killed)
        assert group, job.text()[-3000:]
        if " 1 worker(s)" in group[1]:
            assert job.first(
                r"\[mplug\] worker group changed from 2 to 1 worker\(s\) \(a node was lost", after=killed
            )
        # The autoscaler replaces it: a third node launched for the workers the run still wants.
        wait_for(
            "a node launched in place of the lost one",
            lambda: worker_node_ids(cluster_status(cluster)) - before,
            SCALE_TIMEOUT_S,
            poll_s=3,
        )
        assert _launched(autoscaler_events(cluster)) >= 3, autoscaler_events(cluster)
        code = job.finish(JOB_TIMEOUT_S)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- the job's output ---\n{job.text()[-6000:]}") from e
    finally:
        if job.running():
            job.finish(0)
    out = job.text()
    assert code == 0, out[-6000:]
    assert re.search(r"job elastic-\w+ SUCCEEDED", out), out[-3000:]
    assert f"steps        {MAX_STEPS}/{MAX_STEPS}" in out, out[-3000:]
    # The planned steps, each logged once, checkpoints and the final model in object storage.
    run = f"{shared.bucket}/runs/elastic"
    with fs.open(f"{run}/metrics.csv") as f:
        steps = [float(r.split(",")[0]) for r in f.read().decode().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS
    assert any(p.rsplit("/", 1)[-1].startswith("checkpoint_") for p in fs.ls(run))
    assert fs.ls(f"{run}/final")
    shared.pretrained = f"s3://{run}/final"
    shared.figures.update(
        submit_to_first_node_s=first_node - job.started,
        submit_to_step_on_two_workers_s=step_on_two[0] - job.started,
        node_lost_to_training_again_s=again[0] - killed,
    )

    # Scale-down: nothing left on the worker nodes, which go once idle.
    done = time.monotonic()
    _scaled_to_head_alone(cluster)
    shared.figures["job_end_to_head_alone_s"] = time.monotonic() - done
    print(f"\n[autoscaling] pretraining: {shared.figures}")


def test_tune_trials_launch_nodes_and_the_search_completes(cluster, shared):
    if shared.pretrained is None:
        pytest.fail("the elastic pretraining of this module left no model to finetune")
    fs = _s3fs()
    wait_for("the head alone", lambda: not alive_worker_nodes(cluster), SCALE_TIMEOUT_S, poll_s=2)
    launched_before = _launched(autoscaler_events(cluster))
    job = SubmittedJob(
        cluster,
        f"tune-{secrets.token_hex(3)}",
        # --debug: a failure on the cluster comes back with its traceback.
        ["--debug", "tune", "--task", "retrieval", "--config", "finetune_retrieval_tiny", "--space", "tune_tiny",
         "--data", shared.processed, "--eval-data", shared.processed, "--init", shared.pretrained,
         "--storage", f"s3://{shared.bucket}/tune", "--name", "search", "--num-samples", "2",
         "--max-concurrent", "2", "--autoscaling", "--scheduler", "fifo", "--max-steps", "4",
         "--batch-size", "8", "--num-workers", "1", "--cpus-per-worker", str(CPUS_PER_WORKER),
         "--set", "run.checkpoint_every=10000"],
        # Every node of the fake provider shares the head's session folder, so a node's runtime-env
        # agent can delete the shipped checkout while the driver runs in it (its cwd gone:
        # FileNotFoundError in Tune's os.path.abspath). On a cloud cluster each node has its own
        # disk; here the nodes have the package already (this checkout, installed editable).
        ship="installed",
    )  # fmt: skip
    try:
        # Both trials train at once, each on a node the autoscaler launched for it.
        def trial_workers_on_two_nodes():
            workers = {n["node_id"] for n in alive_worker_nodes(cluster)}
            hosts = {a["node_id"] for a in alive_actors(cluster) if a.get("class_name") == "RayTrainWorker"}
            return len(hosts & workers) == 2

        wait_for("two trials training on two launched nodes", trial_workers_on_two_nodes, JOB_TIMEOUT_S,
                 poll_s=2, alive=job.running)  # fmt: skip
        assert _launched(autoscaler_events(cluster)) >= launched_before + 2, autoscaler_events(cluster)
        code = job.finish(JOB_TIMEOUT_S)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- the job's output ---\n{job.text()[-6000:]}") from e
    finally:
        if job.running():
            job.finish(0)
    out = job.text()
    assert code == 0, out[-6000:]
    with fs.open(f"{shared.bucket}/tune/search/results.csv") as f:
        rows = f.read().decode().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[header.index("status")] for r in rows[1:]] == ["finished", "finished"], rows
    _scaled_to_head_alone(cluster)


def _s3fs():
    import s3fs

    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
        skip_instance_cache=True,
        use_listings_cache=False,  # the tests poll listings that the running jobs change
    )
