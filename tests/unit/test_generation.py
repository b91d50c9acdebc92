"""Greedy and beam search: outputs pinned to the implementation before the vectorised rewrite,
cache == no cache, length limits, EOS, prompts, n-best returns, restricted vocabularies, and
teacher-forced sequence scoring with a memory shared across candidates."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from mplug import MPlugConfig, MPlugForPretraining
from mplug.generation import beam_search, generate, greedy_search, sequence_log_probs
from mplug.text import TextDecoder

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
BOS, EOS = 1, 2  # the small decoder's own specials (PAD 0)
WIDTH = 32


# ---- a small seeded decoder whose outputs are pinned -------------------------------------------
@pytest.fixture(scope="module")
def decoder() -> TextDecoder:
    """2 layers, width 32, vocabulary 96, every weight drawn from one seeded generator (independent
    of any model class's init order). The EOS bias is tuned so sequences end at varied lengths."""
    config = BertConfig(
        vocab_size=96, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    dec = TextDecoder(config, 2).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(dec.named_parameters()):
            if "LayerNorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "embeddings" in name else 0.2))
        dec.head.bias[EOS] = 4.8
    return dec


@pytest.fixture(scope="module")
def memories() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """caption: 4 items x 7 memory tokens; vqa: 3 items x 11 tokens, two with padded prompts."""
    g = torch.Generator().manual_seed(2)
    caption = torch.randn(4, 7, WIDTH, generator=g)
    vqa = torch.randn(3, 11, WIDTH, generator=g)
    vqa_mask = torch.ones(3, 11, dtype=torch.long)
    vqa_mask[0, 8:] = 0
    vqa_mask[2, 5:] = 0
    return {"caption": (caption, torch.ones(4, 7, dtype=torch.long)), "vqa": (vqa, vqa_mask)}


def _generate(decoder: TextDecoder, memory, mask, **kwargs):
    kwargs = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, **kwargs}
    return generate(decoder, memory, mask, **kwargs)


# Token ids produced by the previous implementation (per-beam memory copies, a Python loop over
# items), run on `decoder` / `memories` above: (memory, num_beams, min_length, max_length,
# length_penalty) -> ids. Cache on and off gave the same ids.
FROZEN = {
    ("caption", 1, 1, 8, 1.0): [
        [2, 0, 0, 0, 0, 0, 0, 0],
        [68, 50, 60, 36, 17, 82, 93, 36],
        [82, 2, 0, 0, 0, 0, 0, 0],
        [24, 2, 0, 0, 0, 0, 0, 0],
    ],
    ("caption", 1, 3, 8, 1.0): [
        [27, 27, 2, 0, 0, 0, 0, 0],
        [68, 50, 60, 36, 17, 82, 93, 36],
        [82, 31, 61, 61, 61, 61, 61, 61],
        [24, 63, 2, 0, 0, 0, 0, 0],
    ],
    ("caption", 1, 6, 6, 1.0): [
        [27, 27, 17, 17, 17, 2],
        [68, 50, 60, 36, 17, 82],
        [82, 31, 61, 61, 61, 61],
        [24, 63, 27, 19, 19, 2],
    ],
    ("caption", 3, 1, 8, 1.0): [
        [2, 0, 0, 0, 0, 0, 0, 0],
        [68, 50, 60, 2, 0, 0, 0, 0],
        [82, 31, 61, 61, 61, 61, 61, 61],
        [24, 2, 0, 0, 0, 0, 0, 0],
    ],
    ("caption", 3, 1, 8, 0.0): [[2, 0], [2, 0], [82, 2], [2, 0]],
    ("caption", 3, 3, 8, 1.0): [
        [27, 50, 2, 0, 0, 0, 0, 0],
        [68, 50, 60, 36, 17, 82, 93, 2],
        [82, 31, 61, 61, 61, 61, 61, 61],
        [19, 24, 2, 0, 0, 0, 0, 0],
    ],
    ("caption", 3, 3, 8, 0.0): [
        [27, 50, 2, 0, 0, 0, 0, 0],
        [68, 50, 2, 0, 0, 0, 0, 0],
        [82, 31, 61, 61, 61, 61, 61, 61],
        [19, 24, 2, 0, 0, 0, 0, 0],
    ],
    ("caption", 3, 6, 6, 1.0): [
        [27, 27, 17, 17, 17, 2],
        [68, 50, 60, 36, 17, 82],
        [82, 31, 61, 61, 61, 61],
        [76, 19, 27, 27, 19, 2],
    ],
    ("caption", 3, 6, 6, 0.0): [
        [27, 27, 17, 17, 17, 2],
        [68, 50, 60, 36, 17, 82],
        [82, 31, 61, 61, 61, 61],
        [76, 19, 27, 27, 19, 2],
    ],
    ("caption", 5, 1, 8, 1.0): [
        [2, 0, 0, 0, 0, 0, 0, 0],
        [68, 50, 60, 36, 17, 82, 93, 2],
        [82, 31, 61, 61, 61, 61, 61, 2],
        [24, 2, 0, 0, 0, 0, 0, 0],
    ],
    ("caption", 5, 1, 8, 0.0): [[2], [2], [2], [2]],
    ("caption", 5, 3, 8, 1.0): [
        [27, 50, 2, 0, 0, 0, 0, 0],
        [68, 50, 60, 36, 17, 82, 93, 36],
        [82, 31, 61, 61, 61, 61, 61, 61],
        [19, 24, 2, 0, 0, 0, 0, 0],
    ],
    ("caption", 5, 3, 8, 0.0): [
        [27, 50, 2, 0, 0, 0],
        [68, 50, 2, 0, 0, 0],
        [82, 31, 61, 61, 61, 2],
        [19, 24, 2, 0, 0, 0],
    ],
    ("caption", 5, 6, 6, 1.0): [
        [27, 19, 17, 17, 76, 2],
        [68, 50, 60, 36, 17, 82],
        [82, 31, 61, 61, 61, 61],
        [76, 27, 27, 27, 19, 2],
    ],
    ("caption", 5, 6, 6, 0.0): [
        [27, 19, 17, 17, 76, 2],
        [68, 50, 60, 36, 17, 82],
        [82, 31, 61, 61, 61, 61],
        [76, 27, 27, 27, 19, 2],
    ],
    ("vqa", 1, 1, 8, 1.0): [
        [36, 36, 36, 36, 76, 2, 0, 0],
        [2, 0, 0, 0, 0, 0, 0, 0],
        [15, 94, 82, 82, 17, 82, 17, 74],
    ],
    ("vqa", 1, 3, 8, 1.0): [
        [36, 36, 36, 36, 76, 2, 0, 0],
        [19, 15, 49, 49, 15, 61, 15, 61],
        [15, 94, 82, 82, 17, 82, 17, 74],
    ],
    ("vqa", 1, 6, 6, 1.0): [[36, 36, 36, 36, 76, 2], [19, 15, 49, 49, 15, 61], [15, 94, 82, 82, 17, 82]],
    ("vqa", 3, 1, 8, 1.0): [
        [36, 36, 2, 0, 0, 0, 0, 0],
        [19, 15, 49, 49, 15, 61, 15, 61],
        [15, 94, 2, 0, 0, 0, 0, 0],
    ],
    ("vqa", 3, 1, 8, 0.0): [[2, 0, 0], [2, 0, 0], [15, 94, 2]],
    ("vqa", 3, 3, 8, 1.0): [
        [36, 36, 2, 0, 0, 0, 0, 0],
        [19, 15, 49, 49, 15, 61, 15, 61],
        [15, 94, 2, 0, 0, 0, 0, 0],
    ],
    ("vqa", 3, 3, 8, 0.0): [
        [36, 36, 2, 0, 0, 0, 0, 0],
        [19, 15, 49, 49, 15, 61, 15, 61],
        [15, 94, 2, 0, 0, 0, 0, 0],
    ],
    ("vqa", 3, 6, 6, 1.0): [[36, 36, 36, 56, 95, 2], [19, 15, 49, 49, 15, 61], [15, 94, 82, 19, 17, 82]],
    ("vqa", 3, 6, 6, 0.0): [[36, 36, 36, 56, 95, 2], [19, 15, 49, 49, 15, 61], [15, 94, 82, 19, 17, 82]],
    ("vqa", 5, 1, 8, 1.0): [[36, 36, 2, 0, 0, 0, 0], [36, 51, 56, 19, 19, 2, 0], [15, 94, 82, 19, 17, 94, 2]],
    ("vqa", 5, 1, 8, 0.0): [[2, 0, 0], [2, 0, 0], [15, 94, 2]],
    ("vqa", 5, 3, 8, 1.0): [
        [36, 36, 36, 2, 0, 0, 0],
        [36, 51, 56, 19, 19, 51, 2],
        [15, 94, 82, 19, 17, 94, 2],
    ],
    ("vqa", 5, 3, 8, 0.0): [[36, 36, 2], [36, 51, 2], [15, 94, 2]],
    ("vqa", 5, 6, 6, 1.0): [[36, 36, 36, 56, 95, 2], [19, 15, 49, 49, 15, 61], [15, 94, 82, 19, 17, 82]],
    ("vqa", 5, 6, 6, 0.0): [[36, 36, 36, 56, 95, 2], [19, 15, 49, 49, 15, 61], [15, 94, 82, 19, 17, 82]],
}


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("case", list(FROZEN), ids=lambda c: "-".join(map(str, c)))
def test_outputs_match_previous_implementation(decoder, memories, case, use_cache: bool) -> None:
    name, beams, min_length, max_length, length_penalty = case
    memory, mask = memories[name]
    out = _generate(decoder, memory, mask, num_beams=beams, min_length=min_length, max_length=max_length,
                    length_penalty=length_penalty, use_cache=use_cache)  # fmt: skip
    assert out.tolist() == FROZEN[case]


def test_beam_one_equals_greedy(decoder, memories) -> None:
    memory, mask = memories["caption"]
    greedy = greedy_search(decoder, memory, mask, BOS, EOS, PAD, max_length=8, min_length=1, use_cache=True)
    with torch.no_grad():
        beam = beam_search(decoder, memory, mask, BOS, EOS, PAD, 1, 8, 1, 1.0, True)
    assert torch.equal(greedy.sequences, beam.sequences)
    torch.testing.assert_close(greedy.log_probs, beam.log_probs)


# ---- n-best returns, scores, restricted vocabularies ------------------------------------------
def _teacher_forced(decoder, memory, mask, sequences: torch.Tensor, allowed: torch.Tensor | None = None):
    """(N,) summed log-prob and length of generated `sequences` (N, T) (no BOS, PAD after EOS),
    recomputed by one uncached forward pass over memory rows repeated per sequence."""
    rows = torch.arange(memory.shape[0]).repeat_interleave(sequences.shape[0] // memory.shape[0])
    ids = torch.cat([torch.full((sequences.shape[0], 1), BOS), sequences], 1)
    valid = torch.cat([torch.ones(sequences.shape[0], 1, dtype=torch.long), (sequences != PAD).long()], 1)
    with torch.no_grad():
        hidden, _ = decoder(ids, valid, memory[rows], mask[rows])
        logits = decoder.logits(hidden[:, :-1]).float()
    if allowed is not None:
        restricted = torch.full_like(logits, -float("inf"))
        restricted[..., allowed] = logits[..., allowed]
        logits = restricted
    tok = logits.log_softmax(-1).gather(-1, sequences[..., None]).squeeze(-1)
    keep = sequences != PAD
    return (tok * keep).sum(1), keep.sum(1)


@pytest.mark.parametrize("name", ["caption", "vqa"])
def test_num_return_sequences_ranked_and_scored(decoder, memories, name: str) -> None:
    """SCST takes the 5 best beams per image (as the official caption SCST does): rows i*n.. are
    item i's n best, first = the single best, and the scores are what the search ranked by."""
    memory, mask = memories[name]
    b, n, lp = memory.shape[0], 4, 1.0
    best = _generate(decoder, memory, mask, num_beams=5, max_length=8, min_length=3, length_penalty=lp)
    out = _generate(decoder, memory, mask, num_beams=5, max_length=8, min_length=3, length_penalty=lp,
                    num_return_sequences=n, return_scores=True)  # fmt: skip
    seqs = out.sequences
    assert seqs.shape[0] == b * n and out.scores.shape == out.log_probs.shape == (b * n,)
    first = seqs.view(b, n, -1)[:, 0, : best.shape[1]]
    assert torch.equal(first, best)
    assert (seqs.view(b, n, -1)[:, 0, best.shape[1] :] == PAD).all()
    assert (out.scores.view(b, n).diff(dim=1) <= 0).all()  # best first
    for i in range(b):  # distinct hypotheses per item
        assert len({tuple(r) for r in seqs.view(b, n, -1)[i].tolist()}) == n
    log_prob, length = _teacher_forced(decoder, memory, mask, seqs)
    torch.testing.assert_close(out.log_probs, log_prob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.scores, log_prob / length.float() ** lp, atol=1e-4, rtol=1e-4)
    for row in seqs.tolist():  # min_length respected, PAD only after EOS
        assert EOS not in row[:2]
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])


