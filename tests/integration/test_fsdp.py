"""FSDP2 (`strategy: fsdp`) on two gloo CPU processes: it trains the same model as DDP, and a
run restored from its gathered checkpoint state continues exactly where it stopped.

All objectives are on (ITC with a queue, ITM hard negatives, MLM, PrefixLM), so momentum
encoders, queues and the 1-element temperature all go through sharding, the EMA update, the
full-state gather and the optimizer-state round trip.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from mplug import MPlugConfig, MPlugForPretraining
from pipelines.tasks.base import StepContext
from pipelines.tasks.pretrain import PretrainTask
from pipelines.train.config import TrainConfig
from pipelines.train.optim import build_optimizer
from pipelines.train.parallel import full_optim_state, full_state_dict, load_optim_state, parallelize, unwrap
from pipelines.train.step import train_step
from tests.gloo import run_ranks

pytestmark = pytest.mark.integration

WORLD, STEPS, PER_RANK_BATCH = 2, 3, 4


CONFIG = MPlugConfig.preset("tiny", queue_size=16)
TASK = PretrainTask(TrainConfig(), CONFIG)


def _fresh_model() -> MPlugForPretraining:
    torch.manual_seed(0)  # identical initial weights on every rank and in every run
    return TASK.build_model()


def _train(model, strategy: str, steps: range, rank: int, optim_state: dict | None = None, accum: int = 1):
    """Wrap, build the job's optimizer, optionally restore its state, run `steps` of `accum`
    micro-batches each through the loop's `train_step`; return the wrapped model, optimizer,
    scheduler and the per-step losses."""
    model = parallelize(model, strategy=strategy, device=torch.device("cpu"))
    optimizer, scheduler = build_optimizer(
        model,
        lr=1e-3,
        visual_lr=5e-4,
        weight_decay=0.02,
        betas=(0.9, 0.98),
        warmup_steps=1,
        total_steps=STEPS,
        min_lr=1e-5,
    )
    if optim_state is not None:
        load_optim_state(model, optimizer, optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
    losses = []
    for step in steps:
        micro = [TASK.example_batch(PER_RANK_BATCH, seed=100 * step + 10 * m + rank) for m in range(accum)]
        torch.manual_seed(1000 * step + rank)  # same MLM masks / ITM negatives in every run
        ctx = StepContext(step=step + STEPS, epoch=1, steps_per_epoch=STEPS)  # distillation at full α
        result = train_step(model, TASK, micro, optimizer, scheduler, ctx, grad_clip=5.0)
        losses.append(float(result.values["loss"]))
    return model, optimizer, scheduler, losses


def _compared(name: str, value: torch.Tensor) -> bool:
    # An attention key bias gets a zero gradient in exact arithmetic (softmax ignores a shift
    # shared by a query's row), so its float gradient is rounding noise that Adam scales up to
    # ±lr: any two reduction orders disagree there. Every other weight is compared.
    return value.is_floating_point() and not name.endswith(".key.bias")


def _compare_runs(rank: int, ckpt_dir: str) -> dict | None:
    """On every rank: the DDP, FSDP2, accumulation and interrupted runs; rank 0 returns the comparison."""
    ddp, _, _, ddp_losses = _train(_fresh_model(), "ddp", range(STEPS), rank)
    ddp_state = full_state_dict(ddp)

    fsdp, _, _, fsdp_losses = _train(_fresh_model(), "fsdp", range(STEPS), rank)
    fsdp_state = full_state_dict(fsdp)
    sharded = [n for n, p in unwrap(fsdp).named_parameters() if type(p).__name__ == "DTensor"]

    # Gradient accumulation: skipping the sync on the first micro-step changes nothing.
    ddp_acc, _, _, ddp_acc_losses = _train(_fresh_model(), "ddp", range(STEPS), rank, accum=2)
    fsdp_acc, _, _, fsdp_acc_losses = _train(_fresh_model(), "fsdp", range(STEPS), rank, accum=2)
    ddp_acc_state, fsdp_acc_state = full_state_dict(ddp_acc), full_state_dict(fsdp_acc)

    # Interrupted run: 2 steps, gather a checkpoint as the loop does, restore into a fresh
    # model in a fresh FSDP wrap (every rank reads rank 0's files), run the last step.
    part, optimizer, scheduler, first_losses = _train(_fresh_model(), "fsdp", range(STEPS - 1), rank)
    model_state = full_state_dict(part)
    optim_state = {"optimizer": full_optim_state(part, optimizer), "scheduler": scheduler.state_dict()}
    path = os.path.join(ckpt_dir, "ckpt.pt")
    if rank == 0:
        torch.save({"model": model_state, "optim": optim_state}, path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=True)
    restored = _fresh_model()
    restored.load_state_dict(ckpt["model"])
    restored, _, _, last_loss = _train(
        restored, "fsdp", range(STEPS - 1, STEPS), rank, optim_state=ckpt["optim"]
    )
    restored_state = full_state_dict(restored)

    if rank != 0:
        return None
    diff = {
        name: max(float((a[k].float() - b[k].float()).abs().max()) for k in a if _compared(k, a[k]))
        for name, (a, b) in {
            "fsdp_vs_ddp": (fsdp_state, ddp_state),
            "restored_vs_fsdp": (restored_state, fsdp_state),
            "accum_fsdp_vs_ddp": (fsdp_acc_state, ddp_acc_state),
            "accum_vs_plain": (fsdp_acc_state, fsdp_state),
        }.items()
    }
    return dict(
        ddp_losses=ddp_losses,
        fsdp_losses=fsdp_losses,
        resumed_losses=first_losses + last_loss,
        ddp_acc_losses=ddp_acc_losses,
        fsdp_acc_losses=fsdp_acc_losses,
        sharded=len(sharded),
        params=sum(1 for _ in unwrap(fsdp).parameters()),
        keys_equal=set(fsdp_state) == set(ddp_state) == set(restored_state),
        temp_shape=tuple(fsdp_state["temp"].shape),
        **diff,
    )


def test_fsdp2_matches_ddp_and_resumes_exactly() -> None:
    with tempfile.TemporaryDirectory() as ckpt_dir:
        r = run_ranks(_compare_runs, WORLD, ckpt_dir)[0]

    # Every parameter, momentum copies and the temperature included, is sharded.
    assert r["sharded"] == r["params"] > 0
    assert r["keys_equal"] and r["temp_shape"] == (1,)
    # Same losses and weights as DDP (reduce-scatter vs all-reduce: float rounding only).
    assert r["fsdp_losses"] == pytest.approx(r["ddp_losses"], rel=1e-4)
    assert r["fsdp_vs_ddp"] < 2e-4  # a gradient left unreduced moves weights ~lr = 1e-3 per step
    assert r["fsdp_acc_losses"] == pytest.approx(r["ddp_acc_losses"], rel=1e-4)
    assert r["accum_fsdp_vs_ddp"] < 2e-4
    assert r["accum_vs_plain"] > 1e-3  # other data: the accumulation runs really differ
    # The restored run continues the uninterrupted one.
    assert r["resumed_losses"] == pytest.approx(r["fsdp_losses"], rel=1e-4)
    assert r["restored_vs_fsdp"] < 1e-4


def _scst_samples(rank: int, references: str) -> dict:
    """SCST's sampling on an FSDP2-sharded captioning model, each rank decoding a different
    number of steps (rank 0 stops at 3 tokens, rank 1 at 7): with sharded forwards the ranks'
    all-gathers would stop matching and the run would hang."""
    from tests import finetune as ft

    length = 3 if rank == 0 else 7
    task = ft.task_from_config("caption", "jobs/configs/finetune_caption_scst_tiny.yaml", {
        "data.uris": [references], "caption.min_length": length, "caption.max_length": length,
        "model.overrides.text_config": {"vocab_size": 1024},
    })  # fmt: skip
    batch = {"image": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(rank)),
             "image_id": ["img0", "img1"]}  # fmt: skip
    ctx = StepContext(step=0, epoch=0, steps_per_epoch=1)
    torch.manual_seed(0)
    sharded = parallelize(task.build_model(), strategy="fsdp", device=torch.device("cpu"))
    [(ids, _, rewards)] = task.prepare_step(sharded, [batch], ctx)
    still_sharded = all(type(p).__name__ == "DTensor" for p in unwrap(sharded).parameters())
    torch.manual_seed(0)
    [(plain_ids, _, plain_rewards)] = task.prepare_step(task.build_model(), [batch], ctx)
    return {"ids": ids.tolist(), "plain_ids": plain_ids.tolist(), "rewards": rewards.tolist(),
            "plain_rewards": plain_rewards.tolist(), "still_sharded": still_sharded}  # fmt: skip


def test_scst_samples_on_a_sharded_decoder_however_long_each_rank_decodes(tmp_path) -> None:
    from tests import finetune as ft

    refs = [{"key": f"k{i}", "image_id": f"img{i % 2}", "caption": c}
            for i, c in enumerate(["a red circle", "two blue squares", "a red circle left", "blue squares"])]  # fmt: skip
    uri = ft.caption_references(refs, str(tmp_path))
    ranks = run_ranks(_scst_samples, WORLD, uri, timeout_s=120)
    for rank, r in enumerate(ranks):
        # The same captions as the unsharded model samples, each rank at its own length.
        assert r["ids"] == r["plain_ids"]
        torch.testing.assert_close(torch.tensor(r["rewards"]), torch.tensor(r["plain_rewards"]))
        assert len(r["ids"][0]) == (3 if rank == 0 else 7) + 1  # [CLS] + the generated tokens
        assert r["still_sharded"]  # resharded after sampling: training goes on sharded
