"""Zero-shot image↔text retrieval of a pretrained model over processed shards (the demo's
check after pretraining): ITC embeddings computed by Ray Data actors, recall beside chance
(the ranking itself is `pipelines/tasks/ranking.py`, shared with the tasks)."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import torch

from pipelines import storage
from pipelines.tasks.ranking import format_retrieval, itc_recall

__all__ = ["EmbedPairs", "evaluate_retrieval", "format_retrieval", "load_pretrained"]


def load_pretrained(model_uri: str, model_class: type | None = None):
    """`from_pretrained` of a model folder in any storage (default: the pretraining model)."""
    if model_class is None:
        from mplug import MPlugForPretraining as model_class
    local = storage.download_dir(model_uri, tempfile.mkdtemp(prefix="mplug-model-"))
    return model_class.from_pretrained(local)


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
