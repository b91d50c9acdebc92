"""Evaluation metrics that need no Ray: image↔text retrieval recall."""

from __future__ import annotations

from math import comb

import torch


def retrieval_recall(
    sim_i2t: torch.Tensor,
    image_group: torch.Tensor,
    text_group: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """R@k both ways for an (images × texts) similarity matrix.

    A text is a correct match for an image when both carry the same group id: the same image
    key, or — for synthetic data whose captions can repeat — the same caption, since identical
    captions are indistinguishable to any model. Returns percentages `i2t_r1`, `t2i_r5`, ...
    """
    if sim_i2t.shape != (image_group.numel(), text_group.numel()):
        raise ValueError(
            f"sim_i2t {tuple(sim_i2t.shape)} does not match {image_group.numel()} images × {text_group.numel()} texts"
        )
    match = image_group[:, None] == text_group[None, :]  # (Ni, Nt)
    if not bool(match.any(1).all()) or not bool(match.any(0).all()):
        raise ValueError("every image needs at least one matching text and every text a matching image")
    out: dict[str, float] = {}
    for name, sim, m in (("i2t", sim_i2t, match), ("t2i", sim_i2t.T, match.T)):
        order = sim.argsort(dim=1, descending=True)
        hits = torch.gather(m, 1, order)  # (Nq, Nc): True where the ranked candidate is correct
        first = hits.float().argmax(dim=1)  # rank of the first correct candidate
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (first < k).float().mean().item()
    return out


def retrieval_chance(
    image_group: torch.Tensor, text_group: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Expected R@k of a random ranking (percent), for the same ground truth as `retrieval_recall`."""
    match = image_group[:, None] == text_group[None, :]
    out: dict[str, float] = {}
    for name, m in (("i2t", match), ("t2i", match.T)):
        n = m.shape[1]
        for k in ks:
            # P(at least one of g correct candidates in the top k of n, uniformly shuffled).
            p = [1.0 - comb(n - int(g), k) / comb(n, k) if k < n else 1.0 for g in m.sum(1).tolist()]
            out[f"{name}_r{k}"] = 100.0 * sum(p) / len(p)
    return out
