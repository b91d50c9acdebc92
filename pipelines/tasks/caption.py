"""Image captioning: cross-entropy, then (with `caption.scst`) self-critical sequence training
with CIDEr-D rewards; scored by BLEU-1..4, METEOR, ROUGE-L and CIDEr as pycocoevalcap computes
them, against every reference of an image."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from pipelines.data.transforms import CaptionTransform, Transform, swap_left_right
from pipelines.tasks.base import EvalSetup, StepContext, Task
from pipelines.tasks.vqa import decode, official_id
from pipelines.train.parallel import gathered


def references_by_image(data_uris: list[str]) -> dict[str, list[str]]:
    """Every caption of every image (rows grouped by `image_id`, else each row its own image)
    of processed shards, read on the caller (text columns only)."""
    from pipelines.data.shards import read_columns

    table = read_columns(data_uris, ("key", "image_id", "caption"))
    refs: dict[str, list[str]] = {}
    for key, image_id, caption in zip(*(table.column(c).to_pylist() for c in ("key", "image_id", "caption"))):
        if caption:
            refs.setdefault(str(image_id if image_id is not None else key), []).append(caption)
    return refs


def first_row_per_image(data_uris: list[str]) -> frozenset[str]:
    """The smallest key of each image: captioning predicts once per image, not per reference."""
    from pipelines.data.shards import read_columns

    table = read_columns(data_uris, ("key", "image_id"))
    first: dict[str, str] = {}
    for key, image_id in zip(table.column("key").to_pylist(), table.column("image_id").to_pylist()):
        image = str(image_id if image_id is not None else key)
        if image not in first or key < first[image]:
            first[image] = key
    return frozenset(first.values())


def sequence_with_start(
    cls_id: int, pad_id: int, sep_id: int, generated: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated ids (N, T) without [CLS] -> `[CLS] ids` and a mask covering up to the first
    [SEP] (included)."""
    start = torch.full((generated.shape[0], 1), cls_id, dtype=generated.dtype, device=generated.device)
    ids = torch.cat([start, generated], dim=1)
    ended = (ids == sep_id).long().cumsum(1)  # 1 from the first [SEP] on
    mask = ((ended == 0) | ((ended == 1) & (ids == sep_id))).long()
    mask &= (ids != pad_id).long()
    mask[:, 0] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def strip_prompt(captions: list[str], prompt: str) -> list[str]:
    """The captions without `caption.prompt`, which the model writes first: it is given, not
    predicted, so it is neither scored nor rewarded."""
    prompt = prompt.strip()
    if not prompt:
        return captions
    return [c[len(prompt) :].strip() if c.startswith(prompt) else c for c in captions]


