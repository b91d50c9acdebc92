"""Image-text retrieval: ITC (captions of one image are positives) + ITM with hard negatives;
evaluated by R@1/5/10 both ways after ITM re-ranking of each query's ITC top k."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipelines.data.transforms import RetrievalTransform, Transform
from pipelines.tasks.base import EvalSetup, StepContext
from pipelines.tasks.pretrain import PretrainTask, inputs
from pipelines.train.parallel import unsharded


class RetrievalTask(PretrainTask):
    name = "retrieval"
    primary_metric = "r_mean"
    mode = "max"
    requires_init = True
    columns = ("key", "image", "caption", "image_id")

    def transform(self, train: bool) -> Transform:
        cfg, job = self.model_config, self.job
        return Transform.of(
            RetrievalTransform, image_size=cfg.image_size, max_text_len=cfg.max_text_len, train=train,
            seed=job.run.seed, crop_min_scale=0.5 if job.data.crop_min_scale is None else job.data.crop_min_scale,
        )  # fmt: skip

    def model_class(self) -> type:
        from mplug.retrieval import MPlugForRetrieval

        return MPlugForRetrieval

    def build_model(self) -> nn.Module:
        return self.model_class()(self.model_config)

    @property
    def unused_parameters(self) -> bool:
        return False

    def flops_per_sample(self) -> float:
        from mplug import flops

        cfg = self.model_config
        lv, lt = cfg.num_visual_tokens, cfg.max_text_len
        online = (
            flops.vision_flops(cfg) + flops.text_encoder_flops(cfg, lt) + 3 * flops.fusion_flops(cfg, lv, lt)
        )
        momentum = flops.vision_flops(cfg) + flops.text_encoder_flops(cfg, lt)  # forward only
        return 3 * online + momentum

    def example_batch(self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
        batch = super().example_batch(batch_size, seed, device)
        batch["image_number"] = (torch.arange(batch_size) // 2).to(device)  # two captions per image
        return batch

    def prepare_step(self, model: nn.Module, micro_batches: list[dict], ctx: StepContext) -> Any:
        with torch.no_grad(), unsharded(model) as inner:
            return inner.gather_keys(
                [inputs(b) for b in micro_batches], [b["image_number"] for b in micro_batches]
            )

    def loss(self, model: nn.Module, batch: dict, index: int, prepared: Any, ctx: StepContext):
        alpha = self.model_config.distill_alpha * min(1.0, ctx.step / max(1, ctx.steps_per_epoch))
        keys, offsets = prepared
        out = model(
            **inputs(batch),
            image_ids=batch["image_number"],
            alpha=alpha,
            keys=keys,
            key_offset=offsets[index],
            itm_hard_negatives=ctx.step >= self.model_config.itm_random_negative_steps,
        )
        return out.loss, {"loss": out.loss, "loss_itc": out.loss_itc, "loss_itm": out.loss_itm}, out

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        rows = super().predict(model, batch)
        images = batch["image"].half().cpu().numpy()  # kept for ITM re-ranking (half: memory)
        ids, mask = batch["input_ids"].cpu().numpy(), batch["attention_mask"].cpu().numpy()
        for row, image, i, m in zip(rows, images, ids, mask):
            row.update({"image": image, "input_ids": i, "attention_mask": m})
        return rows

    def score(self, predictions: list[dict], model: nn.Module | None = None, setup: EvalSetup | None = None):
        from pipelines.eval.retrieval import itc_recall, reranked_recall

        if model is None:
            return itc_recall(predictions)
        return reranked_recall(model, predictions, k=self.job.retrieval.k_test)
