"""NLVR2 (two images + a statement → true/false) and SNLI-VE (image + hypothesis → entailment,
neutral or contradiction): classifiers over the fused [CLS]; accuracy."""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import torch
from torch import nn

from pipelines.data.transforms import ClassificationTransform, Transform
from pipelines.tasks.base import EvalSetup, StepContext, Task


class ClassificationTask(Task):
    """Shared by NLVR2 and SNLI-VE: they differ in images per row and in the labels."""

    primary_metric = "accuracy"
    mode = "max"
    labels: ClassVar[tuple[str, ...]]
    num_images: ClassVar[int] = 1

    def __init__(self, job, model_config) -> None:
        super().__init__(job, model_config)
        # The classifier's shape lives in the model config, so `from_pretrained` rebuilds it.
        model_config.num_images = self.num_images
        model_config.id2label = dict(enumerate(self.labels))
        model_config.label2id = {label: i for i, label in enumerate(self.labels)}

    @property
    def images_per_row(self) -> int:
        return self.num_images

    def transform(self, train: bool) -> Transform:
        cfg, job = self.model_config, self.job
        return Transform.of(
            ClassificationTransform, image_size=cfg.image_size, max_text_len=cfg.max_text_len, labels=self.labels,
            num_images=self.num_images, train=train, seed=job.run.seed,
            crop_min_scale=0.5 if job.data.crop_min_scale is None else job.data.crop_min_scale,
        )  # fmt: skip

    def model_class(self) -> type:
        from mplug.classification import MPlugForImageTextClassification

        return MPlugForImageTextClassification

    def build_model(self) -> nn.Module:
        return self.model_class()(self.model_config)

    def flops_per_sample(self) -> float:
        from mplug import flops

        cfg = self.model_config
        lv, lt = cfg.num_visual_tokens, cfg.max_text_len
        n = self.num_images
        return 3 * (
            n * flops.vision_flops(cfg)
            + flops.text_encoder_flops(cfg, lt)
            + n * flops.fusion_flops(cfg, lv, lt)
        )

    def example_batch(self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
        from mplug.modeling import random_captions

        cfg = self.model_config
        gen = torch.Generator().manual_seed(seed)
        shape = (batch_size, self.num_images, 3, cfg.image_size, cfg.image_size) if self.num_images > 1 else (
            batch_size, 3, cfg.image_size, cfg.image_size)  # fmt: skip
        ids, mask = random_captions(cfg, batch_size, cfg.max_text_len, gen)
        out = {"image": torch.randn(*shape, generator=gen), "input_ids": ids, "attention_mask": mask,
               "label": torch.randint(len(self.labels), (batch_size,), generator=gen)}  # fmt: skip
        return {k: v.to(device) for k, v in out.items()}

    def loss(self, model: nn.Module, batch: dict, index: int, prepared: Any, ctx: StepContext):
        out = model(images=batch["image"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["label"])  # fmt: skip
        return out.loss, {"loss": out.loss}, out

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        logits = model(
            images=batch["image"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        predicted = logits.argmax(-1).cpu().tolist()
        return [
            {"key": k, "prediction": self.labels[p], "label": self.labels[int(t)]}
            for k, p, t in zip(batch["key"], predicted, batch["label"].cpu().tolist())
        ]

    def score(self, predictions: list[dict], setup: EvalSetup | None = None, rescored=None):
        from mplug.metrics import accuracy

        acc = accuracy([p["prediction"] for p in predictions], [p["label"] for p in predictions])
        return {"accuracy": float(acc), "num_examples": float(len(predictions))}

    def baseline(self, predictions: list[dict], setup: EvalSetup | None = None) -> dict[str, float]:
        """Always the majority label of these examples."""
        from mplug.metrics import accuracy

        majority = Counter(p["label"] for p in predictions).most_common(1)[0][0]
        return {"accuracy": float(accuracy([majority] * len(predictions), [p["label"] for p in predictions]))}


class NLVR2Task(ClassificationTask):
    name = "nlvr2"
    labels = ("false", "true")  # NLVR2's "False"/"True"
    num_images = 2
    columns = ("key", "image", "images", "caption", "label")


class SnliVeTask(ClassificationTask):
    name = "snli_ve"
    # ALBEF's label order (ve_dataset: contradiction 0, neutral 1, entailment 2).
    labels = ("contradiction", "neutral", "entailment")
    num_images = 1
    columns = ("key", "image", "caption", "label")
