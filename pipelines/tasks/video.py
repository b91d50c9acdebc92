"""The video tasks: mPLUG's zero-shot transfer to video-language tasks, and finetuning on them.

A video task is its image task with a clip in place of the image, as the official video scripts
run an image model unchanged: each of the clip's `video.num_frames` frames goes through the
vision tower on its own; the fusion and the decoder read the frames' tokens concatenated
(`mplug.modeling.encode_frames`), and ITC ranks a clip by the mean of its frames' CLS embeddings
(`mplug.modeling.visual_cls`). The model is the image task's (`--model` an image model of ours:
zero-shot), so its weights load unchanged.

- `video_retrieval`: text↔video recall after ITM re-ranking of each query's ITC top k; `r_mean`
  ranks by ITM + ITC as the official MSRVTT evaluation does (`itm_*`: by ITM alone).
- `video_qa`: the answer ranked from `vqa.answer_list` (a JSON list, or MSRVTT-QA's
  `{answer: label}` train_ans2label.json) as the official `rank_answer`, or generated; top-1
  `accuracy` against the annotated answer (MSRVTT-QA, MSVD-QA).
- `video_caption`: BLEU, METEOR, ROUGE-L and CIDEr against every reference of a clip (VATEX);
  the official VATEX run prompts with `caption.prompt: "a picture of "`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import ClassVar

import torch

from pipelines.data.transforms import Transform
from pipelines.data.video_transforms import VideoCaptionTransform, VideoQATransform, VideoRetrievalTransform
from pipelines.tasks.caption import CaptionTask
from pipelines.tasks.retrieval import RetrievalTask
from pipelines.tasks.vqa import VQATask, question_type


def video_task_for(image_task: str) -> str | None:
    """The registered video task that runs `image_task`'s model on clips (None: there is none)."""
    from pipelines.tasks import TASKS, task_class

    for name, target in TASKS.items():
        if target.startswith(f"{__name__}:") and getattr(task_class(name), "image_task", None) == image_task:
            return name
    return None


