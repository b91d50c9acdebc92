"""VQA accuracy, retrieval recall, grounding IoU and classification accuracy, on cases worked out
by hand from the official rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import generalized_box_iou as torchvision_giou

from mplug.metrics import (
    accuracy,
    box_cxcywh_to_xyxy,
    box_iou,
    generalized_box_iou,
    grounding_accuracy,
    normalize_vqa_answer,
    retrieval_chance,
    retrieval_recall,
    vqa_accuracy,
)

pytestmark = pytest.mark.unit


def vqa(prediction: str, answers: list[str]) -> float:
    return vqa_accuracy({"q": prediction}, {"q": answers})["overall"]


# ---- VQA ---------------------------------------------------------------------------------------
def test_the_two_cases_where_the_albef_scorer_disagrees_with_the_official_one():
    # Ten identical human answers: the official evaluator normalises nothing, so "two" never
    # equals "2" (ALBEF's copy normalises the prediction anyway and scores 100).
    assert vqa("two", ["2"] * 10) == 0.0
    # Humans disagree: articles are stripped on both sides, six humans then say "dog": every
    # human has >= 3 others agreeing with the prediction (ALBEF's copy keeps "a dog": 60).
    assert vqa("dog", ["a dog"] * 4 + ["dog"] * 2 + ["cat"] * 4) == 100.0


@pytest.mark.parametrize(
    ("agreeing", "expected"),
    [
        # k humans say "red", 10 - k say "blue"; the prediction is "red".
        # Each red human sees k - 1 other reds, each blue human sees k: mean of min(1, m / 3).
        (0, 0.0),
        (1, 100 * (1 * 0 + 9 * (1 / 3)) / 10),  # 30
        (2, 100 * (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 60
        (3, 100 * (3 * (2 / 3) + 7 * 1) / 10),  # 90
        (4, 100.0),
    ],
)
def test_disagreeing_humans(agreeing, expected):
    assert vqa("red", ["red"] * agreeing + ["blue"] * (10 - agreeing)) == pytest.approx(expected)


def test_number_words_become_digits_only_when_humans_disagree():
    mixed = ["two"] * 5 + ["2"] * 2 + ["3"] * 3  # normalised: seven "2", three "3"
    assert vqa("2", mixed) == 100.0
    assert vqa("two", mixed) == 100.0
    assert vqa("3", mixed) == pytest.approx(100 * (3 * (2 / 3) + 7) / 10)  # 90
    assert vqa("2", ["two"] * 10) == 0.0  # all the same: compared as typed


def test_articles_punctuation_and_contractions():
    assert vqa("dog", ["the dog"] * 2 + ["a cat"] * 8) == pytest.approx(60.0)
    # "Yes!" -> "yes" ('!' not next to a space becomes a space), "yes." -> "yes": three "yes".
    assert vqa("Yes!", ["yes."] + ["yes"] * 2 + ["no"] * 7) == pytest.approx(90.0)
    assert vqa("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(90.0)  # "dont" -> "don't"
    assert vqa("1000", ["1,000"] * 4 + ["1000"] * 2 + ["many"] * 4) == 100.0  # digit,digit comma


def test_identical_humans_only_get_whitespace_normalised():
    assert vqa("  yes\n", ["yes"] * 10) == 100.0  # newlines/tabs/strip always run
    assert vqa("yes.", ["yes"] * 10) == 0.0  # punctuation is not removed: the humans agree
    assert vqa("Yes", ["yes"] * 10) == 0.0  # nor is case


def test_answer_processing_follows_the_official_code():
    assert normalize_vqa_answer("The Two dogs!") == "2 dogs"
    assert normalize_vqa_answer("3.5") == "3.5"  # a period before a digit stays
    assert normalize_vqa_answer("hello,world") == "hello world"  # comma touching no space
    assert normalize_vqa_answer("hi, there") == "hi there"  # comma next to a space: deleted
    assert normalize_vqa_answer("red/white (5)") == "red white 5"
    assert normalize_vqa_answer("it's 10:30") == "it's 10:30"  # ' and : are not in its list
    # The original passes re.UNICODE (32) as re.sub's count: at most 32 periods go.
    assert normalize_vqa_answer("." * 40) == "." * 8


def test_overall_per_question_and_per_type():
    result = vqa_accuracy(
        {1: "2", 2: "red", 3: "yes"},
        {1: ["2"] * 10, 2: ["red"] * 2 + ["blue"] * 8, 3: ["no"] * 10},
        answer_types={1: "number", 2: "other", 3: "yes/no"},
        question_types={1: "how many", 2: "what color", 3: "is the"},
    )
    assert result["per_question"] == pytest.approx({1: 100.0, 2: 60.0, 3: 0.0})
    assert result["overall"] == pytest.approx(160 / 3)
    assert result["per_answer_type"] == pytest.approx({"number": 100.0, "other": 60.0, "yes/no": 0.0})
    assert result["per_question_type"]["what color"] == pytest.approx(60.0)
    assert result["num_questions"] == 3 and result["num_single_answer"] == 0


def test_single_human_answer():
    exact = vqa_accuracy({1: "red", 2: "blue"}, {1: ["red"], 2: ["red"]}, single_answer_exact=True)
    assert exact["per_question"] == {1: 100.0, 2: 0.0} and exact["num_single_answer"] == 2
    official = vqa_accuracy({1: "red"}, {1: ["red"]})
    assert official["overall"] == 0.0 and official["num_single_answer"] == 1  # no other human can agree


def test_vqa_inputs_that_are_errors():
    with pytest.raises(ValueError, match=r"1 predicted questions have no human answers.*'extra'"):
        vqa_accuracy({1: "a", "extra": "b"}, {1: ["a"] * 10})
    with pytest.raises(ValueError, match=r"1 questions with human answers have no prediction.*\[2\]"):
        vqa_accuracy({1: "a"}, {1: ["a"] * 10, 2: ["b"] * 10})
    with pytest.raises(ValueError, match="question 1 has no human answers"):
        vqa_accuracy({1: "a"}, {1: []})
    with pytest.raises(ValueError, match="no answer type"):
        vqa_accuracy({1: "a"}, {1: ["a"] * 10}, answer_types={})


# ---- retrieval ----------------------------------------------------------------------------------
# Three images (ids 10, 20, 30), two captions each.
IMAGES = torch.tensor([10, 20, 30])
TEXTS = torch.tensor([10, 10, 20, 20, 30, 30])
SIM = torch.tensor(
    [
        [0.1, 0.9, 0.8, 0.2, 0.0, 0.3],  # image 10: its 2nd caption first -> rank 0
        [0.9, 0.1, 0.2, 0.3, 0.8, 0.0],  # image 20: t0, t4 (wrong), then t3 -> rank 2
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.6],  # image 30: t5 first -> rank 0
    ]
)
# Text -> image ranks, column by column: t0 2, t1 0, t2 2, t3 0, t4 1, t5 0.


def test_several_captions_per_image_hand_ranks():
    r = retrieval_recall(SIM, IMAGES, TEXTS, ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(200 / 3) and r["i2t_r2"] == pytest.approx(200 / 3)
    assert r["i2t_r3"] == 100.0
    assert r["t2i_r1"] == pytest.approx(50.0) and r["t2i_r2"] == pytest.approx(400 / 6)
    assert r["t2i_r3"] == 100.0
    assert r["i2t_r_mean"] == pytest.approx((200 / 3 + 200 / 3 + 100) / 3)
    assert r["t2i_r_mean"] == pytest.approx((50 + 400 / 6 + 100) / 3)
    assert r["r_mean"] == pytest.approx((r["i2t_r_mean"] + r["t2i_r_mean"]) / 2)


def test_perfect_and_reversed_rankings():
    groups = torch.arange(20)
    perfect = retrieval_recall(torch.eye(20), groups, groups)
    assert all(v == 100.0 for v in perfect.values())
    # Each image ranks its own text last: never found in the top 10 of 20.
    worst = retrieval_recall(-torch.eye(20), groups, groups)
    assert worst["i2t_r1"] == 0.0 and worst["t2i_r10"] == 0.0 and worst["r_mean"] == 0.0


def test_known_ranks_one_caption_each():
    groups = torch.arange(3)
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.1, 0.2, 0.3]])
    r = retrieval_recall(sim, groups, groups, ks=(1, 2))
    # i2t: image0 rank1, image1 rank2 (0.8 beats 0.5), image2 rank1.
    assert r["i2t_r1"] == pytest.approx(200 / 3) and r["i2t_r2"] == 100.0
    # t2i: text0 → image0 (0.9) rank1; text1 → image1 (0.5) rank1; text2 → image2 (0.3) rank1.
    assert r["t2i_r1"] == 100.0


def test_chance_matches_random_rankings():
    groups = torch.arange(50)
    chance = retrieval_chance(groups, groups)
    assert chance["i2t_r1"] == pytest.approx(2.0) and chance["t2i_r10"] == pytest.approx(20.0)
    assert chance["r_mean"] == pytest.approx((2 + 10 + 20) / 3)
    torch.manual_seed(0)
    runs = [retrieval_recall(torch.rand(50, 50), groups, groups)["i2t_r5"] for _ in range(200)]
    assert sum(runs) / len(runs) == pytest.approx(chance["i2t_r5"], abs=1.5)


def test_chance_with_several_captions():
    # i2t: 2 of 6 texts correct, top 1: 1/3; t2i: 1 of 3 images, top 1: 1/3; top 2: 1 - C(4,2)/C(6,2).
    chance = retrieval_chance(IMAGES, TEXTS, ks=(1, 2))
    assert chance["i2t_r1"] == pytest.approx(100 / 3) and chance["t2i_r1"] == pytest.approx(100 / 3)
    assert chance["i2t_r2"] == pytest.approx(100 * (1 - 6 / 15))


def test_retrieval_inputs_that_are_errors():
    with pytest.raises(ValueError, match="does not match"):
        retrieval_recall(torch.zeros(2, 3), torch.arange(2), torch.arange(2))
    with pytest.raises(ValueError, match="distinct image ids"):
        retrieval_recall(torch.zeros(2, 2), torch.tensor([0, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"texts name an image not in image_group.*\[7\]"):
        retrieval_recall(torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"images have no text.*\[1\]"):
        retrieval_recall(torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([0, 0]))


# ---- grounding ----------------------------------------------------------------------------------
def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10]] * 5, dtype=float)
    b = np.array([[5, 5, 10, 10], [10, 0, 10, 10], [0, 0, 10, 10], [2, 2, 5, 5], [0, 0, 10, 5]], dtype=float)
    # overlap 25 of union 175; touching; identical; b inside a (25 of 100); half of a.
    np.testing.assert_allclose(box_iou(a, b), [1 / 7, 0.0, 1.0, 0.25, 0.5])
    assert box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).tolist() == [0.0]  # no area at all


def test_grounding_accuracy_counts_iou_at_or_above_the_threshold():
    pred = torch.tensor([[0, 0, 10, 10], [5, 5, 10, 10], [0, 0, 10, 5], [2, 2, 5, 5]], dtype=torch.float32)
    gt = torch.tensor([[0, 0, 10, 10]] * 4, dtype=torch.float32)  # IoUs 1, 1/7, 0.5, 0.25
    assert grounding_accuracy(pred, gt) == 50.0
    assert grounding_accuracy(pred.numpy(), gt.numpy(), threshold=0.25) == 75.0
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        grounding_accuracy(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"image_sizes must be \(4, 2\)"):
        grounding_accuracy(pred, gt, image_sizes=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="shapes"):
        grounding_accuracy(np.zeros((2, 4)), np.zeros((3, 4)))


def test_predicted_boxes_are_clipped_to_their_image_when_sizes_are_given():
    # The prediction spills 10 px past the right edge of a 20-px-wide image: IoU 10/20 unclipped,
    # 10/10 once clipped to the image.
    pred, gt = np.array([[10.0, 0, 20, 10]]), np.array([[10.0, 0, 10, 10]])
    assert grounding_accuracy(pred, gt, threshold=0.6) == 0.0
    assert grounding_accuracy(pred, gt, threshold=0.6, image_sizes=torch.tensor([[20, 30]])) == 100.0


def test_generalized_box_iou_by_hand_and_against_torchvision():
    b1 = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]])
    b2 = torch.tensor([[1.0, 1, 3, 3], [2, 0, 3, 1], [0, 0, 1, 1]])
    # IoU 1/7, hull 9 vs union 7: 1/7 - 2/9; disjoint: 0 - (3 - 2)/3; identical: 1.
    expected = torch.tensor([1 / 7 - 2 / 9, -1 / 3, 1.0])
    torch.testing.assert_close(generalized_box_iou(b1, b2), expected)
    torch.manual_seed(0)
    boxes = box_cxcywh_to_xyxy(torch.rand(2, 16, 4) * torch.tensor([1.0, 1.0, 0.5, 0.5]))
    torch.testing.assert_close(
        generalized_box_iou(boxes[0], boxes[1]), torchvision_giou(boxes[0], boxes[1]).diagonal()
    )
    with pytest.raises(ValueError, match=r"two \(N, 4\) tensors"):
        generalized_box_iou(torch.zeros(2, 4), torch.zeros(3, 4))


def test_box_cxcywh_to_xyxy():
    torch.testing.assert_close(
        box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]])), torch.tensor([[0.4, 0.3, 0.6, 0.7]])
    )


# ---- classification -----------------------------------------------------------------------------
def test_accuracy():
    assert accuracy(["true", "false", "true"], ["true", "true", "true"]) == pytest.approx(200 / 3)
    assert accuracy(np.array([0, 1]), np.array([0, 1])) == 100.0
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])