def test_greedy_scores(decoder, memories) -> None:
    memory, mask = memories["caption"]
    out = _generate(decoder, memory, mask, max_length=8, length_penalty=0.5, return_scores=True)
    log_prob, length = _teacher_forced(decoder, memory, mask, out.sequences)
    torch.testing.assert_close(out.log_probs, log_prob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.scores, log_prob / length.float() ** 0.5, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("beams", [1, 3])
def test_allowed_tokens_fixed_length(decoder, memories, beams: int) -> None:
    """Grounding: exactly 4 tokens, all from the allowed bins (EOS not among them)."""
    memory, mask = memories["vqa"]
    bins = torch.arange(40, 52)
    outs = [
        _generate(decoder, memory, mask, num_beams=beams, min_length=4, max_length=4, allowed_token_ids=bins,
                  use_cache=use_cache, return_scores=True)
        for use_cache in (True, False)
    ]  # fmt: skip
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    seqs = outs[0].sequences
    assert seqs.shape == (3, 4) and torch.isin(seqs, bins).all()
    log_prob, _ = _teacher_forced(decoder, memory, mask, seqs, allowed=bins)
    torch.testing.assert_close(outs[0].log_probs, log_prob, atol=1e-4, rtol=1e-4)  # renormalised over bins


def test_allowed_tokens_with_eos_and_eos_free_decoding(decoder, memories) -> None:
    memory, mask = memories["caption"]
    allowed = torch.tensor([EOS, 17, 27, 50])
    out = _generate(decoder, memory, mask, num_beams=3, max_length=8, allowed_token_ids=allowed)
    assert torch.isin(out, torch.cat([allowed, torch.tensor([PAD])])).all()
    with torch.no_grad():
        decoder.head.bias[EOS] += 100.0  # EOS would win at once
    try:
        assert _generate(decoder, memory, mask, max_length=5).tolist() == [[EOS]] * 4
        for beams in (1, 3):  # no end token: [SEP] is an ordinary token, every row runs to max_length
            out = _generate(decoder, memory, mask, num_beams=beams, max_length=5, eos_token_id=None)
            assert out.shape == (4, 5) and (out != PAD).all()
    finally:
        with torch.no_grad():
            decoder.head.bias[EOS] -= 100.0


def test_rejects_bad_new_arguments(decoder, memories) -> None:
    memory, mask = memories["caption"]
    with pytest.raises(ValueError, match="num_return_sequences"):
        _generate(decoder, memory, mask, num_beams=3, num_return_sequences=4)
    with pytest.raises(ValueError, match="num_return_sequences"):
        _generate(decoder, memory, mask, num_return_sequences=2)
    for bad in (
        torch.tensor([3, 96]),
        torch.tensor([], dtype=torch.long),
        torch.tensor([[3]]),
        torch.tensor([3.0]),
    ):
        with pytest.raises(ValueError, match="allowed_token_ids"):
            _generate(decoder, memory, mask, allowed_token_ids=bad)


# ---- the decoder's shared memory and cache ------------------------------------------------------
def test_shared_memory_equals_copied_memory(decoder, memories) -> None:
    """N = B * r sequences against a (B, M, D) memory == the same against the memory repeated per
    row (the beams fold into the cross-attention query axis)."""
    memory, mask = memories["vqa"]
    r, length = 4, 6
    ids = torch.randint(3, 96, (3 * r, length), generator=torch.Generator().manual_seed(3))
    ids_mask = torch.ones_like(ids)
    ids_mask[1, 4:] = 0
    rows = torch.arange(3).repeat_interleave(r)
    with torch.no_grad():
        shared, _ = decoder(ids, ids_mask, memory, mask)
        copied, _ = decoder(ids, ids_mask, memory[rows], mask[rows])
    torch.testing.assert_close(shared, copied, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 3"):
        decoder(ids[:5], ids_mask[:5], memory, mask)


@pytest.mark.parametrize("capacity", [0, 2, 8])
def test_cached_steps_equal_full_forward(decoder, memories, capacity: int) -> None:
    """Token-by-token decoding through the cache (buffers preallocated, or grown from too small)
    gives the full forward's hidden states; reorder keeps the chosen rows."""
    from mplug.text import LayerCache

    memory, mask = memories["caption"]
    ids = torch.randint(3, 96, (8, 7), generator=torch.Generator().manual_seed(4))  # 2 per item
    with torch.no_grad():
        full, _ = decoder(ids, torch.ones_like(ids), memory, mask)
        cache = [LayerCache(capacity=capacity) for _ in decoder.layer]
        steps = []
        for t in range(ids.shape[1]):
            out, cache = decoder(ids[:, t : t + 1], torch.ones_like(ids[:, : t + 1]), memory, mask,
                                 cache=cache, use_cache=True)  # fmt: skip
            steps.append(out)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # Swap the two sequences of every item, then decode one more token.
        swap = torch.arange(8).view(4, 2).flip(1).flatten()
        for c in cache:
            c.reorder(swap)
        nxt = torch.full((8, 1), 5)
        after, _ = decoder(nxt, torch.ones(8, 8, dtype=torch.long), memory, mask, cache=cache, use_cache=True)
        ref, _ = decoder(torch.cat([ids[swap], nxt], 1), torch.ones(8, 8, dtype=torch.long), memory, mask)
    torch.testing.assert_close(after[:, 0], ref[:, -1], atol=1e-5, rtol=1e-5)


# ---- teacher-forced sequence scoring -------------------------------------------------------------
def test_sequence_log_probs(decoder, memories) -> None:
    """k candidates per item, memory shared: equals per-token log-softmax sums over the memory
    repeated per candidate; padding does not count; gradients reach the decoder."""
    memory, mask = memories["vqa"]
    k = 3
    g = torch.Generator().manual_seed(5)
    targets = torch.randint(3, 96, (3 * k, 5), generator=g)
    targets[:, 0] = BOS
    target_mask = torch.ones_like(targets)
    target_mask[0, 3:] = 0
    target_mask[4, 2:] = 0
    targets = targets.masked_fill(target_mask == 0, PAD)
    logp = sequence_log_probs(decoder, memory, mask, targets, target_mask)
    rows = torch.arange(3).repeat_interleave(k)
    hidden, _ = decoder(targets, target_mask, memory[rows], mask[rows])
    tok = decoder.logits(hidden[:, :-1]).log_softmax(-1).gather(-1, targets[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, (tok * target_mask[:, 1:]).sum(1), atol=1e-5, rtol=1e-5)
    longer = torch.cat([targets, torch.full((3 * k, 2), PAD)], 1)
    longer_mask = torch.cat([target_mask, torch.zeros(3 * k, 2, dtype=torch.long)], 1)
    torch.testing.assert_close(sequence_log_probs(decoder, memory, mask, longer, longer_mask), logp)
    decoder.zero_grad(set_to_none=True)
    logp.sum().backward()
    grad = decoder.layer[0].crossattention.self.key.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    decoder.zero_grad(set_to_none=True)


# ---- through the model: MPlugForPretraining.generate ---------------------------------------------
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
    with torch.no_grad():
        memory, mask = model.decoder_memory(images)  # the memory both searches decoded against

    def logprob(seqs: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([torch.full((seqs.shape[0], 1), CLS), seqs], 1)
        valid = torch.cat([torch.ones(seqs.shape[0], 1, dtype=torch.long), (seqs != PAD).long()], 1)
        return sequence_log_probs(model.text_decoder, memory, mask, ids, valid)

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
