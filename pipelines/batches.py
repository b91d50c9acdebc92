"""Collated batches as training, evaluation and inference all handle them: rows of numpy columns
-> tensors and id lists, onto a device, a subset of rows. Everything above `pipelines/data`
imports these downward."""

from __future__ import annotations

import numpy as np
import torch


def collate_rows(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor | list]:
    """`iter_torch_batches(collate_fn=...)` for rows that mix tensors and ids: a tensor for
    every numeric column, a list for the others (ids, strings, lists of references)."""
    out: dict[str, torch.Tensor | list] = {}
    for name, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            out[name] = torch.as_tensor(value)
        else:
            out[name] = list(value)
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of a collated batch onto the device; ids stay host-side."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def select_rows(batch: dict, keys: frozenset[str]) -> dict | None:
    """The rows of a collated batch whose `key` is in `keys` (None when there are none)."""
    keep = [i for i, key in enumerate(batch["key"]) if str(key) in keys]
    if not keep:
        return None
    if len(keep) == len(batch["key"]):
        return batch
    index = torch.tensor(keep)
    return {
        k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else [v[i] for i in keep]
        for k, v in batch.items()
    }


def default_device() -> torch.device:
    """The device an evaluation or inference actor runs on: its GPU when Ray gave it one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
