"""Optimizer groups, lr schedule, checkpoint state round trip, throughput meter."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.distributed import Collective
from pipelines.train.checkpoint import (
    TrainState,
    history_from_csv,
    history_to_csv,
    load_state,
    save_state,
    set_rng_state,
    upload_checkpoint,
)
from pipelines.train.metrics import StepMeter, format_step_line
from pipelines.train.optim import build_optimizer, lr_factor, param_groups

pytestmark = pytest.mark.unit


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual_encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.text_encoder = nn.Linear(4, 4)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.text_encoder_m = nn.Linear(4, 4).requires_grad_(False)  # momentum copy: not optimised


def test_param_groups_split_visual_and_no_decay():
    groups = {g["name"]: g for g in param_groups(Toy(), lr=1e-4, visual_lr=1e-5, weight_decay=0.02)}
    assert set(groups) == {"visual", "visual_no_decay", "text", "text_no_decay"}
    assert groups["visual"]["lr"] == 1e-5 and groups["text"]["lr"] == 1e-4
    assert groups["text_no_decay"]["weight_decay"] == 0.0 and groups["visual"]["weight_decay"] == 0.02
    n_opt = sum(p.numel() for g in groups.values() for p in g["params"])
    n_trainable = sum(p.numel() for p in Toy().parameters() if p.requires_grad)
    assert n_opt == n_trainable  # every trainable parameter exactly once, momentum copies never


def test_param_groups_see_through_ddp_prefix():
    wrapper = nn.Module()
    wrapper.module = Toy()
    names = {g["name"] for g in param_groups(wrapper, 1e-4, 1e-5, 0.02)}
    assert "visual" in names


def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, warmup_steps=10, total_steps=110, min_ratio=0.01) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert f[110] == pytest.approx(0.01)
    opt, sched = build_optimizer(
        Toy(),
        lr=1e-4,
        visual_lr=1e-5,
        weight_decay=0.02,
        betas=(0.9, 0.999),
        warmup_steps=0,
        total_steps=5,
        min_lr=1e-6,
    )
    for _ in range(5):
        opt.step()
        sched.step()
    assert all(lr == pytest.approx(1e-6) for lr in sched.get_last_lr())  # every group ends at min_lr


def test_checkpoint_roundtrip_restores_everything(tmp_path):
    model = Toy()
    opt, sched = build_optimizer(
        model,
        lr=1e-3,
        visual_lr=1e-4,
        weight_decay=0.02,
        betas=(0.9, 0.999),
        warmup_steps=2,
        total_steps=10,
        min_lr=0,
    )
    loss = sum((p**2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    sched.step()
    history = [{"step": 1.0, "loss": 2.5}, {"step": 2.0, "loss": 2.0, "mfu": 0.3}]
    state = TrainState(step=2, epoch=1, samples_seen=64, world_size=2, history=history)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    save_state(
        tmp_path,
        rank=0,
        model_state=model.state_dict(),
        optim_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        state=state,
    )
    save_state(tmp_path, rank=1, model_state=None, optim_state=None, state=state)
    expected = (torch.rand(3), np.random.rand(), random.random())

    stored = tmp_path.with_name(tmp_path.name + "-stored")  # as the loop uploads it: manifest last
    upload_checkpoint(tmp_path, str(stored), Collective())
    torch.manual_seed(0)
    loaded = load_state(stored, rank=0)
    set_rng_state(loaded.rng)  # the loop restores it when it is ready to draw
    assert (
        torch.equal(torch.rand(3), expected[0])
        and np.random.rand() == expected[1]
        and random.random() == expected[2]
    )
    # Nothing in a checkpoint needs code to unpickle: every .pt loads with weights_only=True.
    for name in ("optimizer.pt", "rng_rank0.pt", "rng_rank1.pt"):
        torch.load(tmp_path / name, weights_only=True)
    fresh = Toy()
    fresh.load_state_dict(loaded.model_state)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert loaded.state.step == 2 and loaded.state.epoch == 1 and loaded.state.samples_seen == 64
    assert loaded.state.history == history
    opt2, sched2 = build_optimizer(
        fresh,
        lr=1e-3,
        visual_lr=1e-4,
        weight_decay=0.02,
        betas=(0.9, 0.999),
        warmup_steps=2,
        total_steps=10,
        min_lr=0,
    )
    opt2.load_state_dict(loaded.optim_state["optimizer"])
    sched2.load_state_dict(loaded.optim_state["scheduler"])
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_history_csv_roundtrip_with_ragged_columns():
    rows = [{"step": 1.0, "loss": 1.0}, {"step": 2.0, "loss": 0.5, "mfu": 0.4}]
    assert history_from_csv(history_to_csv(rows)) == rows


def test_step_meter_splits_wait_and_compute(monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 5.0, 8.0])
    monkeypatch.setattr("pipelines.train.metrics.time.perf_counter", lambda: next(clock))
    meter = StepMeter()  # t=0
    meter.batch_arrived()  # waited 1
    meter.step_done(32)  # computed 3
    meter.batch_arrived()  # waited 1
    meter.step_done(32)  # computed 3
    w = meter.window()
    assert w["data_wait_frac"] == pytest.approx(2 / 8)
    assert w["samples_per_s"] == pytest.approx(64 / 8)
    line = format_step_line({"step": 2, "loss": 1.0, "loss_itc": 0.5, "lr": 1e-4, **w}, 10)
    assert "step 2/10" in line and "data-wait 25%" in line
