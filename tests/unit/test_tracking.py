"""Experiment tracking without Ray (`pipelines/train/tracking.py`): the config flattening, the run
identity, the rule that logs each step once across restarts, a backend that fails, and the real
backends (an MLflow sqlite store, TensorBoard's own event reader, W&B offline) over two attempts
of one run.

The MLflow tracking server, a killed and relaunched pretraining and a Tune search are in
tests/integration (test_pretrain.py, test_tune.py, test_tracking.py)."""

from __future__ import annotations

import logging

import pytest

from pipelines.train.config import ConfigError, load_config
from pipelines.train.tracking import (
    Backend,
    RunInfo,
    Tracker,
    check_tracking,
    flatten_config,
    metric_values,
    new_rows,
    run_key,
)

pytestmark = pytest.mark.unit


def test_flatten_config_gives_dotted_string_params():
    flat = flatten_config(
        {
            "optim": {"lr": 1e-4, "betas": [0.9, 0.999]},
            "model": {"overrides": {}, "init": None},
            "task": "vqa",
        }
    )
    assert flat == {
        "optim.lr": "0.0001",
        "optim.betas": "[0.9, 0.999]",
        "model.overrides": "{}",
        "model.init": "None",
        "task": "vqa",
    }
    long = flatten_config({"data": {"uris": ["s3://b/" + "x" * 100] * 100}})["data.uris"]
    assert len(long) <= 6000 and long.endswith("(cut)")


def test_the_whole_resolved_config_flattens_to_every_leaf():
    job = load_config("jobs/configs/pretrain_tiny.yaml", {"run.tracking": ["mlflow"]})
    flat = flatten_config(job.model_dump(mode="json"))
    assert flat["run.tracking"] == '["mlflow"]' and flat["task"] == "pretrain"
    assert flat["optim.lr"] == str(job.optim.lr) and flat["scaling.strategy"] == job.scaling.strategy
    assert "vqa.num_beams" in flat and not any(isinstance(v, dict) for v in flat.values())


def test_run_key_is_the_run_folder():
    assert run_key("s3://b/runs/a") == run_key("s3://b/runs/a/")
    assert run_key("file:///r/runs/a") == run_key("/r/runs/a") == run_key("/r/runs/a/")
    assert run_key("s3://b/runs/a") != run_key("s3://b/runs/b") != run_key("s3://c/runs/b")
    assert len(run_key("x")) == 32 and int(run_key("x"), 16) >= 0


def test_only_steps_above_the_last_logged_are_logged():
    rows = [(s, {"loss": float(s)}) for s in (4, 6, 8, 8, 10)]
    assert [s for s, _ in new_rows(rows, -1)] == [4, 6, 8, 10]
    assert [s for s, _ in new_rows(rows, 6)] == [8, 10]
    assert list(new_rows(rows, 10)) == []
    assert metric_values({"step": 3.0, "loss": 1, "r@1": 2.0}) == {"loss": 1.0, "r_1": 2.0}


