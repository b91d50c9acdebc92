"""Distributed pretraining on the shared Ray instance, reading and checkpointing to moto S3.

One processed corpus (synthetic, ingested to S3) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from pipelines import storage
from pipelines.eval.retrieval import load_pretrained
from pipelines.train.config import ConfigError, load_config
from pipelines.train.launch import run_pretraining
from tests.drivers import sigkill_when
from tests.tracking_server import shared_mlflow_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus_uri(ray_session, s3_endpoint, tmp_path_factory) -> str:
    """A tiny processed corpus on S3: synth → ingest, as a user would produce it."""
    import boto3

    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.synth.world import render_corpus

    bucket = "pretrain-corpus"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    raw = render_corpus(f"s3://{bucket}/raw", num=160, fmt="parquet", seed=1, image_size=64)
    out = f"s3://{bucket}/processed/train"
    run_ingest(
        IngestConfig(input=raw["train"], format="parquet", output=out, image_size=64, min_image_size=32)
    )
    return out


def tiny_job(corpus_uri: str, storage_uri: str, name: str, **overrides):
    sets = {
        "data.uris": [corpus_uri],
        "data.batch_size": 8,
        "run.storage": storage_uri,
        "run.name": name,
        "run.log_every": 2,
        "optim.warmup_steps": 2,
        "scaling.num_workers": 2,
        "scaling.cpus_per_worker": 1,
    }
    sets.update(overrides)
    return load_config("jobs/configs/pretrain_tiny.yaml", sets)


def checkpoint_dirs(run_uri: str) -> list[str]:
    fs, path = storage.pyarrow_fs(run_uri)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )


def registered_checkpoints(run_uri: str) -> list[str]:
    """Checkpoints Ray Train has committed (listed in its snapshot), not just uploaded: a kill
    between upload and registration rightly restarts from the previous one."""
    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot):
        return []
    results = json.loads(storage.read_text(snapshot)).get("checkpoint_results", [])
    return [r["checkpoint_dir_name"] for r in results]


def final_state(run_uri: str) -> dict:
    latest = checkpoint_dirs(run_uri)[-1]
    return json.loads(storage.read_text(storage.join(run_uri, latest, "train_state.json")))


def job_text_len(job) -> int:
    from pipelines.train.launch import build_model_config

    return build_model_config(job).max_text_len


def _train_worker_pids() -> list[int]:
    """Ray Train workers of THIS test session's Ray (started by this process, so its workers
    descend from it): other Ray instances on a shared machine are never touched."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def expected_rank_rows(corpus_uri: str, job, epoch: int, world: int) -> list[list[str]]:
    """Each rank's row keys of `epoch` in the training order, worked out apart from the run."""
    from dataclasses import asdict

    from pipelines.data.order import chunk_rows, plan_chunks, rank_windows
    from pipelines.data.shards import read_window_rows
    from pipelines.data.stream import processed_files
    from pipelines.train.launch import count_rows

    chunks = plan_chunks(processed_files([corpus_uri]), chunk_rows(count_rows([corpus_uri]), world))
    window = max(1, job.data.local_shuffle_buffer // max(c.rows for c in chunks))
    out = []
    for rank in range(world):
        windows = rank_windows(chunks, seed=job.run.seed, epoch=epoch, rank=rank, world=world, window=window)
        batch = {"window": [json.dumps(asdict(w)) for w in windows]}
        tables = read_window_rows(batch, 64, ("key",), seed=job.run.seed, epoch=epoch)
        out.append([k for t in tables for k in t.column("key").to_pylist()])
    return out


def logged_rank_rows(run_uri: str, epoch: int, world: int) -> list[list[str]]:
    """What each rank logged it trained on in `epoch` (RUN/samples/, in step order)."""
    out = []
    for rank in range(world):
        files = storage.list_files(storage.join(run_uri, "samples"), ".txt")
        mine = sorted(f for f in files if f.rsplit("/", 1)[-1].startswith(f"epoch{epoch:04d}-rank{rank}-"))
        out.append([k for f in mine for k in storage.read_text(f).split()])
    return out


def step_losses(run_uri: str) -> dict[int, dict[str, float]]:
    """Each logged step's losses, from the run's metrics.csv."""
    from pipelines.train.checkpoint import history_from_csv

    rows = history_from_csv(storage.read_text(storage.join(run_uri, "metrics.csv")))
    return {int(r["step"]): {k: v for k, v in r.items() if k.startswith("loss")} for r in rows if "loss" in r}


def test_sigkilled_worker_restores_from_checkpoint_and_finishes(corpus_uri, s3_bucket, s3_faults):
    """Two workers train from S3 with checkpoints to S3; one worker is SIGKILLed mid-epoch; the
    run restores its latest checkpoint and continues that epoch exactly where the checkpoint left
    it: every rank trained on precisely its rows of the fixed epoch order, none twice, none
    skipped, and it draws the same MLM masks, ITM negatives and PrefixLM cuts as a run never
    interrupted: every step's losses and the final weights equal that run's.
    The run then has its curves, every checkpoint it registered loads, and its model exports.

    The run never interrupted trains with 1 storage request in 20 failing (reads, checkpoints,
    metrics, export): faults the clients retry change nothing, its checkpoints all load. The
    killed run is fault-free: its claim is exactness through the kill."""
    max_steps = 12
    settings = {
        "run.max_steps": max_steps,
        "run.checkpoint_every": 3,
        "run.max_failures": 2,
        "run.log_sample_keys": True,
        "run.log_every": 1,
    }
    job = tiny_job(corpus_uri, s3_bucket.uri("runs"), "killed", **settings)
    with s3_faults.every(20):
        assert run_pretraining(tiny_job(corpus_uri, s3_bucket.uri("runs"), "whole", **settings)).error is None
    assert s3_faults.injected["total"] > 0
    run_uri = s3_bucket.uri("runs", "killed")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run_pretraining(job)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not registered_checkpoints(run_uri):
        assert time.monotonic() < deadline and thread.is_alive(), "no first checkpoint"
        time.sleep(0.2)
    pids = _train_worker_pids()
    assert pids, "found no Ray Train worker process to kill"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    result = outcome["result"]
    assert result.error is None
    state = final_state(run_uri)
    assert state["step"] == max_steps
    assert len(state["resumed_from"]) >= 1 and state["resumed_from"][0] >= 3
    batch, steps_done = job.data.batch_size, 0
    for epoch in range(state["epoch"] + 1):
        expected, logged = expected_rank_rows(corpus_uri, job, epoch, 2), logged_rank_rows(run_uri, epoch, 2)
        steps_in_epoch = min(max_steps - steps_done, min(len(e) for e in expected) // batch)
        for rank in range(2):
            assert logged[rank] == expected[rank][: steps_in_epoch * batch], (epoch, rank)
        steps_done += steps_in_epoch
    assert steps_done == max_steps
    steps = [
        float(r.split(",")[0])
        for r in storage.read_text(storage.join(run_uri, "metrics.csv")).splitlines()[1:]
    ]
    # The curve continues where the checkpoint left it: every logged step once, in order.
    assert steps == sorted(set(steps)) and steps[-1] == max_steps
    # ...with the losses of the run that was never interrupted, step by step.
    resumed, whole = step_losses(run_uri), step_losses(s3_bucket.uri("runs", "whole"))
    assert sorted(resumed) == sorted(whole) == list(range(1, max_steps + 1))
    for step in whole:
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), step
    assert storage.read_text(storage.join(run_uri, "metrics.csv")).startswith("step,")
    assert storage.read_bytes(storage.join(run_uri, "curves.png"))[:4] == b"\x89PNG"
    assert all(
        d.startswith("checkpoint_") and len(d) == len("checkpoint_00000000") for d in checkpoint_dirs(run_uri)
    )
    # Every checkpoint the run registered is complete and loads (its manifest checks every file).
    import tempfile
    from pathlib import Path

    from pipelines.train.checkpoint import load_state

    for uri in (run_uri, s3_bucket.uri("runs", "whole")):
        names = registered_checkpoints(uri)
        assert names == [f"checkpoint_{step:08d}" for step in (9, 12)], (uri, names)  # num_to_keep 2
        for name in names:
            with tempfile.TemporaryDirectory() as local:
                load_state(Path(storage.download_dir(storage.join(uri, name), local)), rank=1)
    model = load_pretrained(storage.join(run_uri, "final"))
    assert model.config.max_text_len == job_text_len(job)
    assert model(**model.example_inputs(2)).loss.isfinite()
    whole = load_pretrained(s3_bucket.uri("runs", "whole", "final")).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, whole[name], rtol=1e-5, atol=1e-6, msg=name)


