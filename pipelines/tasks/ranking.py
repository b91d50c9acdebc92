"""Image↔text ranking from per-row predictions: rows of one image (same `image_id`) are one
image with several captions, as in COCO and Flickr30K (five each).

`itc_recall` scores ITC similarity (zero-shot retrieval after pretraining, or the first stage of
the retrieval task). The retrieval task's second stage re-scores each query's ITC top k with ITM:
`candidates` picks the pairs, `reranked_metrics` ranks by the new scores, both vectorised (the
official evaluation's 5k × 25k matrices at COCO size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mplug.metrics import retrieval_chance, retrieval_recall

DIRECTIONS = (("i2t", "image→text"), ("t2i", "text→image"))
FLOOR_SCORE = -100.0  # a pair outside a query's top k keeps this score (as the official eval)


def sorted_rows(rows: list[dict]) -> list[dict]:
    """Rows by key: the same order whatever order workers produced them in."""
    return sorted(rows, key=lambda r: str(r["key"]))


def image_text_groups(rows: list[dict]) -> tuple[list[int], torch.Tensor]:
    """(row index of each distinct image, in first-seen order; each row's image number)."""
    number: dict[str, int] = {}
    image_rows: list[int] = []
    text_group: list[int] = []
    for i, row in enumerate(rows):
        image = str(row["image_id"])
        if image not in number:
            number[image] = len(image_rows)
            image_rows.append(i)
        text_group.append(number[image])
    return image_rows, torch.tensor(text_group)


@dataclass(frozen=True)
class Ranking:
    """Sorted rows, their distinct images and the ITC similarity (Ni, Nt) between them."""

    rows: list[dict]
    image_rows: list[int]  # the row of each image's first caption
    text_group: torch.Tensor  # (Nt,) image number of each text
    sim: torch.Tensor  # (Ni, Nt) float32

    @classmethod
    def of(cls, rows: list[dict]) -> Ranking:
        if not rows:
            raise ValueError("no rows to evaluate retrieval on")
        rows = sorted_rows(rows)
        image_rows, text_group = image_text_groups(rows)
        image_emb = torch.from_numpy(np.stack([rows[i]["image_emb"] for i in image_rows])).float()
        text_emb = torch.from_numpy(np.stack([r["text_emb"] for r in rows])).float()
        return cls(rows, image_rows, text_group, image_emb @ text_emb.T)

    @property
    def image_ids(self) -> list[str]:
        return [str(self.rows[i]["image_id"]) for i in self.image_rows]


def itc_recall(rows: list[dict]) -> dict[str, float]:
    """R@1/5/10 both ways and their means (percent) from rows holding `key`, `image_id`,
    `image_emb`, `text_emb`, with the chance level of each beside it (`chance_*`)."""
    ranking = Ranking.of(rows)
    out = dict(retrieval_recall(ranking.sim, torch.arange(len(ranking.image_rows)), ranking.text_group))
    _add_means(out)
    out.update(chance_recall(ranking.rows))
    out["num_images"] = float(len(ranking.image_rows))
    out["num_texts"] = float(len(ranking.rows))
    return out


def chance_recall(rows: list[dict]) -> dict[str, float]:
    """Expected recall of a random ranking on the same images and texts (`chance_*`)."""
    image_rows, text_group = image_text_groups(sorted_rows(rows))
    chance = dict(retrieval_chance(torch.arange(len(image_rows)), text_group))
    _add_means(chance)
    return {f"chance_{k}": v for k, v in chance.items()}


def _add_means(metrics: dict[str, float]) -> None:
    """`i2t_r_mean`, `t2i_r_mean`, `r_mean` (ALBEF's txt_r_mean / img_r_mean / r_mean)."""
    for d, _ in DIRECTIONS:
        metrics.setdefault(f"{d}_r_mean", sum(metrics[f"{d}_r{k}"] for k in (1, 5, 10)) / 3)
    metrics.setdefault("r_mean", (metrics["i2t_r_mean"] + metrics["t2i_r_mean"]) / 2)


@dataclass(frozen=True)
class Candidates:
    """Each query's top k by ITC similarity: top_texts (Ni, k) per image, top_images (Nt, k) per
    text, and `pairs` (P, 2), every (image, text) index pair to score once (both directions share)."""

    top_texts: torch.Tensor
    top_images: torch.Tensor
    pairs: torch.Tensor

    def texts_by_image(self) -> dict[int, np.ndarray]:
        """The candidate texts of each image that has any, as index arrays."""
        order = self.pairs[:, 0].argsort(stable=True)
        images, counts = self.pairs[order, 0].unique_consecutive(return_counts=True)
        texts = self.pairs[order, 1].numpy()
        bounds = np.concatenate([[0], counts.cumsum(0).numpy()])
        return {int(i): texts[bounds[n] : bounds[n + 1]] for n, i in enumerate(images.tolist())}


def candidates(sim_i2t: torch.Tensor, k: int) -> Candidates:
    ni, nt = sim_i2t.shape
    top_texts = sim_i2t.topk(min(k, nt), dim=1).indices  # (Ni, k)
    top_images = sim_i2t.t().topk(min(k, ni), dim=1).indices  # (Nt, k)
    forward = torch.stack([torch.arange(ni)[:, None].expand_as(top_texts), top_texts], -1).reshape(-1, 2)
    backward = torch.stack([top_images, torch.arange(nt)[:, None].expand_as(top_images)], -1).reshape(-1, 2)
    pairs = torch.unique(torch.cat([forward, backward]), dim=0)  # sorted by image, then text
    return Candidates(top_texts, top_images, pairs)


def score_matrices(
    cands: Candidates, pairs: torch.Tensor, scores: torch.Tensor, sim_i2t: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (Ni, Nt) image→text and (Nt, Ni) text→image matrices: the score of each re-scored
    (image, text) pair in `pairs` (P, 2) / `scores` (P,) (plus its ITC similarity when `sim_i2t`
    is given) for the candidates of each query, `FLOOR_SCORE` elsewhere."""
    ni, nt = cands.top_texts.shape[0], cands.top_images.shape[0]
    scored = torch.full((ni, nt), float("nan"))
    scored[pairs[:, 0], pairs[:, 1]] = scores.float()
    if sim_i2t is not None:
        scored = scored + sim_i2t.float()
    rows_i = torch.arange(ni)[:, None].expand_as(cands.top_texts)
    i2t = torch.full((ni, nt), FLOOR_SCORE)
    i2t[rows_i, cands.top_texts] = scored[rows_i, cands.top_texts]
    rows_t = torch.arange(nt)[:, None].expand_as(cands.top_images)
    t2i = torch.full((nt, ni), FLOOR_SCORE)
    t2i[rows_t, cands.top_images] = scored[cands.top_images, rows_t]
    if torch.isnan(i2t).any() or torch.isnan(t2i).any():
        missing = int(torch.isnan(i2t).sum() + torch.isnan(t2i).sum())
        raise ValueError(f"{missing} candidate pairs were not re-scored")
    return i2t, t2i


def _directional_recall(i2t: torch.Tensor, t2i: torch.Tensor, text_group: torch.Tensor) -> dict[str, float]:
    images = torch.arange(i2t.shape[0])
    forward = retrieval_recall(i2t, images, text_group)
    backward = retrieval_recall(t2i.T, images, text_group)  # its t2i direction ranks t2i rows
    out = {k: v for k, v in forward.items() if k.startswith("i2t")}
    out.update({k: v for k, v in backward.items() if k.startswith("t2i")})
    _add_means(out)
    return out


def reranked_metrics(
    itc: dict[str, float], cands: Candidates, pairs: torch.Tensor, scores: torch.Tensor, sim_i2t: torch.Tensor,
    text_group: torch.Tensor,
) -> dict[str, float]:  # fmt: skip
    """R@K re-ranked by the ITM score alone (the official mPLUG evaluation: the primary `r_mean`),
    by ITM + ITC similarity as `itm_itc_*` (ALBEF's and BLIP's evaluation), ITC's as `itc_*`,
    chance beside."""
    out = {f"itc_{name}": value for name, value in itc.items() if not name.startswith(("chance_", "num_"))}
    out.update(_directional_recall(*score_matrices(cands, pairs, scores), text_group))
    both = _directional_recall(*score_matrices(cands, pairs, scores, sim_i2t), text_group)
    out.update({f"itm_itc_{name}": value for name, value in both.items()})
    out.update({name: value for name, value in itc.items() if name.startswith(("chance_", "num_"))})
    return out


def format_retrieval(metrics: dict[str, float]) -> str:
    lines = [f"  {int(metrics['num_images'])} images, {int(metrics['num_texts'])} texts"]
    lines.append("  direction   R@1    R@5    R@10   | chance R@1   R@5    R@10")
    for d, label in DIRECTIONS:
        got = "  ".join(f"{metrics[f'{d}_r{k}']:5.1f}" for k in (1, 5, 10))
        ch = "  ".join(f"{metrics[f'chance_{d}_r{k}']:5.1f}" for k in (1, 5, 10))
        lines.append(f"  {label:<10} {got}  |        {ch}")
    return "\n".join(lines)
