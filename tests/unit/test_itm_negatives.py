"""ITM's negatives: hard ones by ITC similarity (official), or uniform ones for the first
`itm_random_negative_steps` steps of a run; never the positive, never another caption of the image."""

from __future__ import annotations

import pytest
import torch

from mplug.objectives import sample_hard_negatives

pytestmark = pytest.mark.unit

B = 64


def _peaked() -> torch.Tensor:
    """(B, B) similarities where row i is far closest to column i + 1 and column i − 1 is excluded
    (-inf, as another caption of the same image is); the positive (diagonal) is never drawn."""
    sim = torch.zeros(B, B)
    rows = torch.arange(B)
    sim[rows, (rows + 1) % B] = 30.0  # similarities over the temperature: ±1/0.07 at most, here more
    sim[rows, (rows - 1) % B] = -float("inf")
    return sim


def test_hard_negatives_follow_the_similarities() -> None:
    torch.manual_seed(0)
    neg_text, neg_image = sample_hard_negatives(_peaked(), _peaked())
    nearest = (torch.arange(B) + 1) % B
    assert torch.equal(neg_text, nearest) and torch.equal(neg_image, nearest)


def test_random_negatives_are_uniform_over_the_same_candidates() -> None:
    torch.manual_seed(0)
    rows = torch.arange(B)
    drawn = torch.stack([sample_hard_negatives(_peaked(), _peaked(), hard=False)[0] for _ in range(50)])
    assert not (drawn == rows).any()  # never the positive
    assert not (drawn == (rows - 1) % B).any()  # never an excluded (same-image) candidate
    # Uniform over the B − 2 candidates: the nearest is drawn ~1/62 of the time, not always.
    share_nearest = (drawn == (rows + 1) % B).float().mean().item()
    assert share_nearest < 0.1
    assert len(drawn.unique()) == B  # every column is somebody's negative


@pytest.mark.parametrize("task_name", ["pretrain", "retrieval"])
def test_tasks_draw_uniform_negatives_for_the_configured_first_steps(task_name, monkeypatch) -> None:
    import mplug.modeling
    from pipelines.tasks.base import StepContext
    from tests import finetune as ft

    seen: list[bool] = []
    real = mplug.modeling.sample_hard_negatives

    def spy(sim_i2t, sim_t2i, hard=True):
        seen.append(hard)
        return real(sim_i2t, sim_t2i, hard)

    monkeypatch.setattr(mplug.modeling, "sample_hard_negatives", spy)
    task = ft.task_from_config(
        task_name,
        f"jobs/configs/{'pretrain' if task_name == 'pretrain' else 'finetune_retrieval'}_tiny.yaml",
        {"model.overrides.itm_random_negative_steps": 3, "model.overrides.text_config": {"vocab_size": 1024}},
    )
    torch.manual_seed(0)
    model = task.build_model()
    x = model.example_inputs(4)
    batch = {"image": x["images"], "input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    if task_name == "retrieval":
        batch["image_number"] = torch.arange(4)
    for step in (0, 2, 3, 10):
        prepared = task.prepare_step(model, [batch], StepContext(step, 0, 10))
        task.loss(model, batch, 0, prepared, StepContext(step, 0, 10))
    assert seen == [False, False, True, True]


def test_excluded_candidates_have_no_weight_at_all() -> None:
    """Not even the small floor every allowed candidate gets: another caption of the query's image
    is never a negative, however similar the rest of the batch is."""
    from mplug.objectives import negative_weights

    sim = _peaked()
    for hard in (True, False):
        weights = negative_weights(sim, hard)
        rows = torch.arange(B)
        assert (weights[rows, rows] == 0).all() and (weights[rows, (rows - 1) % B] == 0).all()
        assert (weights[rows, (rows + 2) % B] > 0).all()


def test_a_query_whose_batch_holds_no_other_image_gets_no_negative() -> None:
    from mplug.objectives import NO_NEGATIVE

    torch.manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[:2, :2] = -float("inf")  # rows 0 and 1 are captions of one image, alone in the batch...
    sim[2:, 2:] = -float("inf")  # ...and so are rows 2 and 3
    sim[0, :] = -float("inf")  # but row 0's query sees nothing else at all
    neg_text, _ = sample_hard_negatives(sim, sim.t())
    assert neg_text[0] == NO_NEGATIVE and neg_text[1] in (2, 3) and neg_text[2] in (0, 1)


def test_retrieval_itm_pairs_never_match_a_caption_with_its_own_image() -> None:
    """A retrieval batch of one image's captions only: ITM trains on the positives alone (no
    same-image "negative"); with two images every negative is of the other image."""
    from mplug import MPlugConfig
    from mplug.retrieval import MPlugForRetrieval

    torch.manual_seed(0)
    model = MPlugForRetrieval(MPlugConfig.preset("tiny", queue_size=8, text_config={"vocab_size": 1024}))
    x = model.example_inputs(4)
    seen: list[int] = []
    real = model.itm_logits

    def spy(visual, text, mask):
        seen.append(visual.shape[0])
        return real(visual, text, mask)

    model.itm_logits = spy
    out = model(x["images"], x["input_ids"], x["attention_mask"], image_ids=torch.zeros(4, dtype=torch.long))
    assert seen[-1] == 4 and out.loss_itm.isfinite()  # the 4 positives, no negatives
    out = model(x["images"], x["input_ids"], x["attention_mask"], image_ids=torch.tensor([0, 0, 1, 1]))
    assert seen[-1] == 12 and out.loss_itm.isfinite()  # 4 positives + 4 + 4 negatives