def test_relaunch_after_driver_death_resumes_same_run(corpus_uri, tmp_path, s3_bucket, s3_faults, request):
    """The driver process is SIGKILLed after the first checkpoint; the same command resumes,
    with 1 storage request in 20 failing all along (the checkpoints and the data are on S3).

    Run with FSDP2 (DDP is covered above), so sharded training, the gathered checkpoint, the
    optimizer-state restore and the export all go through the real loop too. Both launches log
    to one MLflow run (a real server), every logged step once."""
    import ray

    storage_uri = s3_bucket.uri("runs")
    s3_faults.every(20)
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "pretrain",
        "--config",
        "pretrain_tiny",
        "--data",
        corpus_uri,
        "--storage",
        storage_uri,
        "--name",
        "relaunch",
        "--max-steps",
        "12",
        "--checkpoint-every",
        "4",
        "--batch-size",
        "8",
        "--strategy",
        "fsdp",
        "--tracking",
        "mlflow",
        "--set",
        "run.log_every=2",
        "--address",
        ray.get_runtime_context().gcs_address,
    ]
    run_uri = storage.join(storage_uri, "relaunch")
    mlflow_server = shared_mlflow_server(request)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    sigkill_when(cmd, tmp_path / "first.log", lambda: registered_checkpoints(run_uri), timeout_s=300,
                 what="first checkpoint", poll_s=0.2, env=env)  # fmt: skip
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert s3_faults.off().injected["total"] > 0
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from step" in second.stdout + second.stderr
    state = final_state(run_uri)
    assert state["step"] == 12 and state["resumed_from"] and state["resumed_from"][0] >= 4
    assert "2 worker(s)" in second.stdout + second.stderr
    model = load_pretrained(storage.join(run_uri, "final"))
    assert model(**model.example_inputs(2)).loss.isfinite()
    check_one_tracked_run(mlflow_server.uri, run_uri, "relaunch")


