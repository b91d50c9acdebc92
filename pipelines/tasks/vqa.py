"""Visual question answering: answer generation (or answer-list ranking) conditioned on the
fused image and question, scored by the official VQA accuracy (GT-Vision-Lab rules)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from pipelines.data.transforms import Transform, VQATransform
from pipelines.tasks.base import StepContext, Task

MODEL_INPUTS = ("question_ids", "question_mask")


def decode(tokenizer, ids: torch.Tensor) -> list[str]:
    """Generated ids (B, T) -> text, special tokens dropped, word pieces joined."""
    return [t.strip() for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]


def official_id(value: str) -> int | str:
    """The official evaluation servers expect integer ids (VQA question_id, COCO image_id)."""
    return int(value) if str(value).isdigit() else value


def question_type(question: str, words: int = 2) -> str:
    """The question's first words ("what color", "how many", "is there"): VQA's question
    types are prefixes like these."""
    return " ".join(question.lower().split()[:words])


class VQATask(Task):
    name = "vqa"
    primary_metric = "vqa_accuracy"
    mode = "max"
    columns = ("key", "image", "question", "answers", "answer_weights", "raw_answers", "dataset", "image_id")
    batch_inference = True

    def transform(self, train: bool) -> Transform:
        cfg, job, opts = self.model_config, self.job, self.job.vqa
        return Transform.of(
            VQATransform, image_size=cfg.image_size, question_len=cfg.max_text_len, answer_len=opts.answer_len,
            max_answers=opts.max_answers, train=train, seed=job.run.seed,
            crop_min_scale=0.5 if job.data.crop_min_scale is None else job.data.crop_min_scale,
            single_answer_weight=opts.single_answer_weight, single_answer_sources=tuple(opts.single_answer_sources),
        )  # fmt: skip

    def model_class(self) -> type:
        from mplug.vqa import MPlugForQuestionAnswering

        return MPlugForQuestionAnswering

    def build_model(self) -> nn.Module:
        return self.model_class()(self.model_config)

    def flops_per_sample(self) -> float:
        from mplug import flops

        cfg, opts = self.model_config, self.job.vqa
        lv, lq = cfg.num_visual_tokens, cfg.max_text_len
        # Forward ×3 (backward ≈ 2 forwards); the decoder runs once per kept answer, counted at
        # the three answers a VQA v2 question has on average.
        forward = (
            flops.vision_flops(cfg) + flops.text_encoder_flops(cfg, lq) + flops.fusion_flops(cfg, lv, lq)
            + 3 * flops.decoder_flops(cfg, opts.answer_len, lv + lq, opts.answer_len - 1)
        )  # fmt: skip
        return 3 * forward

    def example_batch(self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
        from mplug.modeling import random_captions

        cfg, opts = self.model_config, self.job.vqa
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=gen)
        q_ids, q_mask = random_captions(cfg, batch_size, cfg.max_text_len, gen)
        a_ids, a_mask = random_captions(cfg, batch_size * opts.max_answers, opts.answer_len, gen)
        weights = torch.rand(batch_size, opts.max_answers, generator=gen)
        weights[:, 3:] = 0.0  # three answers per question, as VQA v2 has on average
        out = {
            "image": images, "question_ids": q_ids, "question_mask": q_mask,
            "answer_ids": a_ids.view(batch_size, opts.max_answers, -1),
            "answer_mask": a_mask.view(batch_size, opts.max_answers, -1), "answer_weights": weights,
        }  # fmt: skip
        return {k: v.to(device) for k, v in out.items()}

    def loss(self, model: nn.Module, batch: dict, index: int, prepared: Any, ctx: StepContext):
        out = model(
            images=batch["image"], question_ids=batch["question_ids"], question_mask=batch["question_mask"],
            answer_ids=batch["answer_ids"], answer_mask=batch["answer_mask"], answer_weights=batch["answer_weights"],
        )  # fmt: skip
        return out.loss, {"loss": out.loss}, out

    # ---- evaluation ---------------------------------------------------------------------------
    def _tokenizer(self):
        from mplug.tokenizer import load_tokenizer

        return load_tokenizer()

    def _candidates(self, device: torch.device) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The answer list to rank (`vqa.answer_list`), tokenised once."""
        if getattr(self, "_answer_list", None) is None:
            import json

            from pipelines import storage

            answers = json.loads(storage.read_text(self.job.vqa.answer_list))
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(
                    f"vqa.answer_list {self.job.vqa.answer_list!r} must hold a JSON list of strings"
                )
            tokens = self._tokenizer()(answers, padding="longest", truncation=True,
                                       max_length=self.job.vqa.answer_len, return_tensors="pt")  # fmt: skip
            self._answer_list = (answers, tokens["input_ids"], tokens["attention_mask"])
        answers, ids, mask = self._answer_list
        return answers, ids.to(device), mask.to(device)

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        opts = self.job.vqa
        args = (batch["image"], batch["question_ids"], batch["question_mask"])
        if opts.answer_list:
            answers, ids, mask = self._candidates(batch["image"].device)
            top, _ = model.rank_answers(*args, ids, mask, k=opts.k_test)
            predicted = [answers[int(i)] for i in top[:, 0]]
        else:
            generated = model.generate(*args, num_beams=opts.num_beams, max_length=opts.max_length,
                                       min_length=opts.min_length)  # fmt: skip
            predicted = decode(self._tokenizer(), generated)
        return [
            {"question_id": str(k), "question": q, "answer": a, "answers": list(refs)}
            for k, q, a, refs in zip(batch["key"], batch["question"], predicted, batch["raw_answers"])
        ]

    def submission(self, predictions: list[dict]) -> list[dict]:
        """VQA's evaluation server: `[{question_id, answer}]`, integer ids."""
        return [{"question_id": official_id(p["question_id"]), "answer": p["answer"]} for p in predictions]

    def inference_rows(self, predictions: list[dict]) -> list[dict]:
        return [
            {"key": p["question_id"], "question": p["question"], "prediction": p["answer"]}
            for p in predictions
        ]

    def score(self, predictions: list[dict], setup=None, rescored=None) -> dict[str, float]:
        from mplug.metrics import vqa_accuracy

        scored = [p for p in predictions if p["answers"]]
        if not scored:
            raise ValueError(
                "no evaluation question has human answers: VQA accuracy needs them (a test split?)"
            )
        result = vqa_accuracy({p["question_id"]: p["answer"] for p in scored},
                              {p["question_id"]: p["answers"] for p in scored})  # fmt: skip
        return {"vqa_accuracy": float(result["overall"]), "num_questions": float(len(scored))}

    def baseline(self, predictions: list[dict], setup=None) -> dict[str, float]:
        """Always answering the most common answer of the question's type (its first two
        words), counted on these questions themselves: a prior that looks at no image."""
        from mplug.metrics import vqa_accuracy

        scored = [p for p in predictions if p["answers"]]
        by_type: dict[str, Counter] = {}
        for p in scored:
            by_type.setdefault(question_type(p["question"]), Counter()).update(p["answers"])
        guess = {p["question_id"]: by_type[question_type(p["question"])].most_common(1)[0][0] for p in scored}
        result = vqa_accuracy(guess, {p["question_id"]: p["answers"] for p in scored})
        return {"vqa_accuracy": float(result["overall"])}
