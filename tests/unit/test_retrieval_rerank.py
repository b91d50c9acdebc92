"""Re-ranking of the ITC top k: by the ITM score alone (official mPLUG, the primary figures) and
by ITM + ITC similarity (`itm_itc_*`, ALBEF's and BLIP's evaluation), on a case worked by hand."""

from __future__ import annotations

import pytest
import torch

from pipelines.tasks.ranking import FLOOR_SCORE, candidates, reranked_metrics, score_matrices

pytestmark = pytest.mark.unit

# Two images, one caption each (text t belongs to image t). ITC is right both ways; ITM prefers
# text 1 for image 0 (1.05 > 1.0) and image 0 for text 1, by a hair.
SIM = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
PAIRS = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
ITM = torch.tensor([1.0, 1.05, 0.0, 1.0])


def test_candidates_outside_the_top_k_keep_the_floor_score() -> None:
    i2t, t2i = score_matrices(candidates(SIM, k=1), PAIRS, ITM)
    assert i2t.tolist() == [[1.0, FLOOR_SCORE], [FLOOR_SCORE, 1.0]]
    assert t2i.tolist() == [[1.0, FLOOR_SCORE], [FLOOR_SCORE, 1.0]]


def test_itm_alone_and_itm_plus_itc_rank_as_worked_out() -> None:
    m = reranked_metrics({}, candidates(SIM, k=2), PAIRS, ITM, SIM, text_group=torch.tensor([0, 1]))
    # ITM alone: image 0 ranks text 1 first, text 1 ranks image 0 first: half right each way.
    assert (m["i2t_r1"], m["t2i_r1"]) == (50.0, 50.0)
    # + ITC: image 0's text 0 scores 1.9 vs 1.15, text 1's image 1 1.8 vs 1.15: all right.
    assert (m["itm_itc_i2t_r1"], m["itm_itc_t2i_r1"]) == (100.0, 100.0)
    assert m["itm_itc_r_mean"] == 100.0 and m["r_mean"] == pytest.approx((50 + 100 + 100) / 3)


def test_candidate_pairs_are_each_querys_top_k_once() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    cands = candidates(sim, k=1)
    # image 0 -> text 0, image 1 -> text 1; text 0 -> image 0, text 1 -> image 1, text 2 -> image 1.
    assert cands.pairs.tolist() == [[0, 0], [1, 1], [1, 2]]
    assert {i: t.tolist() for i, t in cands.texts_by_image().items()} == {0: [0], 1: [1, 2]}


def test_an_unscored_candidate_is_an_error_not_a_floor() -> None:
    with pytest.raises(ValueError, match="not re-scored"):
        score_matrices(candidates(SIM, k=2), PAIRS[:3], ITM[:3])
