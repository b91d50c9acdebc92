"""Image↔text retrieval from per-row embeddings: rows of one image (same `image_id`) are one
image with several captions, as in COCO and Flickr30K (five each).

`itc_recall` scores ITC similarity (zero-shot retrieval after pretraining, or the first stage of
the retrieval task); `evaluate_retrieval` runs the embedding as a Ray Data job over processed
shards (the model held in actors) and returns the recall beside its chance level.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from mplug.metrics import retrieval_chance, retrieval_recall
from pipelines import storage

DIRECTIONS = (("i2t", "image→text"), ("t2i", "text→image"))


def load_pretrained(model_uri: str, model_class: type | None = None):
    """`from_pretrained` of a model folder in any storage (default: the pretraining model)."""
    if model_class is None:
        from mplug import MPlugForPretraining as model_class
    local = storage.download_dir(model_uri, tempfile.mkdtemp(prefix="mplug-model-"))
    return model_class.from_pretrained(local)


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


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: str(r["key"]))  # the same order whatever the block order


def itc_recall(rows: list[dict]) -> dict[str, float]:
    """R@1/5/10 both ways and their means (percent) from rows holding `key`, `image_id`,
    `image_emb`, `text_emb`, with the chance level of each beside it (`chance_*`)."""
    if not rows:
        raise ValueError("no rows to evaluate retrieval on")
    rows = _sorted(rows)
    image_rows, text_group = image_text_groups(rows)
    image_emb = torch.from_numpy(np.stack([rows[i]["image_emb"] for i in image_rows])).float()
    text_emb = torch.from_numpy(np.stack([r["text_emb"] for r in rows])).float()
    images = torch.arange(len(image_rows))
    out = dict(retrieval_recall(image_emb @ text_emb.T, images, text_group))
    _add_means(out)
    out.update(chance_recall(rows))
    out["num_images"] = float(len(image_rows))
    out["num_texts"] = float(len(rows))
    return out


def chance_recall(rows: list[dict]) -> dict[str, float]:
    """Expected recall of a random ranking on the same images and texts (`chance_*`)."""
    image_rows, text_group = image_text_groups(_sorted(rows))
    chance = dict(retrieval_chance(torch.arange(len(image_rows)), text_group))
    _add_means(chance)
    return {f"chance_{k}": v for k, v in chance.items()}


def _add_means(metrics: dict[str, float]) -> None:
    """`i2t_r_mean`, `t2i_r_mean`, `r_mean` (ALBEF's txt_r_mean / img_r_mean / r_mean)."""
    for d, _ in DIRECTIONS:
        metrics.setdefault(f"{d}_r_mean", sum(metrics[f"{d}_r{k}"] for k in (1, 5, 10)) / 3)
    metrics.setdefault("r_mean", (metrics["i2t_r_mean"] + metrics["t2i_r_mean"]) / 2)


class EmbedPairs:
    """Ray Data UDF: (image, caption tokens) rows → L2-normalised ITC embeddings."""

    def __init__(self, model_uri: str):
        self.model = load_pretrained(model_uri).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.as_tensor(batch["image"], dtype=torch.float32)
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long)
        return {
            "key": batch["key"],
            "image_id": batch["image_id"],
            "image_emb": self.model.encode_image_features(images).float().numpy(),
            "text_emb": self.model.encode_text_features(ids, mask).float().numpy(),
        }


def evaluate_retrieval(
    model_uri: str,
    data_uris: list[str],
    *,
    batch_size: int = 64,
    num_actors: int = 1,
    limit: int | None = None,
) -> dict[str, float]:
    """Zero-shot R@1/5/10 (percent) both ways on processed shards, chance beside each."""
    import ray

    from pipelines.data.stream import training_dataset

    cfg = json.loads(storage.read_text(storage.join(model_uri, "config.json")))
    ds = training_dataset(
        data_uris,
        image_size=cfg["vision_config"]["image_size"],
        max_text_len=cfg["max_text_len"],
        train=False,
    )
    if limit:
        ds = ds.limit(limit)
    emb = ds.map_batches(
        EmbedPairs,
        fn_constructor_kwargs={"model_uri": model_uri},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=1,
    )
    return itc_recall(emb.take_all())