class VideoTask:
    """What the three video tasks add to their image task (a mixin before it)."""

    image_task: ClassVar[str]
    video_transform: ClassVar[type]

    def transform(self, train: bool) -> Transform:
        image = super().transform(train)  # type: ignore[misc]
        opts = self.job.video  # type: ignore[attr-defined]
        return Transform.of(self.video_transform, **dict(image.kwargs), num_frames=opts.num_frames,
                            frame_sampling=opts.frame_sampling)  # fmt: skip

    @property
    def images_per_row(self) -> int:
        """Images a transformed row holds (the stream sizes its blocks by it)."""
        return self.job.video.num_frames  # type: ignore[attr-defined]

    def example_batch(self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
        batch = super().example_batch(batch_size, seed, device)  # type: ignore[misc]
        gen = torch.Generator().manual_seed(seed + 1)
        frames = torch.randn(batch_size, self.job.video.num_frames, *batch["image"].shape[1:], generator=gen)  # type: ignore[attr-defined]
        batch["image"] = frames.to(batch["image"].device)
        return batch

    def _visual_tokens(self) -> int:
        return self.job.video.num_frames * self.model_config.num_visual_tokens  # type: ignore[attr-defined]

    def _vision_flops(self) -> float:
        from mplug import flops

        return self.job.video.num_frames * flops.vision_flops(self.model_config)  # type: ignore[attr-defined]


class VideoRetrievalTask(VideoTask, RetrievalTask):
    name = "video_retrieval"
    image_task = "retrieval"
    video_transform = VideoRetrievalTransform
    columns = ("key", "image", "caption", "image_id", "frames")

    def flops_per_sample(self) -> float:
        from mplug import flops

        cfg, lt = self.model_config, self.model_config.max_text_len
        online = self._vision_flops() + flops.text_encoder_flops(cfg, lt)
        online += 3 * flops.fusion_flops(cfg, self._visual_tokens(), lt)
        return 3 * online + self._vision_flops() + flops.text_encoder_flops(cfg, lt)

    def score(self, predictions: list[dict], setup=None, rescored=None) -> dict[str, float]:
        """As the image task's, with the official video evaluation's ranking as the primary: ITM
        score + ITC similarity (`r_mean`, `i2t_*`, `t2i_*`); by ITM alone as `itm_*`."""
        metrics = super().score(predictions, setup, rescored)
        if rescored is None:
            return metrics
        both = {k[len("itm_itc_") :]: v for k, v in metrics.items() if k.startswith("itm_itc_")}
        out = {k: v for k, v in metrics.items() if not k.startswith("itm_itc_") and k not in both}
        out.update(both)
        out.update({f"itm_{k}": metrics[k] for k in both})
        return out


def read_answer_list(value: object, uri: str) -> list[str]:
    """An answer list as `vqa.answer_list` gives it: a JSON list of strings, or MSRVTT-QA's
    `{answer: label}` (train_ans2label.json: its answers in label order)."""
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        if all(isinstance(v, int) for v in value.values()):
            return sorted(value, key=lambda a: value[a])
        return list(value)
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return list(value)
    raise ValueError(
        f"vqa.answer_list {uri!r} must hold a JSON list of strings or an {{answer: label}} mapping"
    )


def _normal(answer: str) -> str:
    return " ".join(str(answer).lower().split())


class VideoQATask(VideoTask, VQATask):
    name = "video_qa"
    image_task = "vqa"
    video_transform = VideoQATransform
    primary_metric = "accuracy"
    columns = (*VQATask.columns, "frames")

    def flops_per_sample(self) -> float:
        from mplug import flops

        cfg, opts, lq = self.model_config, self.job.vqa, self.model_config.max_text_len
        forward = self._vision_flops() + flops.text_encoder_flops(cfg, lq)
        forward += flops.fusion_flops(cfg, self._visual_tokens(), lq)
        forward += flops.decoder_flops(cfg, opts.answer_len, self._visual_tokens() + lq, opts.answer_len - 1)
        return 3 * forward  # one answer per question (MSRVTT-QA, MSVD-QA)

    def _candidates(self, device: torch.device) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        if getattr(self, "_answer_list", None) is None:
            from pipelines import storage

            uri = self.job.vqa.answer_list
            answers = read_answer_list(json.loads(storage.read_text(uri)), uri)
            tokens = self._tokenizer()(answers, padding="longest", truncation=True,
                                       max_length=self.job.vqa.answer_len, return_tensors="pt")  # fmt: skip
            self._answer_list = (answers, tokens["input_ids"], tokens["attention_mask"])
        answers, ids, mask = self._answer_list
        return answers, ids.to(device), mask.to(device)

    def submission(self, predictions: list[dict]) -> None:
        return None  # MSRVTT-QA and MSVD-QA have no evaluation server

    @staticmethod
    def _truth(p: dict) -> str:
        """The annotated answer (the most common one, where a row holds several)."""
        return Counter(_normal(a) for a in p["answers"]).most_common(1)[0][0]

    def score(self, predictions: list[dict], setup=None, rescored=None) -> dict[str, float]:
        """Top-1 accuracy (percent): the answer equals the annotated one, as the official
        MSRVTT-QA evaluation counts (here case and spacing aside)."""
        scored = [p for p in predictions if p["answers"]]
        if not scored:
            raise ValueError("no evaluation question has an answer: accuracy needs them (a test split?)")
        correct = sum(_normal(p["answer"]) == self._truth(p) for p in scored)
        return {"accuracy": 100.0 * correct / len(scored), "num_questions": float(len(scored))}

    def baseline(self, predictions: list[dict], setup=None) -> dict[str, float]:
        """The question-type prior: the most common answer of the question's type (its first
        two words) among these questions themselves, for every question; it sees no video."""
        scored = [p for p in predictions if p["answers"]]
        by_type: dict[str, Counter] = {}
        for p in scored:
            by_type.setdefault(question_type(p["question"]), Counter())[self._truth(p)] += 1
        correct = sum(
            by_type[question_type(p["question"])].most_common(1)[0][0] == self._truth(p) for p in scored
        )
        return {"accuracy": 100.0 * correct / max(1, len(scored))}


class VideoCaptionTask(VideoTask, CaptionTask):
    name = "video_caption"
    image_task = "caption"
    video_transform = VideoCaptionTransform
    columns = (*CaptionTask.columns, "frames")

    def flops_per_sample(self) -> float:
        from mplug import flops

        cfg, opts = self.model_config, self.job.caption
        lt, lv = opts.caption_len, self._visual_tokens()
        if not opts.scst:
            return 3 * (self._vision_flops() + flops.decoder_flops(cfg, lt, lv, lt - 1))
        search = opts.scst_beams * opts.max_length * flops.decoder_flops(cfg, 1, lv, 1)
        return (
            self._vision_flops() * 4 + search + 3 * opts.scst_beams * flops.decoder_flops(cfg, lt, lv, lt - 1)
        )

    def submission(self, predictions: list[dict]) -> None:
        return None  # VATEX's server takes {videoID: caption}, not a list of rows
