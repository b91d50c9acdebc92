"""Greedy and beam search: beam 1 == greedy, cache == no cache, length limits, EOS, prompts."""

from __future__ import annotations

import pytest
import torch

from mplug import MPlugConfig, MPlugForPretraining
from mplug.generation import beam_search, greedy_search

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: OpenMP threads spinning against other processes on a shared 2-core
    box made these models several times slower than single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SEP, PAD, CLS = 102, 0, 101


@pytest.fixture(scope="module")
def model() -> MPlugForPretraining:
    torch.manual_seed(0)
    m = MPlugForPretraining(MPlugConfig.preset("tiny", queue_size=16)).eval()
    # Sharpen the untrained LM so EOS shows up: make [SEP] likely after a few tokens.
    with torch.no_grad():
        m.text_decoder.head.bias[SEP] = 4.0
    return m


def _memory(model: MPlugForPretraining, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    images = model.example_inputs(n, seed=5)["images"]
    with torch.no_grad():
        return model.decoder_memory(images)


def test_beam_one_equals_greedy(model: MPlugForPretraining) -> None:
    memory, mask = _memory(model)
    with torch.no_grad():
        greedy = greedy_search(
            model.text_decoder, memory, mask, CLS, SEP, PAD, max_length=12, min_length=1, use_cache=True
        )
        beam = beam_search(model.text_decoder, memory, mask, CLS, SEP, PAD, 1, 12, 1, 1.0, True)
    assert torch.equal(greedy, beam)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_equals_uncached(model: MPlugForPretraining, num_beams: int) -> None:
    images = model.example_inputs(3, seed=5)["images"]
    cached = model.generate(images, num_beams=num_beams, max_length=10, use_cache=True)
    uncached = model.generate(images, num_beams=num_beams, max_length=10, use_cache=False)
    assert torch.equal(cached, uncached)


def test_length_limits_and_eos(model: MPlugForPretraining) -> None:
    images = model.example_inputs(4, seed=5)["images"]
    for beams in (1, 3):
        out = model.generate(images, num_beams=beams, max_length=9, min_length=1)
        assert out.shape[0] == 4 and out.shape[1] <= 9
        for row in out.tolist():
            if SEP in row:  # after EOS only padding
                assert all(t == PAD for t in row[row.index(SEP) + 1 :])
        long = model.generate(images, num_beams=beams, max_length=9, min_length=6)
        for row in long.tolist():
            assert SEP not in row[:5]  # EOS forbidden before min_length
    # With a huge EOS bias the greedy decoder stops at once (but not before min_length).
    with torch.no_grad():
        model.text_decoder.head.bias[SEP] += 100.0
    try:
        assert model.generate(images, max_length=9).tolist() == [[SEP]] * 4
        out = model.generate(images, max_length=9, min_length=3)
        assert out.shape == (4, 3) and (out[:, 2] == SEP).all()
    finally:
        with torch.no_grad():
            model.text_decoder.head.bias[SEP] -= 100.0


def test_beam_search_scores_at_least_greedy(model: MPlugForPretraining) -> None:
    """Beam search finds a sequence with log-probability >= the greedy one (length_penalty 0)."""
    images = model.example_inputs(2, seed=7)["images"]
    memory, mask = _memory(model, 2)

    def logprob(seqs: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([torch.full((seqs.shape[0], 1), CLS), seqs], 1)
        valid = torch.cat([torch.ones(seqs.shape[0], 1, dtype=torch.long), (seqs != PAD).long()], 1)
        hidden, _ = model.text_decoder(ids, valid, memory, mask)
        logp = model.text_decoder.logits(hidden[:, :-1]).log_softmax(-1)
        tok = logp.gather(-1, seqs[..., None]).squeeze(-1)
        return (tok * (seqs != PAD)).sum(1)

    with torch.no_grad():
        greedy = model.generate(images, max_length=6)
        beam = model.generate(images, num_beams=4, max_length=6, length_penalty=0.0)
        assert (logprob(beam) >= logprob(greedy) - 1e-4).all()


def test_prompted_generation(model: MPlugForPretraining) -> None:
    """With a question the decoder reads fused [visual; question]; the answer depends on it."""
    x = model.example_inputs(2, seed=9)
    memory, mask = model.decoder_memory(x["images"], x["input_ids"], x["attention_mask"])
    assert memory.shape[1] == model.config.num_visual_tokens + x["input_ids"].shape[1]
    assert torch.equal(mask[:, model.config.num_visual_tokens :], x["attention_mask"])
    out = model.generate(x["images"], x["input_ids"], x["attention_mask"], num_beams=2, max_length=5)
    assert out.shape[0] == 2 and out.shape[1] <= 5


def test_rejects_bad_arguments(model: MPlugForPretraining) -> None:
    images = model.example_inputs(1)["images"]
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(images, num_beams=0)
    with pytest.raises(ValueError, match="min_length"):
        model.generate(images, max_length=3, min_length=5)
