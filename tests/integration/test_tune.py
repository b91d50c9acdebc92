"""`mplug tune` on the shared Ray instance, results on S3 (moto) with 1 storage request in 20
failing all along: a 4-trial VQA search, two at a time, whose driver is SIGKILLed once three trials
have ended and relaunched with the same command; ASHA stops a weak trial; nothing of the search is
left running afterwards.

The grid makes ASHA's decision a matter of learning, not luck or timing: answers are ranked from
the answer list; the first trial (lr 1e-3) trains the text side and learns the answers' prior
within an epoch of 18 steps (measured: VQA accuracy 10.8 after one epoch, through Tune), the other
three (lr 1e-9, 2e-9, 3e-9; the visual side is pinned at 1e-9 for all four) leave the untrained
model where it starts (1.0). ASHA stops a trial that reports below the median of the rung's
earlier results (reduction 2). The strong trial is never below it: every earlier result is a weak
one. Tune starts trials in grid order, two at a time: if the strong trial reports first, the weak
one beside it is stopped; if the weak one reports first, it runs on, and the next weak trial meets
a median of (strong + weak) / 2 > weak and is stopped. Two strong trials would not do: the one
that reports second is stopped whenever it is below the first. The driver is killed once three
trials have ended (all decided by the first driver: a relaunched driver's scheduler starts with
empty rungs); the relaunch runs the last.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from pipelines import storage
from pipelines.train.config import load_config
from pipelines.train.launch import plan_run
from tests.drivers import sigkill_when
from tests.tracking_server import shared_mlflow_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vqa_search_inputs(ray_session, s3_endpoint, tmp_path_factory) -> dict:
    """VQA train/val on S3 (synth → ingest) and an untrained tiny VQA model to start from."""
    import boto3
    import torch

    from mplug import MPlugConfig
    from mplug.vqa import MPlugForQuestionAnswering
    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.synth.tasks import render_task_annotations

    bucket = "tune-inputs"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    root = str(tmp_path_factory.mktemp("vqa_raw"))
    files = render_task_annotations(
        root, num=40, seed=3, image_size=64, tasks=("vqa",), split_fractions=(0.6, 0.4, 0.0)
    )
    data = {"answer_list": files["vqa"]["train"].rsplit("/", 1)[0] + "/vqa_answer_list.json"}
    for split in ("train", "val"):
        data[split] = f"s3://{bucket}/vqa_{split}"
        run_ingest(IngestConfig(input=files["vqa"][split], format="json", image_root=root, output=data[split],
                                image_size=64, min_image_size=16, dedupe=split == "train"))  # fmt: skip
    torch.manual_seed(0)
    init = str(tmp_path_factory.mktemp("init") / "final")
    MPlugForQuestionAnswering(MPlugConfig.preset("tiny", queue_size=0)).save_pretrained(init)
    return {"data": data, "init": init}


def _command(inputs: dict, storage_uri: str, address: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.cli", "tune", "--task", "vqa", "--config", "finetune_vqa_tiny",
        "--space", inputs["space"], "--data", inputs["data"]["train"], "--eval-data", inputs["data"]["val"],
        "--storage", storage_uri, "--name", "search", "--init", inputs["init"], "--num-samples", "1",
        "--max-concurrent", "2", "--scheduler", "asha", "--num-workers", "1", "--batch-size", "8",
        "--epochs", "2", "--set", "optim.min_lr=0", "--set", "optim.warmup_steps=0", "--set", "run.log_every=2",
        "--set", "optim.visual_lr=1e-9",
        "--set", f"vqa.answer_list={inputs['data']['answer_list']}",
        "--set", "run.checkpoint_every=10000", "--tracking", "mlflow", "--address", address,
    ]  # fmt: skip


def _finished_trials(storage_uri: str) -> dict[str, float]:
    """Trials Tune's saved experiment state records as TERMINATED, with when each started: a
    trial run again after a restore would start anew. Read from the newest state file that parses
    (the driver may be writing the newest one, or have been killed while writing it)."""
    states = storage.list_files(storage.join(storage_uri, "search"), ".json")
    states = sorted(s for s in states if s.rsplit("/", 1)[-1].startswith("experiment_state"))
    for uri in reversed(states):
        try:
            state = json.loads(storage.read_text(uri))
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        done = {}
        for trial, runner in state.get("trial_data", []):
            meta, run = json.loads(trial), (json.loads(runner) if isinstance(runner, str) else runner)
            if meta.get("status") == "TERMINATED":
                done[meta["trial_id"]] = run["start_time"]
        return done
    return {}


def _reported(storage_uri: str) -> dict[str, list[dict]]:
    """What each trial reported to Tune (its result.json lines), by trial id, in order."""
    out: dict[str, list[dict]] = {}
    for uri in storage.list_files(storage.join(storage_uri, "search"), "result.json"):
        for line in storage.read_text(uri).splitlines():
            row = json.loads(line)
            out.setdefault(row["trial_id"], []).append(row)
    return out


def _check_reports_carry_the_newest_evaluation(storage_uri: str, results: list[dict]) -> None:
    """Every report a trial made carries the newest evaluation of its run's metrics.csv at that
    step; the first report at epoch N carries epoch N's; results.csv's best is the best of them."""
    from pipelines.train.checkpoint import history_from_csv

    metric = "eval_vqa_accuracy"
    reported, changed = _reported(storage_uri), False
    for trial in results:
        rows = reported[trial["trial"]]
        curve = storage.read_text(storage.join(storage_uri, "search", trial["trial"], "metrics.csv"))
        evals = [r for r in history_from_csv(curve) if metric in r]
        assert sum(1 for r in rows if "loss" in r and r["epoch"] < 1) >= 3, rows  # several logs per epoch
        changed = changed or len({r[metric] for r in evals}) > 1
        for row in rows:
            newest = [e for e in evals if e["step"] <= row["step"]][-1]
            assert row[metric] == pytest.approx(newest[metric]), (row, newest)
            assert row["eval_epoch"] == newest["epoch"], (row, newest)
        for n in range(1, int(max(r["epoch"] for r in rows)) + 1):
            first = next(r for r in rows if r["epoch"] >= n)
            assert first["eval_epoch"] == n and first["epoch"] == n, first
        assert float(trial[f"best_{metric}"]) == pytest.approx(max(e[metric] for e in evals))
    assert changed, "no trial's metric changed between evaluations: a stale one would pass unseen"


def _check_nested_runs(tracking_uri: str, rows: list[dict]) -> None:
    """One MLflow run for the search, across its relaunch, and one nested under it per trial
    (found again by a trial that resumed), with the trial's sampled lr as a param, every
    evaluation once; the best trial is tagged on both sides."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("search").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`mplug.search` = 'search'")
    nested = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = {r.info.run_name: r for r in nested}
    assert len(nested) == len(trials) == len(rows) == 4 and set(trials) == {r["trial"] for r in rows}
    assert len(client.search_runs([experiment])) == 5
    for row in rows:
        run = trials[row["trial"]]
        assert float(run.data.params["optim.lr"]) == float(row["optim.lr"])
        assert run.data.tags["mplug.trial_status"] == row["status"] and run.info.status != "RUNNING"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval_vqa_accuracy")]
        assert steps and steps == sorted(set(steps)), steps
    best = [t for t, run in trials.items() if run.data.tags["mplug.best_trial"] == "true"]
    assert (
        best == [parent.data.tags["mplug.best_trial"]]
        and float(trials[best[0]].data.params["optim.lr"]) == 1e-3
    )
    assert parent.info.status == "FINISHED" and "best_eval_vqa_accuracy" in parent.data.metrics


