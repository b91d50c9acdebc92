"""Image-text retrieval: ITC (captions of one image are positives) + ITM with hard negatives;
evaluated by R@1/5/10 both ways after ITM re-ranking of each query's ITC top k."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mplug.objectives import distill_alpha
from pipelines.data.transforms import RetrievalTransform, Transform
from pipelines.tasks.base import EvalSetup, SecondPass, StepContext
from pipelines.tasks.pretrain import PretrainTask, inputs
from pipelines.train.parallel import unsharded

# Candidate texts whose encodings a rank holds at once while re-scoring (1024 × 40 tokens × 768
# floats: 126 MB at base size).
TEXTS_PER_GROUP = 1024


def _groups_of_images(candidates: list[np.ndarray], budget: int) -> list[list[int]]:
    """Consecutive images grouped so that each group's candidate texts number at most `budget`
    (an image with more forms a group alone)."""
    groups: list[list[int]] = []
    seen: set[int] = set()
    for i, texts in enumerate(candidates):
        mine = set(texts.tolist())
        if not groups or len(seen | mine) > budget:
            groups.append([])
            seen = set()
        groups[-1].append(i)
        seen |= mine
    return groups


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
        alpha = distill_alpha(self.model_config.distill_alpha, ctx.epoch, ctx.step, ctx.steps_per_epoch)
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

    # ---- evaluation: ITC over every pair, then ITM over each query's top k ---------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        """Embeddings and caption tokens of each row (the tokens serve the ITM pass); no image:
        the second pass reads each image again, once."""
        rows = super().predict(model, batch)
        ids, mask = batch["input_ids"].cpu().numpy(), batch["attention_mask"].cpu().numpy()
        for row, i, m in zip(rows, ids, mask):
            row.update({"input_ids": i, "attention_mask": m})
        return rows

    def second_pass(self, predictions: list[dict], setup: EvalSetup | None = None) -> SecondPass:
        """ITM re-scores every (image, text) pair in a query's ITC top `retrieval.k_test`: each
        image's first row is read again, with its candidate texts' tokens."""
        from pipelines.tasks.ranking import Ranking, candidates

        ranking = Ranking.of(predictions)
        per_image = candidates(ranking.sim, self.job.retrieval.k_test).texts_by_image()
        image_ids = ranking.image_ids
        payload = {
            "texts_by_image": {image_ids[i]: texts for i, texts in per_image.items()},
            "text_ids": np.stack([r["input_ids"] for r in ranking.rows]),
            "text_mask": np.stack([r["attention_mask"] for r in ranking.rows]),
        }
        return SecondPass(frozenset(str(ranking.rows[i]["key"]) for i in ranking.image_rows), payload)

    @torch.no_grad()
    def predict_again(self, model: nn.Module, batch: dict, payload: dict, chunk: int = 64) -> list[dict]:
        """ITM logits of each image with its candidate texts: its visual tokens computed once,
        each candidate text encoded once for a group of images that share up to
        `TEXTS_PER_GROUP` candidates (their encodings are what a rank holds at a time)."""
        device = batch["image"].device
        visual = model.encode_image(batch["image"])
        empty = np.zeros(0, dtype=np.int64)
        candidates = [payload["texts_by_image"].get(str(i), empty) for i in batch["image_id"]]
        out = []
        for group in _groups_of_images(candidates, TEXTS_PER_GROUP):
            texts = np.unique(np.concatenate([candidates[i] for i in group]))
            ids = torch.from_numpy(payload["text_ids"][texts]).long().to(device)
            mask = torch.from_numpy(payload["text_mask"][texts]).long().to(device)
            encoded = torch.cat(
                [model.encode_text(ids[s : s + 256], mask[s : s + 256]) for s in range(0, len(texts), 256)]
            )
            for i in group:
                where = np.searchsorted(texts, candidates[i])  # rows of `encoded`
                for s in range(0, len(where), chunk):
                    rows = torch.from_numpy(where[s : s + chunk]).to(device)
                    logits = model.itm_logits(visual[i].expand(len(rows), -1, -1), encoded[rows], mask[rows])
                    out.extend({"image_id": str(batch["image_id"][i]), "text": int(t), "score": float(x)}
                               for t, x in zip(candidates[i][s : s + chunk], logits[:, 1].float().cpu().tolist()))  # fmt: skip
        return out

    def score(
        self, predictions: list[dict], setup: EvalSetup | None = None, rescored=None
    ) -> dict[str, float]:
        """ITC recall alone without a second pass; with one, re-ranked by ITM (the primary
        `r_mean`), by ITM + ITC (`itm_itc_*`), ITC's as `itc_*`, chance beside."""
        from pipelines.tasks.ranking import Ranking, candidates, itc_recall, reranked_metrics

        itc = itc_recall(predictions)
        if rescored is None:
            return itc
        ranking = Ranking.of(predictions)
        number = {image: i for i, image in enumerate(ranking.image_ids)}
        pairs = torch.tensor([(number[r["image_id"]], r["text"]) for r in rescored], dtype=torch.long).view(
            -1, 2
        )
        scores = torch.tensor([r["score"] for r in rescored], dtype=torch.float32)
        cands = candidates(ranking.sim, self.job.retrieval.k_test)
        return reranked_metrics(itc, cands, pairs, scores, ranking.sim, ranking.text_group)
