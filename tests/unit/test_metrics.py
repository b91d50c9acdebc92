from __future__ import annotations

import pytest
import torch

from mplug.metrics import retrieval_chance, retrieval_recall

pytestmark = pytest.mark.unit


def test_perfect_and_reversed_rankings():
    groups = torch.arange(20)
    perfect = retrieval_recall(torch.eye(20), groups, groups)
    assert all(v == 100.0 for v in perfect.values())
    # Each image ranks its own text last: never found in the top 10 of 20.
    worst = retrieval_recall(-torch.eye(20), groups, groups)
    assert worst["i2t_r1"] == 0.0 and worst["t2i_r10"] == 0.0


def test_known_ranks():
    groups = torch.arange(3)
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.1, 0.2, 0.3]])
    r = retrieval_recall(sim, groups, groups, ks=(1, 2))
    # i2t: image0 rank1, image1 rank2 (0.8 beats 0.5), image2 rank1.
    assert r["i2t_r1"] == pytest.approx(200 / 3) and r["i2t_r2"] == 100.0
    # t2i: text0 → image0 (0.9) rank1; text1 → image1 (0.5) rank1; text2 → image2 (0.3) rank1.
    assert r["t2i_r1"] == 100.0


def test_identical_captions_count_as_correct():
    groups = torch.tensor([0, 0, 1])  # images 0 and 1 share a caption
    sim = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert retrieval_recall(sim, groups, groups, ks=(1,))["i2t_r1"] == 100.0


def test_chance_matches_random_rankings():
    groups = torch.arange(50)
    chance = retrieval_chance(groups, groups)
    assert chance["i2t_r1"] == pytest.approx(2.0) and chance["t2i_r10"] == pytest.approx(20.0)
    torch.manual_seed(0)
    runs = [retrieval_recall(torch.rand(50, 50), groups, groups)["i2t_r5"] for _ in range(200)]
    assert sum(runs) / len(runs) == pytest.approx(chance["i2t_r5"], abs=1.5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        retrieval_recall(torch.zeros(2, 3), torch.arange(2), torch.arange(2))
