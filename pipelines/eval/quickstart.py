"""Caption an image, or answer a question about it, from Python: the README's quickstart.

    from pipelines.eval.quickstart import Predictor

    captioner = Predictor.load("caption", "demo_out/runs/demo-tiny/final")
    print(captioner.caption("photo.jpg"))

    vqa = Predictor.load("vqa", "mplug_base.pth", preset="base", image_size=384)  # an official checkpoint
    print(vqa.answer("photo.jpg", "what is on the table?"))

One image goes the way `mplug infer` takes every image (`pipelines/eval/infer.py`): ingest's
guards and resize (`process_image`), the task's evaluation transform, the task's `predict`, so a
caption here is the caption batch inference writes. No Ray is started.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from pipelines import storage
from pipelines.tasks.base import Task


def _text_tasks() -> tuple[str, ...]:
    """The tasks that produce text for one image: those `mplug infer` serves (`batch_inference`)
    whose rows are images, not clips (a video task's rows carry `frames`)."""
    from pipelines.tasks import TASKS as REGISTRY
    from pipelines.tasks import task_class

    return tuple(
        name
        for name in REGISTRY
        if task_class(name).batch_inference and "frames" not in task_class(name).columns
    )


ImageLike = str | os.PathLike | bytes | Image.Image


def _image_bytes(image: ImageLike) -> bytes:
    """Encoded bytes of a path/URI, raw bytes or a PIL image (PNG-encoded: lossless)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
    if isinstance(image, str | os.PathLike):
        return storage.read_bytes(os.fspath(image))
    raise TypeError(
        f"image of type {type(image).__name__}: pass a path or URI, encoded bytes or a PIL.Image.Image"
    )


def _describe(image: ImageLike) -> str:
    return repr(os.fspath(image)) if isinstance(image, str | os.PathLike) else type(image).__name__


@dataclass
class Predictor:
    """A task's model on one device, with the task's evaluation transform.

    `loaded` says, one line per source, what was loaded from where (the checkpoint filter's report
    when the weights came through it)."""

    task: Task
    model: nn.Module
    device: torch.device
    loaded: list[str]

    def __post_init__(self) -> None:
        self._transform = self.task.transform(train=False).build()

    @classmethod
    def load(
        cls,
        task: str,
        model: str | os.PathLike,
        *,
        preset: str | None = None,
        image_size: int | None = None,
        options: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> Predictor:
        """The `task` model ("caption" or "vqa") from `model`, any URI of:

        - a run of ours: `STORAGE/RUN` (its `final/`), `STORAGE/RUN/final` or a `checkpoint_*`
          folder, of this task or another (a pretraining run's decoder captions); its config.json
          gives the architecture, so `preset` and `image_size` are not taken;
        - an official mPLUG checkpoint (`.pth`, e.g. `mplug_base.pth`): it does not say its size,
          so `preset` ("base", "large", ...) is required, and `image_size` sets the resolution
          (default: the preset's; the official VQA and captioning recipes finetune at 384 px base).

        `options` are the task's settings as dotted keys, as `--set` takes them
        (`{"vqa.num_beams": 3}`). `device`: default CUDA when present, else CPU.
        """
        from mplug import official
        from pipelines.batches import default_device
        from pipelines.eval.evaluate import build_eval_task, load_model
        from pipelines.tasks import task_class
        from pipelines.train.config import load_config
        from pipelines.train.init import init_architecture, load_run_weights, resolve_init
        from pipelines.train.launch import build_model_config

        if task not in _text_tasks():
            raise ValueError(
                f"task {task!r}: the quickstart captions or answers; valid tasks: {_text_tasks()}"
            )
        where = torch.device(device) if device is not None else default_device()
        source = resolve_init(os.fspath(model))
        if source.kind == "official":
            if preset is None:
                raise ValueError(
                    f"{source.uri}: an official checkpoint does not say its size; pass preset='base' "
                    "or preset='large' (and image_size=, the resolution it was finetuned at)"
                )
            overrides = {"task": task, "run.max_steps": 1, "model.preset": preset, **(options or {})}
            if image_size is not None:
                overrides["data.image_size"] = image_size
            job = load_config(None, overrides)
            task_obj = task_class(task)(job, build_model_config(job))
            net = task_obj.build_model()
            report = official.load_official_checkpoint(net, source.uri)
            return cls(task_obj, net.to(where).eval(), where, [f"{source.describe()}: {report}"])
        if preset is not None or image_size is not None:
            raise ValueError(
                f"{source.uri}: a run of ours carries its own config.json; preset= and image_size= are "
                "for official checkpoints only"
            )
        task_obj = build_eval_task(task, source.uri, dict(options or {}))
        if init_architecture(source.uri) == task_obj.model_class().__name__:
            # This task's own export: load it as `mplug evaluate` and `mplug infer` do.
            net = load_model(task_obj, source.uri, where)
            return cls(task_obj, net, where, [f"{source.describe()}: {type(net).__name__}.from_pretrained"])
        net = task_obj.build_model()
        report = load_run_weights(net, source.uri)  # another task's weights, through the checkpoint filter
        return cls(task_obj, net.to(where).eval(), where, [f"{source.describe()}: {report}"])

    def caption(self, image: ImageLike) -> str:
        """The caption of one image."""
        return self.predict([image])[0]

    def answer(self, image: ImageLike, question: str) -> str:
        """The answer to `question` about one image."""
        return self.predict([image], [question])[0]

    @torch.no_grad()
    def predict(self, images: Sequence[ImageLike], questions: Sequence[str] | None = None) -> list[str]:
        """One caption (caption) or answer (vqa, one question per image) per image, in order. An
        image ingest would reject (undecodable, too small, too elongated, ...) raises ValueError
        naming the image and the reason."""
        from pipelines.batches import collate_rows, to_device
        from pipelines.data.image import ImageLimits, ImageRejected, process_image
        from pipelines.data.transforms import objects

        name = self.task.name
        asks = "question" in self.task.columns  # the task answers a question about each image
        if asks and (questions is None or len(questions) != len(images)):
            raise ValueError(
                f"{name} answers one question per image: {len(images)} images, "
                f"{'no' if questions is None else len(questions)} questions"
            )
        if not asks and questions is not None:
            raise ValueError(f"task {name!r} takes no questions")
        if questions is not None and not all(isinstance(q, str) and q.strip() for q in questions):
            raise ValueError(f"every question must be non-empty text, got {list(questions)!r}")
        # As `mplug infer` takes images: ingest's guards, shorter side resized to the model's size.
        limits = ImageLimits(resolution=self.task.model_config.image_size, min_size=8)
        jpegs = []
        for image in images:
            try:
                jpegs.append(process_image(_image_bytes(image), limits).jpeg)
            except ImageRejected as err:
                raise ValueError(f"image {_describe(image)} cannot be used: {err}") from None
        keys = [f"{i:06d}" for i in range(len(jpegs))]
        batch = {"key": objects(keys), "image": objects(jpegs),
                 "question": objects(list(questions) if questions is not None else [None] * len(jpegs))}  # fmt: skip
        rows = self.task.predict(self.model, to_device(collate_rows(self._transform(batch)), self.device))
        by_key = {str(row["key"]): row["prediction"] for row in self.task.inference_rows(rows)}
        return [by_key[k] for k in keys]
