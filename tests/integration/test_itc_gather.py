"""ITC across data-parallel ranks: two gloo processes, each holding half the batch, give the
same loss (averaged over ranks), gradients (averaged, as DDP does) and gathered momentum
features as one process holding the whole batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mplug import MPlugConfig, MPlugForPretraining

pytestmark = pytest.mark.integration

BATCH, WORLD = 6, 2


def _model() -> MPlugForPretraining:
    torch.manual_seed(0)
    # ITC only: the other objectives draw random masks/negatives per process.
    cfg = MPlugConfig.preset("tiny", queue_size=32, use_itm=False, use_mlm=False, use_prefix=False)
    return MPlugForPretraining(cfg)


def _step(model: MPlugForPretraining, batch: dict) -> dict[str, torch.Tensor]:
    out = model(**batch, alpha=0.4)
    out.loss.backward()
    model.momentum_update(out)
    return {
        "loss": out.loss_itc.detach(),
        "image_feat_m": out.image_feat_m,
        "grad_text_proj": model.text_proj.weight.grad.clone(),
        "grad_vit": model.visual_encoder.blocks[0].attn.qkv.weight.grad.clone(),
        "text_queue": model.text_queue.clone(),
    }


def _worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        full = model.example_inputs(BATCH, seed=11)
        half = BATCH // WORLD
        local = {k: v[rank * half : (rank + 1) * half] for k, v in full.items()}
        results[rank] = _step(model, local)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_itc_gathered_over_two_ranks_equals_single_process() -> None:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        shared = manager.dict()
        mp.start_processes(
            _worker, args=(_free_port(), shared), nprocs=WORLD, join=True, start_method="spawn"
        )
        ranks = [dict(shared[r]) for r in range(WORLD)]

    model = _model()
    single = _step(model, model.example_inputs(BATCH, seed=11))

    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"])
    for r in ranks:
        torch.testing.assert_close(r["image_feat_m"], single["image_feat_m"])  # gathered = whole batch
        torch.testing.assert_close(r["text_queue"], single["text_queue"])  # queues stay in sync
    for key in ("grad_text_proj", "grad_vit"):
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, single[key], atol=1e-6, rtol=1e-4)