def check_one_tracked_run(tracking_uri: str, run_uri: str, name: str) -> None:
    """The killed and the relaunched attempt logged into ONE MLflow run: every step of the run's
    metrics.csv once, in order, with the config as params and the final model's URI."""
    from mlflow.tracking import MlflowClient

    from pipelines.train.checkpoint import history_from_csv

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    history = history_from_csv(storage.read_text(storage.join(run_uri, "metrics.csv")))
    for key in ("loss", "epoch", "lr"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [int(r["step"]) for r in history if key in r], key
    assert run.data.params["run.name"] == name and run.data.params["scaling.strategy"] == "fsdp"
    assert run.data.params["run.max_steps"] == "12" and run.data.tags["mplug.task"] == "pretrain"
    assert run.data.tags["mplug.final_model"] == storage.join(run_uri, "final")
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40 and run.data.tags["ray.job_id"]
    assert run.info.status == "FINISHED"


def test_a_checkpoint_that_could_not_be_written_is_never_resumed_from(
    corpus_uri, s3_bucket, s3_faults, monkeypatch
):
    """Faults that outlast the storage client's retries. Rank 0's files of checkpoint 4 cannot be
    written (every attempt fails; rank 1's are written: a half-written checkpoint): the run fails
    on every rank together with one line naming the checkpoint, and only checkpoint 2 is
    registered. The same command, storage healthy again, resumes from 2, never from the
    half-written 4, and finishes. Three attempts per request and 503s only: with the default ten
    and every kind of fault, the failing upload took 4.4 minutes of the CI run (standard-mode
    backoff) to say the same."""
    from pipelines.train.launch import failure_line

    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "3")  # forwarded to the workers

    job = tiny_job(corpus_uri, s3_bucket.uri("runs"), "flaky",
                   **{"run.max_steps": 6, "run.checkpoint_every": 2, "run.max_failures": 0})  # fmt: skip
    run_uri = s3_bucket.uri("runs", "flaky")
    # pyarrow writes an object as a multipart upload: its first request creates the upload.
    s3_faults.every(
        1, kinds=["503"], match=r"^(PUT|POST) /[^ ?]*/flaky/checkpoint_00000004/train_state\.json"
    )
    with pytest.raises(Exception) as failed:  # Ray Train's WorkerGroupError, our error inside
        run_pretraining(job)
    assert s3_faults.off().injected["total"] > 0
    line = failure_line(failed.value)
    assert line.startswith(
        f"CheckpointError: could not write checkpoint {storage.join(run_uri, 'checkpoint_00000004')}: "
    ), line
    assert registered_checkpoints(run_uri) == ["checkpoint_00000002"]
    half_written = storage.list_files(storage.join(run_uri, "checkpoint_00000004"))
    assert half_written and not any(f.endswith("manifest.json") for f in half_written), half_written

    assert run_pretraining(job).error is None
    state = final_state(run_uri)
    assert state["step"] == 6 and state["resumed_from"] == [2]


def test_bad_config_fails_before_any_worker(corpus_uri, tmp_path):
    with pytest.raises(ConfigError, match="fusion_mode"):
        run_pretraining(
            tiny_job(
                corpus_uri,
                str(tmp_path),
                "bad",
                **{"model.overrides": {"fusion_mode": "sideways"}, "run.max_steps": 2},
            )
        )
    with pytest.raises(ConfigError, match="no stats.json"):
        run_pretraining(tiny_job(str(tmp_path / "nothing"), str(tmp_path), "bad2", **{"run.max_steps": 2}))
    # Nothing was started: Ray Train never created the run folder.
    assert not os.path.exists(tmp_path / "bad") and not os.path.exists(tmp_path / "bad2")
    # Relaunching a run under the other strategy is refused before Ray starts.
    checkpoint = tmp_path / "sharded" / "checkpoint_00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.json").write_text(json.dumps({"step": 4, "strategy": "fsdp"}))
    (checkpoint / "manifest.json").write_text(json.dumps({"files": {}}))  # complete
    with pytest.raises(ConfigError, match="--strategy fsdp"):
        run_pretraining(tiny_job(corpus_uri, str(tmp_path), "sharded", **{"run.max_steps": 8}))
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "pretrain", "--config", "pretrain_tiny", "--set", "optim.lr=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "optim.lr" in proc.stderr