class CaptionTask(Task):
    name = "caption"
    primary_metric = "CIDEr"
    mode = "max"
    columns = ("key", "image", "caption", "image_id")
    batch_inference = True

    def transform(self, train: bool) -> Transform:
        cfg, job, opts = self.model_config, self.job, self.job.caption
        return Transform.of(
            CaptionTransform, image_size=cfg.image_size, caption_len=opts.caption_len, train=train,
            seed=job.run.seed, crop_min_scale=0.5 if job.data.crop_min_scale is None else job.data.crop_min_scale,
            prompt=opts.prompt, include_ids=(not train) or opts.scst,
        )  # fmt: skip

    def model_class(self) -> type:
        from mplug.caption import MPlugForCaptioning

        return MPlugForCaptioning

    def build_model(self) -> nn.Module:
        return self.model_class()(self.model_config)

    def flops_per_sample(self) -> float:
        from mplug import flops

        cfg, opts = self.model_config, self.job.caption
        lv, lt = cfg.num_visual_tokens, opts.caption_len
        if not opts.scst:
            return 3 * (flops.vision_flops(cfg) + flops.decoder_flops(cfg, lt, lv, lt - 1))
        # SCST: beam search (≈ beams × max_length decoder token steps, forward only) and a
        # trained teacher-forced pass over each sampled caption.
        search = opts.scst_beams * opts.max_length * flops.decoder_flops(cfg, 1, lv, 1)
        return (
            flops.vision_flops(cfg) * 4
            + search
            + 3 * opts.scst_beams * flops.decoder_flops(cfg, lt, lv, lt - 1)
        )

    def example_batch(self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
        from mplug.modeling import random_captions

        cfg = self.model_config
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=gen)
        ids, mask = random_captions(cfg, batch_size, self.job.caption.caption_len, gen)
        out = {"image": images.to(device), "caption_ids": ids.to(device), "caption_mask": mask.to(device)}
        if self.job.caption.scst:
            out["image_id"] = [f"img{i % max(1, batch_size // 2)}" for i in range(batch_size)]
        return out

    # ---- step ---------------------------------------------------------------------------
    def _scorer(self):
        """CIDEr-D with document frequencies from the training references (built once)."""
        if getattr(self, "_cider", None) is None:
            from mplug.cider import CiderD

            self._train_refs = references_by_image(self.job.data.uris)
            self._cider = CiderD(list(self._train_refs.values()))
        return self._cider, self._train_refs

    def prepare_step(self, model: nn.Module, micro_batches: list[dict], ctx: StepContext) -> Any:
        """SCST: the sampled captions and their rewards, per micro-batch (no grad)."""
        if not self.job.caption.scst:
            return None
        opts, cfg = self.job.caption, self.model_config
        scorer, refs = self._scorer()
        tokenizer = self._tokenizer()
        samples = []
        # Beam search ends at another step on each rank: gathered, no forward is a collective.
        with torch.no_grad(), gathered(model) as inner:
            was_training = inner.training
            inner.eval()  # sample as evaluation decodes: no dropout
            for batch in micro_batches:
                generated = inner.generate(batch["image"], num_beams=opts.scst_beams, max_length=opts.max_length,
                                           min_length=opts.min_length, num_return_sequences=opts.scst_beams)  # fmt: skip
                texts = strip_prompt(decode(tokenizer, generated), opts.prompt)
                if "flipped" in batch:
                    # The image was mirrored and its references describe it unmirrored: a caption
                    # right about the mirror says "left" for "right", so score it mirrored back.
                    flips = [bool(f) for f in batch["flipped"] for _ in range(opts.scst_beams)]
                    texts = [swap_left_right(t) if f else t for t, f in zip(texts, flips)]
                image_refs = [refs.get(str(i), []) for i in batch["image_id"] for _ in range(opts.scst_beams)]
                rewards = torch.as_tensor(scorer.score(texts, image_refs), dtype=torch.float32)
                ids, mask = sequence_with_start(
                    cfg.cls_token_id, cfg.pad_token_id_text, cfg.sep_token_id, generated
                )
                samples.append((ids, mask, rewards.view(-1, opts.scst_beams).to(ids.device)))
            inner.train(was_training)
        return samples

    def loss(self, model: nn.Module, batch: dict, index: int, prepared: Any, ctx: StepContext):
        if prepared is None:
            out = model(
                images=batch["image"], caption_ids=batch["caption_ids"], caption_mask=batch["caption_mask"]
            )
            return out.loss, {"loss": out.loss}, out
        ids, mask, rewards = prepared[index]
        out = model(images=batch["image"], caption_ids=ids, caption_mask=mask, rewards=rewards)
        return out.loss, {"loss": out.loss, "reward": rewards.mean()}, out

    # ---- evaluation ---------------------------------------------------------------------------
    def _tokenizer(self):
        from mplug.tokenizer import load_tokenizer

        return load_tokenizer()

    def eval_setup(self, data_uris: list[str]) -> EvalSetup:
        return EvalSetup(keys=first_row_per_image(data_uris), references=references_by_image(data_uris))

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        opts = self.job.caption
        generated = model.generate(batch["image"], num_beams=opts.num_beams, max_length=opts.max_length,
                                   min_length=opts.min_length)  # fmt: skip
        captions = strip_prompt(decode(self._tokenizer(), generated), opts.prompt)
        return [{"image_id": str(i), "caption": c} for i, c in zip(batch["image_id"], captions)]

    def submission(self, predictions: list[dict]) -> list[dict]:
        """COCO's caption evaluation server: `[{image_id, caption}]`, integer ids."""
        return [{"image_id": official_id(p["image_id"]), "caption": p["caption"]} for p in predictions]

    def inference_rows(self, predictions: list[dict]) -> list[dict]:
        return [{"key": p["image_id"], "prediction": p["caption"]} for p in predictions]

    def score(
        self, predictions: list[dict], setup: EvalSetup | None = None, rescored=None
    ) -> dict[str, float]:
        from mplug.metrics import caption_metrics

        refs = self._references(predictions, setup)
        preds = {p["image_id"]: p["caption"] for p in predictions}
        use_meteor = self.job.caption.meteor_during_training or (setup is not None and setup.thorough)
        result = caption_metrics(preds, {i: refs[i] for i in preds}, meteor=use_meteor)
        return {k: float(v) for k, v in result.items() if isinstance(v, int | float)}

    @staticmethod
    def _references(predictions: list[dict], setup: EvalSetup | None) -> dict[str, list[str]]:
        if setup is None or not setup.references:
            raise ValueError("captioning needs the references of the evaluated images (EvalSetup.references)")
        missing = [p["image_id"] for p in predictions if p["image_id"] not in setup.references]
        if missing:
            raise ValueError(f"{len(missing)} predicted images have no references, e.g. {missing[:3]}")
        return setup.references

    def baseline(self, predictions: list[dict], setup: EvalSetup | None = None) -> dict[str, float]:
        """The best constant caption: the reference sentence that, given to every image, scores
        the highest CIDEr (searched among the 200 most frequent references)."""
        from mplug.cider import CiderD
        from mplug.metrics import caption_metrics

        refs = self._references(predictions, setup)
        images = [p["image_id"] for p in predictions]
        pool = [c for c, _ in Counter(c for i in images for c in refs[i]).most_common(200)]
        # Search with the fast CIDEr-D on the evaluated references (what pycocoevalcap's CIDEr is),
        # then score the winner with the full metric.
        scorer = CiderD([refs[i] for i in images])
        sample = images[:: max(1, len(images) // 1000)]  # at most ~1,000 images for the search
        best, best_cider = None, -1.0
        for candidate in pool:
            cider = float(scorer.score([candidate] * len(sample), [refs[i] for i in sample]).mean())
            if cider > best_cider:
                best, best_cider = candidate, cider
        full = caption_metrics({i: best for i in images}, {i: refs[i] for i in images}, meteor=False)
        return {"CIDEr": float(full["CIDEr"]), "constant_caption": best}
