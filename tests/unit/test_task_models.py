"""The finetuning models: each loss is what its task says, each head decodes what it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug import MPlugConfig
from mplug.caption import MPlugForCaptioning
from mplug.classification import MPlugForImageTextClassification
from mplug.generation import sequence_log_probs
from mplug.grounding import FIRST_BIN_TOKEN_ID, START_TOKEN_ID, MPlugForGrounding, ordinal_bin_code
from mplug.metrics import box_cxcywh_to_xyxy, generalized_box_iou
from mplug.retrieval import MPlugForRetrieval
from mplug.vqa import MPlugForQuestionAnswering

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**overrides) -> MPlugConfig:
    return MPlugConfig.preset("tiny", queue_size=16, text_config={"vocab_size": 1024}, **overrides)


def _captions(model, n: int, length: int, seed: int = 0):
    from mplug.modeling import random_captions

    return random_captions(model.config, n, length, torch.Generator().manual_seed(seed))


def test_vqa_loss_weights_answers_and_ignores_empty_slots() -> None:
    torch.manual_seed(0)
    model = MPlugForQuestionAnswering(_cfg()).eval()
    x = model.example_inputs(2)
    a_ids, a_mask = _captions(model, 6, 6, seed=1)
    a_ids, a_mask = a_ids.view(2, 3, 6), a_mask.view(2, 3, 6)
    weights = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    out = model(x["images"], x["input_ids"], x["attention_mask"], a_ids, a_mask, weights)
    assert out.answer_nll.shape == (3,)  # only the three weighted answers are decoded
    # By hand: the weighted sum of each answer's summed token NLL, over the 2 questions.
    memory, mask = model.question_memory(x["images"], x["input_ids"], x["attention_mask"])
    nll = -sequence_log_probs(model.text_decoder, memory[[0, 0, 1]], mask[[0, 0, 1]],
                              a_ids[[0, 0, 1], [0, 1, 0]], a_mask[[0, 0, 1], [0, 1, 0]])  # fmt: skip
    torch.testing.assert_close(out.loss, (0.6 * nll[0] + 0.4 * nll[1] + 1.0 * nll[2]) / 2)
    generated = model.generate(x["images"], x["input_ids"], x["attention_mask"], num_beams=2, max_length=5)
    assert generated.shape[0] == 2 and generated.shape[1] <= 5


def test_vqa_answer_ranking_prefers_the_likeliest_answer() -> None:
    torch.manual_seed(0)
    model = MPlugForQuestionAnswering(_cfg()).eval()
    x = model.example_inputs(1)
    candidates, mask = _captions(model, 6, 5, seed=2)
    top, probs = model.rank_answers(x["images"], x["input_ids"], x["attention_mask"], candidates, mask, k=6)
    assert sorted(top[0].tolist()) == list(range(6)) and torch.all(probs[0, :-1] >= probs[0, 1:])
    memory, mmask = model.question_memory(x["images"], x["input_ids"], x["attention_mask"])
    nll = -sequence_log_probs(
        model.text_decoder, memory.expand(6, -1, -1), mmask.expand(6, -1), candidates, mask
    )
    # The official score adds the first token's log-prob again; the best answer under it:
    start = torch.full((1, 1), model.config.cls_token_id)
    first = model.text_decoder.logits(
        model.text_decoder(start, torch.ones_like(start), memory, mmask)[0][:, 0]
    )
    score = first.log_softmax(-1)[0, candidates[:, 1]] - nll
    assert int(top[0, 0]) == int(score.argmax())


def test_caption_scst_pushes_up_captions_above_the_mean_reward() -> None:
    torch.manual_seed(0)
    model = MPlugForCaptioning(_cfg())
    images = model.example_inputs(1)["images"]
    seqs, mask = _captions(model, 2, 6, seed=3)
    rewards = torch.tensor([[1.0, 0.0]])  # caption 0 beats the image's mean reward, caption 1 falls below
    loss = model(images, seqs, mask, rewards=rewards).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1.0 * p.grad  # one SGD step on the SCST loss
    memory, mmask = model.visual_memory(images)
    after = sequence_log_probs(model.text_decoder, memory.expand(2, -1, -1), mmask.expand(2, -1), seqs, mask)
    model.zero_grad()
    torch.manual_seed(0)
    fresh = MPlugForCaptioning(_cfg())
    memory, mmask = fresh.visual_memory(images)
    before = sequence_log_probs(fresh.text_decoder, memory.expand(2, -1, -1), mmask.expand(2, -1), seqs, mask)
    assert after[0] > before[0] and after[1] < before[1]
    assert float(model(images, seqs, mask, rewards=torch.tensor([[0.5, 0.5]])).loss) == 0.0  # no advantage


def test_grounding_boxes_are_bin_tokens_and_decoding_stays_in_the_bins() -> None:
    torch.manual_seed(0)
    model = MPlugForGrounding(_cfg()).eval()
    assert model.num_bins == 65  # image_size + 1, as the official 337 at 336 px
    boxes = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    tokens = model.boxes_to_tokens(boxes)
    assert tokens.tolist() == [
        [FIRST_BIN_TOKEN_ID, FIRST_BIN_TOKEN_ID + 32, FIRST_BIN_TOKEN_ID + 64, FIRST_BIN_TOKEN_ID + 16]
    ]
    torch.testing.assert_close(model.tokens_to_boxes(tokens), boxes)
    x = model.example_inputs(3)
    pred = model.predict_boxes(x["images"], x["input_ids"], x["attention_mask"])
    assert pred.shape == (3, 4) and float(pred.min()) >= 0 and float(pred.max()) <= 1
    out = model(x["images"], x["input_ids"], x["attention_mask"], torch.rand(3, 4) * 0.5 + 0.25)
    assert out.loss.isfinite() and out.loss > 0
    with pytest.raises(ValueError, match="box bins"):
        MPlugForGrounding(_cfg(box_bins=1000))


def test_grounding_loss_is_the_official_weighted_one_unless_plain_cross_entropy_is_asked() -> None:
    torch.manual_seed(0)
    model = MPlugForGrounding(_cfg()).eval()
    x = model.example_inputs(3)
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1], [0.5, 0.5, 0.5, 0.5]])
    weighted = model(x["images"], x["input_ids"], x["attention_mask"], boxes)
    plain = model(x["images"], x["input_ids"], x["attention_mask"], boxes, weighted=False)
    # Plain: the mean negative log-probability of the four target bins, among the bins only.
    memory, memory_mask = model._memory(x["images"], x["input_ids"], x["attention_mask"])
    targets = model.boxes_to_tokens(boxes)
    inputs = torch.cat([torch.full((3, 1), START_TOKEN_ID), targets[:, :3]], dim=1)
    hidden, _ = model.text_decoder(inputs, torch.ones_like(inputs), memory, memory_mask)
    bins = model.text_decoder.logits(hidden)[..., FIRST_BIN_TOKEN_ID : FIRST_BIN_TOKEN_ID + model.num_bins]
    nll = -bins.log_softmax(-1).gather(-1, (targets - FIRST_BIN_TOKEN_ID)[..., None]).squeeze(-1)
    torch.testing.assert_close(plain.loss, nll.mean())
    # Weighted: each token's NLL times its decoded coordinate's L1 error and the box's 1 - GIoU.
    l1 = (weighted.pred_boxes - boxes).abs()
    giou = generalized_box_iou(box_cxcywh_to_xyxy(weighted.pred_boxes), box_cxcywh_to_xyxy(boxes))
    torch.testing.assert_close(weighted.loss, (nll * l1 * (1 - giou)[:, None]).mean())
    torch.testing.assert_close(plain.pred_boxes, weighted.pred_boxes)


def test_pair_classifier_reads_both_images_in_order() -> None:
    torch.manual_seed(0)
    model = MPlugForImageTextClassification(_cfg(num_images=2, id2label={0: "false", 1: "true"})).eval()
    x = model.example_inputs(2)
    pair = torch.stack([x["images"], x["images"].flip(0)], dim=1)  # (2, 2, 3, H, W)
    logits = model(pair, x["input_ids"], x["attention_mask"]).logits
    swapped = model(pair.flip(1), x["input_ids"], x["attention_mask"]).logits
    assert logits.shape == (2, 2) and not torch.allclose(logits, swapped)  # order matters
    with pytest.raises(ValueError, match="2 image"):
        model(x["images"], x["input_ids"], x["attention_mask"])
    out = model(pair, x["input_ids"], x["attention_mask"], labels=torch.tensor([0, 1]))
    assert out.loss.isfinite()


def test_retrieval_treats_captions_of_one_image_as_positives() -> None:
    torch.manual_seed(0)
    model = MPlugForRetrieval(_cfg())
    x = model.example_inputs(4)
    same = model(**x, image_ids=torch.tensor([0, 0, 1, 1]))
    distinct = model(**x, image_ids=torch.tensor([0, 1, 2, 3]))
    assert same.loss_itc != distinct.loss_itc  # other targets
    assert same.keys.image_ids.tolist() == [0, 0, 1, 1]
    model.momentum_update(same)
    assert model.idx_queue[:4].tolist() == [0, 0, 1, 1] and int(model.queue_ptr) == 4


def test_ordinal_bin_code_makes_neighbouring_coordinates_alike() -> None:
    code = ordinal_bin_code(65, 128)
    assert code.shape == (65, 128)
    assert torch.allclose(code.norm(dim=1), torch.ones(65))
    similarity = code @ code.T
    # Similarity falls with the distance between bins, near and far, from either end.
    for anchor in (0, 32, 64):
        by_distance = [similarity[anchor, anchor + d * (1 if anchor < 32 else -1)] for d in (1, 4, 12)]
        assert by_distance[0] > 0.9 > by_distance[1] > 0.3 > by_distance[2]
    assert torch.equal(code, ordinal_bin_code(65, 128)), "the code is fixed, not drawn per call"


def test_init_box_bins_writes_the_code_into_the_tied_decoder_rows_only() -> None:
    torch.manual_seed(0)
    model = MPlugForGrounding(_cfg(box_bins=9))
    weight = model.text_decoder.embeddings.word_embeddings.weight
    before = weight.detach().clone()
    with torch.no_grad():
        model.text_decoder.head.bias.fill_(-3.0)
    model.init_box_bins()
    bins = slice(FIRST_BIN_TOKEN_ID, FIRST_BIN_TOKEN_ID + 9)
    rows = F.normalize(weight[bins].detach(), dim=1)
    assert torch.allclose(rows, ordinal_bin_code(9, weight.shape[1]), atol=1e-6)
    assert torch.allclose(weight[bins].norm(dim=1), before.norm(dim=1).mean().expand(9), rtol=1e-4)
    outside = torch.ones(weight.shape[0], dtype=torch.bool)
    outside[bins] = False
    assert torch.equal(weight[outside], before[outside])
    assert (model.text_decoder.head.bias[bins] == 0).all() and (
        model.text_decoder.head.bias[outside] == -3
    ).all()