def test_tracking_refuses_a_missing_package_or_tracking_uri(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(
        ConfigError, match=r"^--tracking wandb needs the wandb package: pip install 'mplug-ray\[tracking\]'$"
    ):
        check_tracking(["wandb"])
    with pytest.raises(ConfigError, match="set MLFLOW_TRACKING_URI"):
        check_tracking(["mlflow"], environ={})
    with pytest.raises(ConfigError, match="relative path"):
        check_tracking(["mlflow"], environ={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    check_tracking(["mlflow"], environ={"MLFLOW_TRACKING_URI": "sqlite:////abs/mlflow.db"})
    check_tracking(["mlflow"], environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    with pytest.raises(ConfigError, match="run.tracking"):
        load_config(None, {"run.max_steps": 2, "run.tracking": ["neptune"]})
    assert load_config(
        None, {"run.max_steps": 2, "run.tracking": ["mlflow", "mlflow", "wandb"]}
    ).run.tracking == ["mlflow", "wandb"]


class Recording(Backend):
    """A backend that keeps what it got and holds `held` steps already; `fail` makes it raise."""

    name = "recording"

    def __init__(self, held: int = -1) -> None:
        self.held, self.fail, self.logged, self.final, self.finished = held, False, [], None, False

    def start(self, info):
        self._check()
        return self.held

    def log_metrics(self, rows):
        self._check()
        self.logged += [step for step, _ in rows]

    def log_final_model(self, uri):
        self._check()
        self.final = uri

    def finish(self):
        self._check()
        self.finished = True

    def _check(self):
        if self.fail:
            raise ConnectionError("Connection refused\nsecond line")


INFO = RunInfo(run_uri="/r/run", run_name="run", task="pretrain", experiment="run", params={})


def test_a_failing_backend_is_reported_once_and_gets_its_rows_when_back(caplog):
    now = [0.0]
    backend, other = Recording(), Recording()
    tracker = Tracker([backend, other], retry_s=60, clock=lambda: now[0])
    tracker.start(INFO)
    tracker.log_metrics({"step": 2, "loss": 1.0}, 2)
    backend.fail = True
    with caplog.at_level(logging.INFO, logger="pipelines.train.tracking"):
        for step in (4, 6, 8):
            now[0] += 10
            tracker.log_metrics({"step": step, "loss": 1.0}, step)
        failures = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(failures) == 1 and "recording" in failures[0].getMessage()
        assert (
            "Connection refused" in failures[0].getMessage() and "second line" not in failures[0].getMessage()
        )
        assert backend.logged == [2] and other.logged == [2, 4, 6, 8]  # the other backend is not held up
        backend.fail = False
        now[0] += 10  # 30 s after the failure: not retried yet
        tracker.log_metrics({"step": 10, "loss": 1.0}, 10)
        assert backend.logged == [2]
        now[0] += 40
        tracker.log_metrics({"step": 12, "loss": 1.0}, 12)
        assert backend.logged == [2, 4, 6, 8, 10, 12]  # in order, none lost
        assert any("answers again" in r.getMessage() for r in caplog.records)
    tracker.log_final_model("/r/run/final")
    tracker.finish()
    assert backend.final == other.final == "/r/run/final" and backend.finished and other.finished


def test_a_backend_down_at_the_end_does_not_fail_the_run(caplog):
    backend = Recording()
    tracker = Tracker([backend], retry_s=60, clock=lambda: 0.0)
    backend.fail = True
    with caplog.at_level(logging.INFO, logger="pipelines.train.tracking"):
        tracker.start(INFO)  # down from the start: nothing raises
        tracker.log_metrics({"step": 1, "loss": 1.0}, 1)
        tracker.log_final_model("/r/run/final")
        tracker.finish()  # one more try, which fails too
    assert not backend.finished and backend.logged == []
    assert len([r for r in caplog.records if "tracking" in r.getMessage()]) == 1  # reported once


def test_a_restarted_run_logs_only_what_its_backend_lacks():
    backend = Recording(held=8)  # the lost attempt logged up to step 8; the checkpoint was at 6
    tracker = Tracker([backend])
    tracker.start(INFO, resumed_from_step=6)
    for step in (6, 7, 8, 9, 10):
        tracker.log_metrics({"step": step, "loss": 1.0}, step)
    assert backend.logged == [9, 10]


# ---- the real backends, two attempts of one run ------------------------------------------------
def _attempt(tracker: Tracker, info: RunInfo, steps, resumed_from: int | None, final: str | None = None):
    tracker.start(info, resumed_from_step=resumed_from)
    for step in steps:
        row = {"step": float(step), "epoch": step / 10, "loss": 10.0 - step}
        if step % 4 == 0:
            row["eval_vqa_accuracy"] = float(step)
        tracker.log_metrics(row, step)
    if final:
        tracker.log_final_model(final)
        tracker.finish()


def _info(run_uri: str, **kw) -> RunInfo:
    params = flatten_config({"optim": {"lr": 1e-3}, "run": {"name": "r1"}})
    return RunInfo(run_uri=run_uri, run_name="r1", task="vqa", experiment="exp", params=params,
                   tags={"mplug.task": "vqa"}, **kw)  # fmt: skip


def test_mlflow_store_gets_every_step_once_across_a_restart(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from pipelines.train.tracking import MLflowBackend

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    info = _info(str(tmp_path / "runs" / "r1"))
    # The first attempt logs steps 1..7 and dies (a checkpoint at 4); the second resumes at 4.
    _attempt(Tracker([MLflowBackend()]), info, range(1, 8), None)
    _attempt(Tracker([MLflowBackend()]), info, range(4, 13), 4, final="/x/r1/final")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 13))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_vqa_accuracy")] == [4, 8, 12]
    assert run.data.params == {"optim.lr": "0.001", "run.name": "r1"}
    assert run.data.tags["mplug.task"] == "vqa" and run.data.tags["mplug.final_model"] == "/x/r1/final"
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"


def test_tensorboard_events_read_back_once_per_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipelines.train.tracking import TensorBoardBackend

    info = _info(str(tmp_path / "r1"))
    _attempt(Tracker([TensorBoardBackend()]), info, range(1, 8), None)
    _attempt(Tracker([TensorBoardBackend()]), info, range(4, 13), 4, final="/x/r1/final")
    events = sorted((tmp_path / "r1" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one file per attempt
    steps = []
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("loss")]
        assert "epoch" in acc.Tags()["scalars"]
    assert steps == list(range(1, 13))


def test_wandb_offline_without_a_login(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from pipelines.train.tracking import WandbBackend, wandb_logged_in

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    assert not wandb_logged_in()
    info = _info(str(tmp_path / "r1"))
    _attempt(Tracker([WandbBackend()]), info, range(1, 5), None, final="/x/r1/final")
    folders = list((tmp_path / "r1" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and folders[0].name.endswith(info.key)
    assert (folders[0] / f"run-{info.key}.wandb").stat().st_size > 0


def test_tune_trials_nest_under_the_search_run_and_the_best_is_tagged(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from pipelines.train.tracking import MLflowBackend
    from pipelines.tune.driver import SearchPlan
    from pipelines.tune.tracking import close_search_run, experiment_name, open_search_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    base = load_config(None, {"task": "vqa", "run.max_steps": 2, "run.tracking": ["mlflow"]})
    plan = SearchPlan(
        task="vqa", base=base.model_dump(mode="json"), space_source="optim.lr: {grid: [...]}",
        storage=str(tmp_path / "tune"), name="search", num_samples=2, max_concurrent=2, scheduler="asha",
        search="random", metric="eval_vqa_accuracy", mode="max", max_epochs=2, trial_cpus=1, trial_gpus=0,
        trial_retries=1,
    )  # fmt: skip
    parent = open_search_run(plan)
    assert parent is not None and open_search_run(plan) == parent  # a relaunched search finds it again
    for trial, lr in (("t1", "0.001"), ("t2", "1e-09")):
        info = RunInfo(run_uri=str(tmp_path / "tune" / "search" / trial), run_name=trial, task="vqa",
                       experiment=experiment_name(plan), params={"optim.lr": lr}, parent_run_id=parent)  # fmt: skip
        tracker = Tracker([MLflowBackend()])
        tracker.start(info)
        tracker.log_metrics({"step": 1.0, "epoch": 1.0, "eval_vqa_accuracy": float(lr == "0.001")}, 1)
        # no finish: ASHA stops a trial on its last report, before its loop ends
    rows = [
        {"trial": "t1", "status": "finished", "best_eval_vqa_accuracy": 1.0},
        {"trial": "t2", "status": "stopped early", "best_eval_vqa_accuracy": 0.0},
    ]
    close_search_run(plan, parent, rows, rows[0])
    client = MlflowClient()
    experiment = client.get_experiment_by_name("search").experiment_id
    children = {
        r.info.run_name: r
        for r in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    }
    assert set(children) == {"t1", "t2"}
    assert (
        children["t1"].data.params["optim.lr"] == "0.001"
        and children["t2"].data.params["optim.lr"] == "1e-09"
    )
    assert (
        children["t1"].data.tags["mplug.best_trial"] == "true"
        and children["t2"].data.tags["mplug.best_trial"] == "false"
    )
    assert children["t1"].info.status == "FINISHED" and children["t2"].info.status == "KILLED"
    search_run = client.get_run(parent)
    assert (
        search_run.data.tags["mplug.best_trial"] == "t1"
        and search_run.data.metrics["best_eval_vqa_accuracy"] == 1.0
    )
    assert search_run.data.params["search.scheduler"] == "asha" and search_run.info.status == "FINISHED"