def test_search_survives_its_driver_and_storage_faults_and_leaves_nothing_behind(
    vqa_search_inputs, s3_bucket, s3_faults, tmp_path, request
):
    import ray
    from ray.util.state import list_actors

    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  optim.lr: {grid: [1.0e-3, 1.0e-9, 2.0e-9, 3.0e-9]}\n")
    inputs = {**vqa_search_inputs, "space": str(space)}
    storage_uri = s3_bucket.uri("tune")
    cmd = _command(inputs, storage_uri, ray.get_runtime_context().gcs_address)
    tracking_uri = shared_mlflow_server(request).uri
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_TRACKING_URI": tracking_uri}

    s3_faults.every(20)  # the search's state, the trials' checkpoints and models, its results
    sigkill_when(cmd, tmp_path / "first.log", lambda: len(_finished_trials(storage_uri)) >= 3, timeout_s=900,
                 what="three ended trials", env=env, poll_s=1)  # fmt: skip
    finished_before = _finished_trials(storage_uri)

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert s3_faults.off().injected["total"] > 0
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resuming the search" in out

    results = storage.read_text(storage.join(storage_uri, "search", "results.csv")).splitlines()
    header, rows = results[0].split(","), [r.split(",") for r in results[1:]]
    assert len(rows) == 4 and {"trial", "optim.lr", "best_eval_vqa_accuracy", "epochs_run", "status"} <= set(
        header
    )
    status = [r[header.index("status")] for r in rows]
    assert "stopped early" in status and "error" not in status, results
    stopped = [
        float(r[header.index("optim.lr")]) for r in rows if r[header.index("status")] == "stopped early"
    ]
    assert max(stopped) < 1e-6, results  # ASHA stopped weak trials only
    # A trial that ran all its epochs exported its model, though Tune stops it on its last report.
    for row in rows:
        if row[header.index("status")] == "finished":
            trial = row[header.index("trial")]
            assert storage.exists(storage.join(storage_uri, "search", trial, "final", "config.json")), trial
    finished_after = _finished_trials(storage_uri)
    for trial, started in finished_before.items():  # finished before the kill: not run again
        assert finished_after[trial] == started
    import csv
    import io

    finished_first = [
        r for r in csv.DictReader(io.StringIO("\n".join(results))) if r["trial"] in finished_before
    ]
    _check_reports_carry_the_newest_evaluation(storage_uri, finished_first)
    assert storage.read_bytes(storage.join(storage_uri, "search", "search.png"))[:4] == b"\x89PNG"
    best_yaml = storage.join(storage_uri, "search", "best.yaml")
    assert re.search(r"lr: 0\.001\b", storage.read_text(best_yaml))  # the strong trial

    # best.yaml is a complete finetuning config: it plans as it is (data, weights, steps), the
    # check `mplug finetune --config best.yaml` makes before Ray starts.
    local_best = tmp_path / "best.yaml"
    local_best.write_text(storage.read_text(best_yaml))
    with pytest.MonkeyPatch.context() as mp:  # it keeps the search's --tracking mlflow
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        plan = plan_run(load_config(str(local_best)))
    assert plan.task == "vqa" and plan.total_steps > 0 and plan.job["optim"]["lr"] == 1e-3
    _check_nested_runs(tracking_uri, list(csv.DictReader(io.StringIO("\n".join(results)))))

    # Nothing of the search is left: every placement group removed, no training actor alive.
    deadline = time.monotonic() + 120
    while True:
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        workers = list_actors(filters=[("state", "=", "ALIVE"), ("class_name", "=", "RayTrainWorker")])
        if not groups and not workers:
            break
        assert time.monotonic() < deadline, (groups, workers)
        time.sleep(2)
