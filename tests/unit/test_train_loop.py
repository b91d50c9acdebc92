"""Pieces of the worker loop that decide what a run reports: which step ends an epoch, the epoch
a report says, the batch and epoch of an elastic group as it is, what a resumed run carries."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipelines.train.checkpoint import TrainState
from pipelines.train.config import load_config
from pipelines.train.loop import TrainPlan, Worker, _announce_worker_group, _newest_evaluation, step_groups

pytestmark = pytest.mark.unit


def test_step_groups_mark_the_epochs_last_step_and_drop_an_incomplete_one() -> None:
    assert list(step_groups(range(7), accum=2)) == [([0, 1], False), ([2, 3], False), ([4, 5], True)]
    assert list(step_groups(range(3), accum=1)) == [([0], False), ([1], False), ([2], True)]
    assert list(step_groups(range(1), accum=2)) == []


def _worker(world: int, num_workers, step: int = 0, epoch: int = 0, epoch_start: int = 0) -> Worker:
    job = load_config(
        "jobs/configs/pretrain_tiny.yaml", {"scaling.num_workers": num_workers, "data.batch_size": 8}
    )
    hi = num_workers if isinstance(num_workers, int) else num_workers[1]
    plan = TrainPlan(task="pretrain", job=job.model_dump(mode="json"), model_config={}, total_steps=100,
                     steps_per_epoch=160 // (8 * hi), run_uri="runs/x", flops_per_sample=1.0, train_rows=160,
                     eval_rows=0, global_batch=8 * hi)  # fmt: skip
    state = TrainState(step=step, epoch=epoch, epoch_start_step=epoch_start, world_size=2)
    return Worker(plan=plan, task=type("T", (), {"name": "pretrain"})(), job=job, rank=0, world=world,
                  device=torch.device("cpu"), model=None, optimizer=None, scheduler=None, state=state,
                  chunks=[], transform_tasks=1)  # fmt: skip


def test_an_elastic_group_counts_batch_and_epoch_with_the_workers_it_has(caplog) -> None:
    """Planned for up to 2 workers, running on 1 after a node was lost: 8 samples a step, 20
    steps an epoch (not 16 and 10), and the log says the group changed and the epoch restarts."""
    w = _worker(world=1, num_workers=[1, 2], step=13, epoch=1, epoch_start=10)
    assert (w.global_batch, w.steps_per_epoch) == (8, 20)
    assert (w.plan.global_batch, w.plan.steps_per_epoch) == (16, 10)
    with caplog.at_level(logging.INFO, logger="pipelines.train.loop"):
        _announce_worker_group(w, checkpoint_world=2)
    assert "8 samples (20 per epoch)" in caplog.text
    assert "worker group changed from 2 to 1 worker(s)" in caplog.text
    assert w.state.epoch_start_step == 13 and w.state.world_size == 1  # the epoch restarts here


def test_a_reports_epoch_is_whole_only_when_the_epoch_is_over() -> None:
    w = _worker(world=2, num_workers=2, step=9, epoch=0)  # 10 steps an epoch: 9 done
    assert 0.89 < w.epoch_progress() < 1.0
    w.state.step = 10  # the last step: not over until the loop ends the epoch
    assert w.epoch_progress() < 1.0
    w.state.epoch, w.state.epoch_start_step = 1, 10
    assert w.epoch_progress() == 1.0


def test_a_resumed_run_carries_its_last_evaluation() -> None:
    history = [{"step": 0.0, "epoch": 0.0, "eval_r_mean": 3.0}, {"step": 5.0, "epoch": 0.5, "loss": 2.0},
               {"step": 10.0, "epoch": 1.0, "loss": 1.0, "eval_r_mean": 7.0}, {"step": 12.0, "epoch": 1.2, "loss": 0.9}]  # fmt: skip
    assert _newest_evaluation(history) == {"eval_r_mean": 7.0, "eval_epoch": 1.0}
    assert _newest_evaluation(history[1:2]) == {}


def test_a_relative_run_folder_is_the_drivers_for_every_worker(tmp_path, monkeypatch) -> None:
    """`--storage runs` names ./runs of the launching process: the plan hands the workers (which
    run in Ray's own folders) its absolute path, so final/ and metrics.csv land beside the
    checkpoints; so with every other local path of the job."""
    import json

    from pipelines.train.launch import plan_run

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text(json.dumps({"written": 64}))
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[2] / "jobs" / "configs" / "pretrain_tiny.yaml"
    plan = plan_run(load_config(config, {"data.uris": ["data"], "run.storage": "runs", "run.name": "rel"}))
    assert plan.run_uri == str(tmp_path / "runs" / "rel")
    assert plan.job["run"]["storage"] == str(tmp_path / "runs")
    assert plan.job["data"]["uris"] == [str(tmp_path / "data")]
