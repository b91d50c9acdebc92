"""Greedy and beam-search decoding for the mPLUG text decoder, with a key/value cache.

The decoder starts from [CLS] and cross-attends to a fixed memory (visual tokens, or fused
[visual; prompt]). With the cache each step feeds only the newest token; without it the whole
prefix is re-run (same result, used to test the cache).
"""

from __future__ import annotations

import torch

from mplug.text import LayerCache, TextDecoder


class _Stepper:
    """Feeds one new token per sequence and returns next-token log-probabilities."""

    def __init__(
        self, decoder: TextDecoder, memory: torch.Tensor, memory_mask: torch.Tensor, use_cache: bool
    ):
        self.decoder, self.memory, self.memory_mask, self.use_cache = decoder, memory, memory_mask, use_cache
        self.cache: list[LayerCache] | None = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, T) so far -> log-probs (N, V) for position T."""
        mask = torch.ones_like(tokens)
        if self.use_cache:
            step_ids = tokens if self.cache is None else tokens[:, -1:]
            hidden, self.cache = self.decoder(
                step_ids, mask, self.memory, self.memory_mask, cache=self.cache, use_cache=True
            )
        else:
            hidden, _ = self.decoder(tokens, mask, self.memory, self.memory_mask)
        return self.decoder.logits(hidden[:, -1]).float().log_softmax(-1)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (surviving beams) of the memory and the cache."""
        self.memory, self.memory_mask = self.memory[index], self.memory_mask[index]
        if self.cache is not None:
            self.cache = [c.reorder(index) for c in self.cache]


def generate(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    num_beams: int = 1,
    max_length: int = 20,
    min_length: int = 1,
    length_penalty: float = 1.0,
    use_cache: bool = True,
) -> torch.Tensor:
    """memory (B, M, D), memory_mask (B, M) -> generated ids (B, T), T <= max_length, without BOS.

    max_length / min_length count generated tokens (EOS included); EOS is forbidden before
    min_length. Beam search ranks finished hypotheses by sum log-prob / length ** length_penalty.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
    if not 1 <= min_length <= max_length:
        raise ValueError(
            f"need 1 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}"
        )
    if num_beams == 1:
        return greedy_search(
            decoder,
            memory,
            memory_mask,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            max_length,
            min_length,
            use_cache,
        )
    return beam_search(
        decoder, memory, memory_mask, bos_token_id, eos_token_id, pad_token_id,
        num_beams, max_length, min_length, length_penalty, use_cache,
    )  # fmt: skip


def greedy_search(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    bos: int,
    eos: int,
    pad: int,
    max_length: int,
    min_length: int,
    use_cache: bool,
) -> torch.Tensor:
    b = memory.shape[0]
    step = _Stepper(decoder, memory, memory_mask, use_cache)
    tokens = torch.full((b, 1), bos, dtype=torch.long, device=memory.device)
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    for t in range(max_length):
        logp = step(tokens)  # (B, V)
        if t + 1 < min_length:
            logp[:, eos] = -float("inf")
        nxt = logp.argmax(-1).masked_fill(done, pad)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    return tokens[:, 1:]


def beam_search(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    bos: int,
    eos: int,
    pad: int,
    k: int,
    max_length: int,
    min_length: int,
    length_penalty: float,
    use_cache: bool,
) -> torch.Tensor:
    b, dev = memory.shape[0], memory.device
    expand = torch.arange(b, device=dev).repeat_interleave(k)  # (B*K,) row -> batch item
    step = _Stepper(decoder, memory[expand], memory_mask[expand], use_cache)
    tokens = torch.full((b * k, 1), bos, dtype=torch.long, device=dev)
    # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
    scores = torch.full((b, k), -float("inf"), device=dev)
    scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    item_done = [False] * b
    for t in range(max_length):
        logp = step(tokens)  # (B*K, V)
        if t + 1 < min_length:
            logp[:, eos] = -float("inf")
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(b, k * vocab)  # (B, K*V)
        top_scores, top_idx = cand.topk(2 * k, dim=1)  # 2K so K non-EOS continuations always exist
        new_rows, new_tok, new_scores = [], [], []
        for i in range(b):
            kept: list[tuple[int, int, float]] = []
            for s, idx in zip(top_scores[i].tolist(), top_idx[i].tolist()):
                beam, tok = divmod(idx, vocab)
                row = i * k + beam
                if s == -float("inf"):
                    continue
                if tok == eos:
                    if not item_done[i] and len(finished[i]) < k:
                        seq = tokens[row, 1:].tolist() + [eos]
                        finished[i].append((s / len(seq) ** length_penalty, seq))
                    continue
                kept.append((row, tok, s))
                if len(kept) == k:
                    break
            if len(finished[i]) >= k:
                item_done[i] = True
            while len(kept) < k:  # pad with dead beams so shapes stay (B*K)
                kept.append((i * k, pad, -float("inf")))
            for row, tok, s in kept:
                new_rows.append(row)
                new_tok.append(tok)
                new_scores.append(s if not item_done[i] else -float("inf"))
        rows = torch.tensor(new_rows, device=dev)
        tokens = torch.cat([tokens[rows], torch.tensor(new_tok, device=dev)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=dev).view(b, k)
        step.reorder(rows)
        if all(item_done):
            break
    # Items that ran out of length: their live beams count as hypotheses too.
    for i in range(b):
        if item_done[i]:
            continue
        for beam in range(k):
            s = scores[i, beam].item()
            if s != -float("inf"):
                seq = tokens[i * k + beam, 1:].tolist()
                finished[i].append((s / len(seq) ** length_penalty, seq))
    best = [max(hyps, key=lambda h: h[0])[1] for hyps in finished]
    out = torch.full((b, max(len(s) for s in best)), pad, dtype=torch.long, device=dev)
    for i, seq in enumerate(best):
        out[i, : len(seq)] = torch.tensor(seq, device=dev)
    return out