def format_retrieval(metrics: dict[str, float]) -> str:
    lines = [f"  {int(metrics['num_images'])} images, {int(metrics['num_texts'])} texts"]
    lines.append("  direction   R@1    R@5    R@10   | chance R@1   R@5    R@10")
    for d, label in DIRECTIONS:
        got = "  ".join(f"{metrics[f'{d}_r{k}']:5.1f}" for k in (1, 5, 10))
        ch = "  ".join(f"{metrics[f'chance_{d}_r{k}']:5.1f}" for k in (1, 5, 10))
        lines.append(f"  {label:<10} {got}  |        {ch}")
    return "\n".join(lines)


FLOOR_SCORE = -100.0  # a pair outside a query's top k keeps this score (as the official eval)


@dataclass(frozen=True)
class Candidates:
    """Each query's top k by ITC similarity: top_texts (Ni, k) per image, top_images (Nt, k) per
    text, and `pairs`, every (image, text) index pair to score once (both directions share)."""

    top_texts: torch.Tensor
    top_images: torch.Tensor
    pairs: list[tuple[int, int]]


def candidates(sim_i2t: torch.Tensor, k: int) -> Candidates:
    ni, nt = sim_i2t.shape
    top_texts = sim_i2t.topk(min(k, nt), dim=1).indices
    top_images = sim_i2t.t().topk(min(k, ni), dim=1).indices
    pairs = {(i, int(t)) for i in range(ni) for t in top_texts[i]}
    pairs |= {(int(i), t) for t in range(nt) for i in top_images[t]}
    return Candidates(top_texts, top_images, sorted(pairs))


