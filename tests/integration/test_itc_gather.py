"""ITC across data-parallel ranks: two gloo processes, each holding half the batch, give the
same loss (averaged over ranks), gradients (averaged, as DDP does) and gathered momentum
features as one process holding the whole batch."""

from __future__ import annotations

import pytest
import torch

from mplug import MPlugConfig, MPlugForPretraining
from tests.gloo import run_ranks

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


def _half_batch_step(rank: int) -> dict[str, torch.Tensor]:
    from pipelines.distributed import gather_features

    model = _model()
    model.set_feature_gather(gather_features)  # as `parallelize` sets it
    full = model.example_inputs(BATCH, seed=11)
    half = BATCH // WORLD
    return _step(model, {k: v[rank * half : (rank + 1) * half] for k, v in full.items()})


def test_itc_gathered_over_two_ranks_equals_single_process() -> None:
    ranks = run_ranks(_half_batch_step, WORLD)

    model = _model()
    single = _step(model, model.example_inputs(BATCH, seed=11))

    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"])
    for r in ranks:
        torch.testing.assert_close(r["image_feat_m"], single["image_feat_m"])  # gathered = whole batch
        torch.testing.assert_close(r["text_queue"], single["text_queue"])  # queues stay in sync
    for key in ("grad_text_proj", "grad_vit"):
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, single[key], atol=1e-6, rtol=1e-4)
