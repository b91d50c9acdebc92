"""Re-ranking of the ITC top k: by the ITM score alone (official mPLUG, the primary figures) and
by ITM + ITC similarity (`itm_itc_*`, ALBEF's and BLIP's evaluation), on a case worked by hand."""

from __future__ import annotations

import pytest
import torch

from pipelines.eval.retrieval import FLOOR_SCORE, candidates, reranked_metrics, score_matrices

pytestmark = pytest.mark.unit

# Two images, one caption each (text t belongs to image t). ITC is right both ways; ITM prefers
# text 1 for image 0 (1.05 > 1.0) and image 0 for text 1, by a hair.
SIM = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
ITM = {(0, 0): 1.0, (0, 1): 1.05, (1, 0): 0.0, (1, 1): 1.0}


def test_candidates_outside_the_top_k_keep_the_floor_score() -> None:
    i2t, t2i = score_matrices(candidates(SIM, k=1), ITM)
    assert i2t.tolist() == [[1.0, FLOOR_SCORE], [FLOOR_SCORE, 1.0]]
    assert t2i.tolist() == [[1.0, FLOOR_SCORE], [FLOOR_SCORE, 1.0]]


def test_itm_alone_and_itm_plus_itc_rank_as_worked_out() -> None:
    m = reranked_metrics({}, candidates(SIM, k=2), ITM, SIM, text_group=torch.tensor([0, 1]))
    # ITM alone: image 0 ranks text 1 first, text 1 ranks image 0 first: half right each way.
    assert (m["i2t_r1"], m["t2i_r1"]) == (50.0, 50.0)
    # + ITC: image 0's text 0 scores 1.9 vs 1.15, text 1's image 1 1.8 vs 1.15: all right.
    assert (m["itm_itc_i2t_r1"], m["itm_itc_t2i_r1"]) == (100.0, 100.0)
    assert m["itm_itc_r_mean"] == 100.0 and m["r_mean"] == pytest.approx((50 + 100 + 100) / 3)
