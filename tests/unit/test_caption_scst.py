"""SCST's rewards: each sampled caption is scored against its own image's references, as the
image was seen (a flipped training image's captions are mirrored back first)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mplug.tokenizer import load_tokenizer
from pipelines.tasks.base import StepContext
from tests import finetune as ft

pytestmark = pytest.mark.unit

SAID = "a red circle right of a blue square"


class _Captioner(nn.Module):
    """Says SAID for every image and beam: what the rewards make of it is under test."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer()

    def generate(self, images: torch.Tensor, num_return_sequences: int = 1, **_) -> torch.Tensor:
        ids = self.tokenizer(SAID, add_special_tokens=False)["input_ids"] + [self.tokenizer.sep_token_id]
        return torch.tensor([ids] * (images.shape[0] * num_return_sequences))


def _scst_task(tmp_path):
    refs = [("img0", "a red circle left of a blue square"), ("img0", "the red circle is left of the blue square"),
            ("img1", "two green triangles"), ("img1", "a pair of green triangles")]  # fmt: skip
    rows = [{"key": f"k{i}", "image_id": image, "caption": text} for i, (image, text) in enumerate(refs)]
    uri = ft.caption_references(rows, str(tmp_path))
    return ft.task_from_config(
        "caption", "jobs/configs/finetune_caption_scst_tiny.yaml", {"data.uris": [uri]}
    )


def test_a_flipped_image_is_rewarded_for_describing_what_it_shows(tmp_path) -> None:
    task = _scst_task(tmp_path)
    beams = task.job.caption.scst_beams
    batch = {"image": torch.zeros(3, 3, 8, 8), "image_id": ["img0", "img0", "img1"],
             "flipped": torch.tensor([True, False, True])}  # fmt: skip
    [(ids, mask, rewards)] = task.prepare_step(
        _Captioner(), [batch], StepContext(step=0, epoch=0, steps_per_epoch=1)
    )
    assert rewards.shape == (3, beams) and ids.shape[0] == 3 * beams
    flipped, unflipped, other_image = rewards[:, 0].tolist()
    # Mirrored, the circle is right of the square: SAID is right there and wrong unmirrored
    # (unmirrored it still shares every n-gram without "left"/"right" with the references).
    assert flipped > unflipped + 1.0
    assert other_image < 0.05  # scored against its own image's references
    assert torch.all(rewards == rewards[:, :1])  # the same caption in every beam, the same reward


def test_a_prompted_caption_is_rewarded_without_its_prompt(tmp_path) -> None:
    """With `caption.prompt` the model writes the prompt first; it is given, not predicted, so
    SCST scores what follows it against the references, as the evaluation does."""
    task = _scst_task(tmp_path)
    prompted = ft.task_from_config(
        "caption", "jobs/configs/finetune_caption_scst_tiny.yaml",
        {"data.uris": task.job.data.uris, "caption.prompt": "a picture of "},
    )  # fmt: skip

    class _Prompted(_Captioner):
        def generate(self, images, num_return_sequences: int = 1, **_):
            ids = self.tokenizer("a picture of " + SAID, add_special_tokens=False)["input_ids"]
            return torch.tensor(
                [ids + [self.tokenizer.sep_token_id]] * (images.shape[0] * num_return_sequences)
            )

    batch = {
        "image": torch.zeros(2, 3, 8, 8),
        "image_id": ["img0", "img0"],
        "flipped": torch.tensor([True, True]),
    }
    ctx = StepContext(step=0, epoch=0, steps_per_epoch=1)
    [(_, _, plain)] = task.prepare_step(_Captioner(), [batch], ctx)
    [(ids, _, with_prompt)] = prompted.prepare_step(_Prompted(), [batch], ctx)
    torch.testing.assert_close(with_prompt, plain)
    # The sequence trained on is what the model wrote, prompt included.
    assert load_tokenizer().decode(ids[0], skip_special_tokens=True).startswith("a picture of")


def test_an_scst_step_makes_the_better_rewarded_caption_of_an_image_more_likely(tmp_path) -> None:
    from mplug.generation import sequence_log_probs

    task = _scst_task(tmp_path)
    torch.manual_seed(0)
    model = task.build_model().eval()  # no dropout: the two log-probabilities are compared exactly
    cfg = task.model_config
    said = ["two green triangles", "a red circle", "a red circle", "two green triangles"]
    tokens = load_tokenizer()(said, padding=True, return_tensors="pt")  # [CLS] caption [SEP] [PAD]*
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # image 0's first caption, image 1's second

    def mean_log_prob() -> torch.Tensor:
        with torch.no_grad():
            memory, memory_mask = model.visual_memory(images)
            logp = sequence_log_probs(model.text_decoder, memory, memory_mask, ids, mask)
            return logp / mask[:, 1:].sum(1)

    before = mean_log_prob()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model(images=images, caption_ids=ids, caption_mask=mask, rewards=rewards).loss.backward()
    optimizer.step()
    gain = (mean_log_prob() - before).view(2, 2)
    # Per image, the caption above its beams' mean reward gains log-probability over the other.
    assert gain[0, 0] > gain[0, 1] and gain[1, 1] > gain[1, 0], gain

    model.zero_grad()
    model(images=images, caption_ids=ids, caption_mask=mask, rewards=torch.ones(2, 2)).loss.backward()
    # Equal rewards: no advantage, no gradient (the baseline is the image's own beams' mean).
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
