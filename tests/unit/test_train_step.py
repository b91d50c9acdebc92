"""`train_step`, the one optimizer step: gradient accumulation is exact for ITC (every
micro-batch contrasts against the whole step's keys, and all of them are enqueued), values stay
on the device until a log step reads them."""

from __future__ import annotations

import pytest
import torch

from mplug import MPlugConfig
from pipelines.tasks.base import StepContext
from pipelines.tasks.pretrain import PretrainTask
from pipelines.train.config import TrainConfig
from pipelines.train.step import train_step

pytestmark = pytest.mark.unit

CTX = StepContext(step=10, epoch=1, steps_per_epoch=10)  # past the ramp: distillation at full α


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(**overrides):
    cfg = MPlugConfig.preset("tiny", queue_size=32, text_config={"vocab_size": 1024}, **overrides)
    task = PretrainTask(TrainConfig(), cfg)
    torch.manual_seed(0)
    model = task.build_model()
    # Plain SGD: updates proportional to the gradients. Adam would scale the rounding noise of
    # zero-in-exact-arithmetic gradients (attention key biases) up to ±lr and hide the comparison.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return task, model, optimizer, scheduler


def _halves(batch: dict) -> list[dict]:
    return [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]


def test_accumulated_itc_step_equals_one_big_batch() -> None:
    """ITC (with queue and distillation) over 2 micro-batches of 4 = over one batch of 8: the
    same loss, the same update, the same 8 keys in the queue. (ITM, MLM and PrefixLM draw random
    negatives and masks per call, so they are left out: those need only be equal in law.)"""
    runs = {}
    for name in ("accumulated", "whole"):
        task, model, optimizer, scheduler = _setup(use_itm=False, use_mlm=False, use_prefix=False)
        batch = task.example_batch(8, seed=3)
        micro = _halves(batch) if name == "accumulated" else [batch]
        result = train_step(model, task, micro, optimizer, scheduler, CTX)
        runs[name] = (result, {k: v.clone() for k, v in model.state_dict().items()}, model)
    (acc, acc_state, acc_model), (whole, whole_state, _) = runs["accumulated"], runs["whole"]
    torch.testing.assert_close(acc.values["loss_itc"], whole.values["loss_itc"])
    assert int(acc_model.queue_ptr) == 8  # every micro-batch's momentum keys were enqueued
    for key, value in whole_state.items():
        torch.testing.assert_close(acc_state[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_without_the_shared_keys_accumulation_would_differ() -> None:
    """The check above can fail: contrasting each micro-batch only against itself (what an
    accumulation that ignores the other micro-batches computes) gives another loss."""
    task, model, _, _ = _setup(use_itm=False, use_mlm=False, use_prefix=False)
    batch = task.example_batch(8, seed=3)
    with torch.no_grad():
        whole = model(**_inputs(batch), alpha=0.4).loss_itc
        alone = sum(model(**_inputs(m), alpha=0.4).loss_itc for m in _halves(batch)) / 2
    assert abs(float(whole) - float(alone)) > 1e-3


def _inputs(batch: dict) -> dict:
    return {
        "images": batch["image"],
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
    }


def test_step_logs_every_objective_as_device_tensors() -> None:
    task, model, optimizer, scheduler = _setup()
    result = train_step(
        model, task, [task.example_batch(4, seed=1)], optimizer, scheduler, CTX, grad_clip=1.0
    )
    for name in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_prefix", "alpha"):
        value = result.values[name]
        assert isinstance(value, torch.Tensor) and not value.requires_grad and torch.isfinite(value), name
    assert result.grad_norm is not None and result.grad_norm > 0
    assert float(result.values["alpha"]) == pytest.approx(model.config.distill_alpha)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        train_step(model, task, [], optimizer, scheduler, CTX)
