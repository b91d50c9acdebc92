"""Zero-shot image↔text retrieval (ITC similarity, R@1/5/10 both ways) as a Ray Data job.

Embedding runs in an actor pool (each actor loads the model once); only the small embedding
matrices come back to the driver, where the similarity and the recall are computed.
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
import torch

from mplug.metrics import retrieval_chance, retrieval_recall
from pipelines import storage


def load_pretrained(model_uri: str):
    """`MPlugForPretraining.from_pretrained` on a folder in any storage."""
    from mplug import MPlugForPretraining

    local = storage.download_dir(model_uri, tempfile.mkdtemp(prefix="mplug-model-"))
    return MPlugForPretraining.from_pretrained(local)


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
            "input_ids": batch["input_ids"],
            "image_emb": self.model.encode_image_features(images).float().numpy(),
            "text_emb": self.model.encode_text_features(ids, mask).float().numpy(),
        }


def caption_groups(input_ids: np.ndarray) -> torch.Tensor:
    """Group id per row: rows with identical caption tokens share one."""
    seen: dict[bytes, int] = {}
    return torch.tensor(
        [seen.setdefault(row.tobytes(), len(seen)) for row in np.ascontiguousarray(input_ids)]
    )


def evaluate_retrieval(
    model_uri: str,
    data_uris: list[str],
    *,
    batch_size: int = 64,
    num_actors: int = 1,
    limit: int | None = None,
) -> dict[str, float]:
    """R@1/5/10 (percent) both ways on processed shards, with the chance level beside each."""
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
    rows = emb.take_all()
    if not rows:
        raise ValueError(f"no rows to evaluate in {data_uris}")
    rows.sort(key=lambda r: r["key"])  # deterministic order, whatever the block order
    image_emb = torch.from_numpy(np.stack([r["image_emb"] for r in rows]))
    text_emb = torch.from_numpy(np.stack([r["text_emb"] for r in rows]))
    groups = caption_groups(np.stack([r["input_ids"] for r in rows]))
    recall = retrieval_recall(image_emb @ text_emb.T, groups, groups)
    chance = retrieval_chance(groups, groups)
    out = dict(recall)
    out.update({f"chance_{k}": v for k, v in chance.items()})
    out["num_pairs"] = float(len(rows))
    out["num_distinct_captions"] = float(int(groups.max()) + 1)
    return out


def format_retrieval(metrics: dict[str, float]) -> str:
    lines = [
        f"  {int(metrics['num_pairs'])} image-text pairs ({int(metrics['num_distinct_captions'])} distinct captions)"
    ]
    lines.append("  direction   R@1    R@5    R@10   | chance R@1   R@5    R@10")
    for d, label in (("i2t", "image→text"), ("t2i", "text→image")):
        got = "  ".join(f"{metrics[f'{d}_r{k}']:5.1f}" for k in (1, 5, 10))
        ch = "  ".join(f"{metrics[f'chance_{d}_r{k}']:5.1f}" for k in (1, 5, 10))
        lines.append(f"  {label:<10} {got}  |        {ch}")
    return "\n".join(lines)
