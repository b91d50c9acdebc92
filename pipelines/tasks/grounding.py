"""Visual grounding (RefCOCO-style referring expressions): the box generated as four coordinate
tokens; accuracy = share of expressions whose box has IoU ≥ 0.5 with the annotated one, in the
original image's pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.data.transforms import GroundingTransform, Transform
from pipelines.tasks.base import EvalSetup, StepContext, Task


def square_to_original(
    boxes: torch.Tensor, frame: torch.Tensor, to_original: torch.Tensor, size: int
) -> torch.Tensor:
    """Normalised (cx, cy, w, h) in the letterboxed square (B, 4) -> (x, y, w, h) in the
    original image's pixels, undoing the padding offset and both resizes."""
    cx, cy, w, h = (boxes * size).unbind(-1)
    ox, oy, scale = frame.unbind(-1)
    x, y = (cx - w / 2 - ox) / scale, (cy - h / 2 - oy) / scale  # stored-image pixels
    return torch.stack([x, y, w / scale, h / scale], dim=-1) * to_original[:, None]


class GroundingTask(Task):
    name = "grounding"
    primary_metric = "accuracy"
    mode = "max"
    columns = ("key", "image", "caption", "bbox", "width", "height", "orig_width", "orig_height")

    def transform(self, train: bool) -> Transform:
        cfg, job = self.model_config, self.job
        return Transform.of(
            GroundingTransform, image_size=cfg.image_size, max_text_len=cfg.max_text_len, train=train,
            seed=job.run.seed, crop_probability=job.grounding.crop_probability,
        )  # fmt: skip

    def model_class(self) -> type:
        from mplug.grounding import MPlugForGrounding

        return MPlugForGrounding

    def build_model(self) -> nn.Module:
        return self.model_class()(self.model_config)

    def check_init(self, source) -> None:
        """`grounding.bin_init: ordinal` keeps the bins of a grounding model: the plan must know
        whether `model.init` holds one."""
        if self.job.grounding.bin_init == "ordinal" and source.kind == "run" and source.architecture is None:
            raise ValueError(
                f"model.init {source.uri!r} has no config.json, so it does not say whether it holds a "
                "grounding model (grounding.bin_init=ordinal keeps a grounding model's box bins and resets "
                "any other's): pass its run's final/ folder, or set grounding.bin_init=keep"
            )

    def after_initial_weights(self, model: nn.Module, init_architecture: str | None = None) -> list[str]:
        if self.job.grounding.bin_init == "keep":
            return []
        init = self.job.model.init
        if init and init_architecture == self.model_class().__name__:
            return [f"box bins kept as trained: model.init {init} is a grounding model"]
        model.init_box_bins()
        return [
            f"box bins: the {model.num_bins} coordinate tokens start from an ordinal code (grounding.bin_init)"
        ]

    def flops_per_sample(self) -> float:
        from mplug import flops

        cfg = self.model_config
        lv, lt = cfg.num_visual_tokens, cfg.max_text_len
        forward = (flops.vision_flops(cfg) + flops.text_encoder_flops(cfg, lt) + flops.fusion_flops(cfg, lv, lt)
                   + flops.decoder_flops(cfg, 4, lv + lt, 4))  # fmt: skip
        return 3 * forward

    def example_batch(self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
        from mplug.modeling import random_captions

        cfg = self.model_config
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=gen)
        ids, mask = random_captions(cfg, batch_size, cfg.max_text_len, gen)
        centre, size = (
            torch.rand(batch_size, 2, generator=gen) * 0.5 + 0.25,
            torch.rand(batch_size, 2, generator=gen) * 0.4 + 0.1,
        )
        boxes = torch.cat([centre, size], dim=1)
        out = {"image": images, "text_ids": ids, "text_mask": mask, "boxes": boxes}
        return {k: v.to(device) for k, v in out.items()}

    def loss(self, model: nn.Module, batch: dict, index: int, prepared: Any, ctx: StepContext):
        out = model(
            images=batch["image"],
            text_ids=batch["text_ids"],
            text_mask=batch["text_mask"],
            boxes=batch["boxes"],
            weighted=self.job.grounding.loss == "weighted",
        )
        return out.loss, {"loss": out.loss}, out

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        pred = model.predict_boxes(batch["image"], batch["text_ids"], batch["text_mask"])
        boxes = square_to_original(pred.float(), batch["frame"].float(), batch["to_original"].float(),
                                   self.model_config.image_size)  # fmt: skip
        return [
            {"key": k, "box": b, "gt_box": g, "image_size": s}
            for k, b, g, s in zip(
                batch["key"],
                boxes.cpu().numpy(),
                batch["gt_box"].float().cpu().numpy(),
                batch["orig_size"].float().cpu().numpy(),
            )  # fmt: skip
        ]

    def score(self, predictions: list[dict], setup: EvalSetup | None = None, rescored=None):
        from mplug.metrics import grounding_accuracy

        pred = np.stack([p["box"] for p in predictions])
        gt = np.stack([p["gt_box"] for p in predictions])
        sizes = np.stack([p["image_size"] for p in predictions])
        # Predicted boxes are clipped to their image first, as the official evaluation does.
        accuracy = grounding_accuracy(pred, gt, threshold=self.job.grounding.iou_threshold, image_sizes=sizes)
        return {"accuracy": float(accuracy), "num_expressions": float(len(predictions))}
