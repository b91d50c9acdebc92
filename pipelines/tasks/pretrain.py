"""The pretraining task: ITC, ITM, MLM and PrefixLM on image-caption pairs; evaluated by
zero-shot image↔text retrieval (ITC similarity) on held-out pairs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mplug.objectives import distill_alpha
from pipelines.data.transforms import ImageTextTransform, Transform
from pipelines.tasks.base import StepContext, Task
from pipelines.train.parallel import unsharded

LOSS_NAMES = ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_prefix")


def inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A stream row batch as the model's keyword arguments."""
    return {
        "images": batch["image"],
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
    }


class PretrainTask(Task):
    name = "pretrain"
    primary_metric = "r_mean"
    mode = "max"
    requires_init = False
    columns = ("key", "image", "caption", "question", "image_id")

    def transform(self, train: bool) -> Transform:
        cfg, data = self.model_config, self.job.data
        return Transform.of(
            ImageTextTransform, image_size=cfg.image_size, max_text_len=cfg.max_text_len, train=train,
            seed=self.job.run.seed, include_key=not train,
            crop_min_scale=0.2 if data.crop_min_scale is None else data.crop_min_scale,
        )  # fmt: skip

    def model_class(self) -> type:
        from mplug.modeling import MPlugForPretraining

        return MPlugForPretraining

    def build_model(self) -> nn.Module:
        from mplug.tokenizer import word_start_table

        model = self.model_class()(self.model_config)
        model.set_word_starts(word_start_table(self.model_config.text_config.vocab_size))
        return model

    @property
    def unused_parameters(self) -> bool:
        cfg = self.model_config
        return not all((cfg.use_itc, cfg.use_itm, cfg.use_mlm, cfg.use_prefix))

    def flops_per_sample(self) -> float:
        from mplug import flops

        return float(flops.pretraining_step_flops(self.model_config))

    def example_batch(self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
        from mplug.modeling import random_captions

        cfg = self.model_config
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=gen)
        ids, mask = random_captions(cfg, batch_size, cfg.max_text_len, gen)
        return {"image": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}

    # ---- step ---------------------------------------------------------------------------
    def prepare_step(self, model: nn.Module, micro_batches: list[dict], ctx: StepContext) -> Any:
        """Momentum keys of every micro-batch of the step, gathered over ranks: each micro-batch
        then contrasts against the whole step's batch (plus the queue), exactly as one batch of
        micro-batch × accumulation × workers rows would, and the queue receives them all."""
        if not self.model_config.use_itc:
            return None
        with torch.no_grad(), unsharded(model) as inner:
            return inner.gather_keys([inputs(b) for b in micro_batches])

    def loss(self, model: nn.Module, batch: dict, index: int, prepared: Any, ctx: StepContext):
        cfg = self.model_config
        alpha = distill_alpha(cfg.distill_alpha, ctx.epoch, ctx.step, ctx.steps_per_epoch)
        keys, offsets = prepared if prepared is not None else (None, [0])
        out = model(**inputs(batch), alpha=alpha, keys=keys, key_offset=offsets[index],
                    itm_hard_negatives=ctx.step >= cfg.itm_random_negative_steps)  # fmt: skip
        values = {name: getattr(out, name) for name in LOSS_NAMES}
        values["alpha"] = torch.tensor(alpha)
        return out.loss, values, out

    def after_step(self, model: nn.Module, prepared: Any, last_output: Any) -> None:
        model.momentum_update(last_output)

    # ---- evaluation: zero-shot retrieval --------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        image = model.encode_image_features(batch["image"]).float().cpu().numpy()
        text = model.encode_text_features(batch["input_ids"], batch["attention_mask"]).float().cpu().numpy()
        return [
            {"key": k, "image_id": i, "image_emb": ie, "text_emb": te}
            for k, i, ie, te in zip(batch["key"], batch["image_id"], image, text)
        ]

    def score(self, predictions: list[dict], setup=None, rescored=None) -> dict[str, float]:
        from pipelines.tasks.ranking import itc_recall

        return itc_recall(predictions)

    def baseline(self, predictions: list[dict], setup=None) -> dict[str, float]:
        from pipelines.tasks.ranking import chance_recall

        return chance_recall(predictions)
