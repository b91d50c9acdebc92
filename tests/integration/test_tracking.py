"""Experiment tracking through the real loop: a small pretraining logs to MLflow (a server this
test starts), TensorBoard and W&B (offline) at once, and its MLflow server is SIGKILLed once the
run is open. The run finishes all the same, says so in one line, and the other trackers get
every step.

A killed and relaunched run logging into one MLflow run is checked in test_pretrain.py, a Tune
search's nested runs in test_tune.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipelines import storage
from tests.tracking_server import start_mlflow_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_corpus(ray_session, tmp_path_factory) -> str:
    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.synth.world import render_corpus

    root = tmp_path_factory.mktemp("tracking_corpus")
    raw = render_corpus(str(root / "raw"), num=60, fmt="parquet", seed=2, image_size=64)
    out = str(root / "processed")
    run_ingest(
        IngestConfig(input=raw["train"], format="parquet", output=out, image_size=64, min_image_size=32)
    )
    return out


def test_tracking_server_killed_mid_run_leaves_the_run_finishing(small_corpus, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipelines.train.checkpoint import history_from_csv
    from pipelines.train.tracking import run_key

    server = start_mlflow_server(tmp_path / "mlflow")
    storage_uri = str(tmp_path / "runs")
    cmd = [
        sys.executable, "-m", "jobs.cli", "pretrain", "--config", "pretrain_tiny", "--data", small_corpus,
        "--storage", storage_uri, "--name", "tracked", "--max-steps", "8", "--checkpoint-every", "4",
        "--batch-size", "8", "--num-workers", "1", "--set", "run.log_every=1",
        "--tracking", "mlflow", "--tracking", "tensorboard", "--tracking", "wandb",
        "--address", ray.get_runtime_context().gcs_address,
    ]  # fmt: skip
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": server.uri,
        "WANDB_MODE": "offline",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    log = tmp_path / "run.log"
    store = MlflowClient(server.store)  # the server's own sqlite file, readable once it is gone
    run_uri = storage.join(storage_uri, "tracked")
    key = run_key(run_uri)
    try:
        with open(log, "wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while not store.search_runs(_experiment_ids(store), filter_string=f"tags.`mplug.run_key` = '{key}'"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow run was never opened"
            time.sleep(0.3)
        assert proc.poll() is None  # the run is on: the server goes away in the middle of it
    finally:
        server.stop()
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    reports = [line for line in out.splitlines() if "tracking: mlflow" in line]
    assert len(reports) == 1 and "training goes on" in reports[0], reports
    assert "exported final model (step 8)" in out

    history = history_from_csv(storage.read_text(storage.join(run_uri, "metrics.csv")))
    steps = [int(r["step"]) for r in history]
    assert steps == list(range(1, 9))
    # What reached MLflow before the kill: the first steps, once each.
    (run,) = store.search_runs(_experiment_ids(store))
    got = [m.step for m in store.get_metric_history(run.info.run_id, "loss")]
    assert got == steps[: len(got)]
    # TensorBoard got every step, read back by TensorBoard's own reader.
    events = EventAccumulator(os.path.join(run_uri, "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == steps
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    # W&B wrote its offline run for `wandb sync`.
    (offline,) = [p for p in os.listdir(os.path.join(run_uri, "wandb")) if p.startswith("offline-run-")]
    assert os.path.getsize(os.path.join(run_uri, "wandb", offline, f"run-{key}.wandb")) > 0


def _experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]