def score_matrices(
    cands: Candidates, score: dict[tuple[int, int], float], sim_i2t: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (Ni, Nt) image→text and (Nt, Ni) text→image matrices: the ITM score where a pair was
    re-scored (plus its ITC similarity when `sim_i2t` is given), `FLOOR_SCORE` elsewhere."""
    ni, nt = cands.top_texts.shape[0], cands.top_images.shape[0]
    i2t = torch.full((ni, nt), FLOOR_SCORE)
    t2i = torch.full((nt, ni), FLOOR_SCORE)

    def value(i: int, t: int) -> float:
        return score[(i, t)] + (float(sim_i2t[i, t]) if sim_i2t is not None else 0.0)

    for i in range(ni):
        for t in cands.top_texts[i].tolist():
            i2t[i, t] = value(i, t)
    for t in range(nt):
        for i in cands.top_images[t].tolist():
            t2i[t, i] = value(i, t)
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
    itc: dict[str, float], cands: Candidates, score: dict[tuple[int, int], float], sim_i2t: torch.Tensor,
    text_group: torch.Tensor,
) -> dict:  # fmt: skip
    """R@K re-ranked by the ITM score alone (the official mPLUG evaluation: the primary `r_mean`),
    by ITM + ITC similarity as `itm_itc_*` (ALBEF's and BLIP's evaluation), ITC's as `itc_*`,
    chance beside."""
    out = {f"itc_{name}": value for name, value in itc.items() if not name.startswith(("chance_", "num_"))}
    out.update(_directional_recall(*score_matrices(cands, score), text_group))
    both = _directional_recall(*score_matrices(cands, score, sim_i2t), text_group)
    out.update({f"itm_itc_{name}": value for name, value in both.items()})
    out.update({name: value for name, value in itc.items() if name.startswith(("chance_", "num_"))})
    return out


def reranked_recall(model, rows: list[dict], k: int, batch_size: int = 64) -> dict[str, float]:
    """In memory (the evaluation during training): rows carry `image_emb`, `text_emb`, `image`
    (the transformed image), `input_ids`, `attention_mask`; ITC top k re-scored by ITM."""
    itc = itc_recall(rows)
    rows = _sorted(rows)
    image_rows, text_group = image_text_groups(rows)
    device = next(model.parameters()).device
    image_emb = torch.from_numpy(np.stack([rows[i]["image_emb"] for i in image_rows])).float()
    text_emb = torch.from_numpy(np.stack([r["text_emb"] for r in rows])).float()
    images = torch.from_numpy(np.stack([rows[i]["image"] for i in image_rows])).float()
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows])).long().to(device)
    mask = torch.from_numpy(np.stack([r["attention_mask"] for r in rows])).long().to(device)
    visual = torch.cat([model.encode_image(images[s : s + batch_size].to(device))
                        for s in range(0, len(images), batch_size)])  # fmt: skip
    text = torch.cat([model.encode_text(ids[s : s + batch_size], mask[s : s + batch_size])
                      for s in range(0, len(ids), batch_size)])  # fmt: skip
    sim = image_emb @ text_emb.T
    cands = candidates(sim, k)
    index = torch.tensor(cands.pairs, dtype=torch.long)
    scores: list[float] = []
    for s in range(0, len(index), batch_size):
        ii, tt = index[s : s + batch_size, 0].to(device), index[s : s + batch_size, 1].to(device)
        scores.extend(model.itm_logits(visual[ii], text[tt], mask[tt])[:, 1].float().cpu().tolist())
    return reranked_metrics(itc, cands, dict(zip(cands.pairs, scores)), sim, text_group)


class ITMScorer:
    """Ray Data actor of the distributed re-ranking: for each image row, the ITM logits of the
    image with its candidate texts (the visual tokens computed once per image)."""

    def __init__(self, task_name: str, model_uri: str, text_ids: np.ndarray, text_mask: np.ndarray,
                 texts_by_image: dict[str, list[int]], overrides: dict) -> None:  # fmt: skip
        from pipelines.eval.evaluate import _device, build_eval_task, load_model

        self.device = _device()
        self.model = load_model(build_eval_task(task_name, model_uri, overrides), model_uri, self.device)
        self.ids = torch.from_numpy(text_ids).long()
        self.mask = torch.from_numpy(text_mask).long()
        self.texts_by_image = texts_by_image

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, texts, scores = [], [], []
        visual = self.model.encode_image(torch.as_tensor(batch["image"]).float().to(self.device))
        for v, image_id in zip(visual, batch["image_id"]):
            todo = self.texts_by_image.get(str(image_id), [])
            for s in range(0, len(todo), 64):
                chunk = torch.tensor(todo[s : s + 64])
                ids, mask = self.ids[chunk].to(self.device), self.mask[chunk].to(self.device)
                logits = self.model.itm_logits(
                    v.expand(len(chunk), -1, -1), self.model.encode_text(ids, mask), mask
                )
                images.extend([str(image_id)] * len(chunk))
                texts.extend(chunk.tolist())
                scores.extend(logits[:, 1].float().cpu().tolist())
        return {"image_id": np.asarray(images, dtype=object), "text": np.asarray(texts, dtype=np.int64),
                "score": np.asarray(scores, dtype=np.float32)}  # fmt: skip


def distributed_reranked_recall(task, model_uri: str, data_uris: list[str], rows: list[dict], resources,
                                batch_size: int = 32) -> dict[str, float]:  # fmt: skip
    """`mplug evaluate --task retrieval`: ITC from the embedded rows (phase 1, done by the
    caller over Ray Data), then the ITM re-scoring of every candidate pair as a second Ray Data
    pass over the distinct images, each actor scoring an image against its candidate texts."""
    import ray

    from pipelines.data.stream import image_row_bytes, task_dataset

    itc = itc_recall(rows)
    rows = _sorted(rows)
    image_rows, text_group = image_text_groups(rows)
    image_ids = [str(rows[i]["image_id"]) for i in image_rows]
    image_emb = torch.from_numpy(np.stack([rows[i]["image_emb"] for i in image_rows])).float()
    text_emb = torch.from_numpy(np.stack([r["text_emb"] for r in rows])).float()
    sim = image_emb @ text_emb.T
    cands = candidates(sim, task.job.retrieval.k_test)
    texts_by_image: dict[str, list[int]] = {}
    for i, t in cands.pairs:
        texts_by_image.setdefault(image_ids[i], []).append(t)
    cfg = task.model_config
    first_rows = frozenset(str(rows[i]["key"]) for i in image_rows)
    images = task_dataset(data_uris, task.transform(train=False), columns=task.columns, train=False,
                          batch_size=batch_size, keep_keys=first_rows,
                          row_bytes=image_row_bytes(cfg.image_size, cfg.max_text_len))  # fmt: skip
    scored = images.map_batches(
        ITMScorer,
        fn_constructor_kwargs={
            "task_name": task.name, "model_uri": model_uri,
            "text_ids": np.stack([r["input_ids"] for r in rows]), "text_mask": np.stack([r["attention_mask"] for r in rows]),
            "texts_by_image": texts_by_image, "overrides": {},
        },
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_gpus=resources.gpus_per_actor, num_cpus=1,
    ).take_all()  # fmt: skip
    number = {image: i for i, image in enumerate(image_ids)}
    score = {(number[r["image_id"]], int(r["text"])): float(r["score"]) for r in scored}
    missing = [p for p in cands.pairs if p not in score]
    if missing:
        raise RuntimeError(f"{len(missing)} candidate pairs were not re-scored, e.g. {missing[:3]}")
    return reranked_metrics(itc, cands, score, sim, text_group)
