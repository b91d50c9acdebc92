"""Greedy and beam-search decoding for the mPLUG text decoder, and teacher-forced sequence scoring.

The decoder starts from [CLS] and cross-attends to a fixed memory (visual tokens, or fused
[visual; prompt]). The memory and its cross-attention keys/values exist once per item: the beams
of an item are consecutive rows that share them (`TextDecoder` folds them into the query axis),
so nothing the size of the memory is copied per beam or reordered per step. With the cache each
step feeds only the newest token into preallocated key/value buffers; without it the whole
prefix is re-run (same result, used to test the cache).

Beam search is vectorised over items and beams; it keeps the semantics of the loop it replaced
(pinned by tests/unit/test_generation.py): per step the 2K best continuations are read in order,
an EOS continuation becomes a finished hypothesis (at most K per item, scored sum log-prob /
length ** length_penalty), the first K others stay live, and an item is done once it has K
finished hypotheses; at max_length its live beams count as hypotheses too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mplug.text import LayerCache, TextDecoder


class GenerationOutput(NamedTuple):
    """sequences: (B * n, T) ids without BOS, the n hypotheses of item i in rows i*n .. i*n+n-1,
    best first, PAD after EOS (rows an item has no hypothesis for are all PAD, score -inf).
    scores: (B * n,) the search score, sum log-prob / length ** length_penalty.
    log_probs: (B * n,) summed log-probability of each sequence (EOS included)."""

    sequences: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor


class _Stepper:
    """Feeds the decoder and returns next-token log-probabilities for N = B * r sequences."""

    def __init__(
        self,
        decoder: TextDecoder,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        use_cache: bool,
        max_length: int,
        allowed_token_ids: torch.Tensor | None,
    ):
        self.decoder, self.memory, self.memory_mask = decoder, memory, memory_mask
        # One buffer per layer, sized for the whole decode: BOS + max_length - 1 fed tokens.
        self.cache = [LayerCache(capacity=max_length) for _ in decoder.layer] if use_cache else None
        self.logit_mask = None
        if allowed_token_ids is not None:  # additive: 0 on the allowed ids, -inf elsewhere
            vocab = decoder.embeddings.word_embeddings.num_embeddings
            self.logit_mask = torch.full((vocab,), -float("inf"), device=memory.device)
            self.logit_mask[allowed_token_ids.to(memory.device)] = 0.0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, T) so far -> log-probs (N, V) for position T."""
        mask = torch.ones_like(tokens)
        if self.cache is not None:
            new = tokens[:, self.cache[0].length :]  # (N, 1) after the first step
            hidden, _ = self.decoder(
                new, mask, self.memory, self.memory_mask, cache=self.cache, use_cache=True
            )
        else:
            hidden, _ = self.decoder(tokens, mask, self.memory, self.memory_mask)
        logits = self.decoder.logits(hidden[:, -1]).float()  # (N, V)
        if self.logit_mask is not None:
            logits = logits + self.logit_mask  # renormalised over the allowed ids, as training sees them
        return logits.log_softmax(-1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep sequences `rows` (surviving beams, each within its own item) in the cache."""
        if self.cache is not None:
            for c in self.cache:
                c.reorder(rows)


@torch.no_grad()
def generate(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    bos_token_id: int,
    eos_token_id: int | None,
    pad_token_id: int,
    num_beams: int = 1,
    max_length: int = 20,
    min_length: int = 1,
    length_penalty: float = 1.0,
    use_cache: bool = True,
    num_return_sequences: int = 1,
    allowed_token_ids: torch.Tensor | None = None,
    return_scores: bool = False,
) -> torch.Tensor | GenerationOutput:
    """memory (B, M, D), memory_mask (B, M) -> generated ids (B * num_return_sequences, T),
    T <= max_length, without BOS; with `return_scores` a `GenerationOutput` (ids, search scores,
    summed log-probs).

    max_length / min_length count generated tokens (EOS included); EOS is forbidden before
    min_length; `eos_token_id=None` never stops early (exactly max_length tokens). Greedy when
    num_beams == 1. Beam search ranks finished hypotheses by sum log-prob / length **
    length_penalty and returns the best `num_return_sequences` (<= num_beams) per item, best
    first. `allowed_token_ids` (1-D) restricts decoding to those ids (the log-probs are
    renormalised over them); include EOS among them to allow stopping.
    """
    _check_arguments(decoder, num_beams, max_length, min_length, num_return_sequences, allowed_token_ids)
    if num_beams == 1:
        out = greedy_search(
            decoder, memory, memory_mask, bos_token_id, eos_token_id, pad_token_id,
            max_length, min_length, use_cache, length_penalty, allowed_token_ids,
        )  # fmt: skip
    else:
        out = beam_search(
            decoder, memory, memory_mask, bos_token_id, eos_token_id, pad_token_id,
            num_beams, max_length, min_length, length_penalty, use_cache,
            num_return_sequences, allowed_token_ids,
        )  # fmt: skip
    return out if return_scores else out.sequences


def _check_arguments(
    decoder: TextDecoder,
    num_beams: int,
    max_length: int,
    min_length: int,
    num_return_sequences: int,
    allowed_token_ids: torch.Tensor | None,
) -> None:
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
    if not 1 <= min_length <= max_length:
        raise ValueError(
            f"need 1 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}"
        )
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"num_return_sequences={num_return_sequences} must lie in [1, num_beams={num_beams}]"
        )
    if allowed_token_ids is not None:
        vocab = decoder.embeddings.word_embeddings.num_embeddings
        ids = allowed_token_ids
        if (
            ids.dim() != 1
            or ids.numel() == 0
            or ids.is_floating_point()
            or ids.min() < 0
            or ids.max() >= vocab
        ):
            raise ValueError(
                f"allowed_token_ids must be a non-empty 1-D integer tensor of ids in [0, {vocab}), "
                f"got shape {tuple(ids.shape)}, dtype {ids.dtype}"
            )


def greedy_search(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    bos: int,
    eos: int | None,
    pad: int,
    max_length: int,
    min_length: int,
    use_cache: bool,
    length_penalty: float = 1.0,
    allowed_token_ids: torch.Tensor | None = None,
) -> GenerationOutput:
    b, dev = memory.shape[0], memory.device
    step = _Stepper(decoder, memory, memory_mask, use_cache, max_length, allowed_token_ids)
    tokens = torch.full((b, 1), bos, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    log_prob = torch.zeros(b, device=dev)  # (B,) summed over generated tokens, EOS included
    length = torch.zeros(b, dtype=torch.long, device=dev)
    for t in range(max_length):
        logp = step(tokens)  # (B, V)
        if eos is not None and t + 1 < min_length:
            logp[:, eos] = -float("inf")
        nxt = logp.argmax(-1)
        log_prob += logp.gather(1, nxt[:, None]).squeeze(1).masked_fill(done, 0.0)
        length += (~done).long()
        nxt = nxt.masked_fill(done, pad)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos is not None:
            done |= nxt == eos
        if done.all():
            break
    scores = log_prob.double() / length.double() ** length_penalty
    return GenerationOutput(tokens[:, 1:], scores.float(), log_prob)


def beam_search(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    bos: int,
    eos: int | None,
    pad: int,
    k: int,
    max_length: int,
    min_length: int,
    length_penalty: float,
    use_cache: bool,
    num_return_sequences: int = 1,
    allowed_token_ids: torch.Tensor | None = None,
) -> GenerationOutput:
    b, dev = memory.shape[0], memory.device
    step = _Stepper(decoder, memory, memory_mask, use_cache, max_length, allowed_token_ids)
    tokens = torch.full((b * k, 1), bos, dtype=torch.long, device=dev)  # beams of item i: rows i*k..
    # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
    scores = torch.full((b, k), -float("inf"), device=dev)  # (B, K) summed log-probs of live beams
    scores[:, 0] = 0.0
    finished = _Finished(b, k, max_length, pad, dev)
    for t in range(max_length):
        logp = step(tokens)  # (B*K, V)
        if eos is not None and t + 1 < min_length:
            logp[:, eos] = -float("inf")
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(b, k * vocab)  # (B, K*V)
        top_scores, top_idx = cand.topk(2 * k, dim=1)  # 2K: K non-EOS ones exist (unless restricted)
        beam, tok = top_idx // vocab, top_idx % vocab  # (B, 2K)
        row = torch.arange(b, device=dev)[:, None] * k + beam  # (B, 2K) source row of each candidate
        valid = top_scores > -float("inf")
        is_eos = valid & (tok == eos) if eos is not None else torch.zeros_like(valid)
        live = valid & ~is_eos
        live_rank = live.cumsum(1)  # (B, 2K) 1-based rank among the live candidates
        # Candidates are read in order until K live ones are kept; later ones are not looked at.
        read = live_rank - live.long() < k
        finished.add(tokens, row, is_eos & read, top_scores, t + 1, eos, length_penalty)
        scores, rows, new_tok = _next_beams(live & read, live_rank, top_scores, row, tok, k, pad)
        scores = scores.masked_fill(finished.done[:, None], -float("inf"))
        tokens = torch.cat([tokens[rows], new_tok[:, None]], dim=1)  # (B*K, t + 2)
        step.reorder(rows)
        if finished.done.all():
            break
    return finished.best(tokens[:, 1:], scores, length_penalty, num_return_sequences)


def _next_beams(
    keep: torch.Tensor,
    rank: torch.Tensor,
    top_scores: torch.Tensor,
    row: torch.Tensor,
    tok: torch.Tensor,
    k: int,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept candidates (B, 2K) become the K beams of each item, in rank order; missing beams
    are dead (score -inf, PAD, row = the item's first beam) so shapes stay (B*K).
    -> scores (B, K), source rows (B*K,), new tokens (B*K,)."""
    b = keep.shape[0]
    slot = torch.where(keep, rank - 1, k)  # (B, 2K); slot K collects the candidates not kept
    first_row = (torch.arange(b, device=row.device) * k)[:, None]

    def place(values: torch.Tensor, fill: torch.Tensor | float | int) -> torch.Tensor:
        out = torch.empty(b, k + 1, dtype=values.dtype, device=values.device)
        out[:, :k] = fill
        return out.scatter(1, slot, values)[:, :k]  # (B, K)

    scores = place(top_scores, -float("inf"))
    rows = place(row, first_row)
    return scores, rows.flatten(), place(tok, pad).flatten()


class _Finished:
    """Finished hypotheses: at most K per item, in the order they finished."""

    def __init__(self, b: int, k: int, max_length: int, pad: int, device: torch.device):
        self.k, self.pad = k, pad
        self.tokens = torch.full((b, k, max_length), pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(b, k, dtype=torch.long, device=device)
        self.scores = torch.full((b, k), -float("inf"), dtype=torch.float64, device=device)
        self.log_probs = torch.full((b, k), -float("inf"), device=device)
        self.count = torch.zeros(b, dtype=torch.long, device=device)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)

    def add(
        self,
        tokens: torch.Tensor,
        row: torch.Tensor,
        ends: torch.Tensor,
        top_scores: torch.Tensor,
        length: int,
        eos: int | None,
        length_penalty: float,
    ) -> None:
        """Candidates `ends` (B, 2K) are EOS continuations of beams `row`: each becomes a
        hypothesis `tokens[row, 1:] + [EOS]` of `length` tokens, while its item has room."""
        ends = ends & ~self.done[:, None]
        rank = ends.cumsum(1)  # (B, 2K)
        ends = ends & (self.count[:, None] + rank <= self.k)
        if ends.any():
            item, cand = ends.nonzero(as_tuple=True)  # (F,), (F,)
            slot = self.count[item] + rank[item, cand] - 1
            self.tokens[item, slot, : length - 1] = tokens[row[item, cand], 1:]
            self.tokens[item, slot, length - 1] = eos
            self.lengths[item, slot] = length
            s = top_scores[item, cand]
            self.log_probs[item, slot] = s
            self.scores[item, slot] = s.double() / float(length) ** length_penalty
            self.count += ends.sum(1)
        self.done |= self.count >= self.k

    def best(
        self, live_tokens: torch.Tensor, live_scores: torch.Tensor, length_penalty: float, n: int
    ) -> GenerationOutput:
        """The n best hypotheses per item. Items not done also count their live beams: tokens
        (B*K, L) without EOS, summed log-probs (B, K)."""
        b, k = live_scores.shape
        length, width = live_tokens.shape[1], self.tokens.shape[2]
        live_scores = live_scores.masked_fill(self.done[:, None], -float("inf"))
        live = F.pad(live_tokens.view(b, k, length), (0, width - length), value=self.pad)
        # Finished first, then live beams, so on equal scores the earlier one wins (stable sort).
        tokens = torch.cat([self.tokens, live], 1)  # (B, 2K, max_length)
        lengths = torch.cat([self.lengths, torch.full_like(self.lengths, length)], 1)  # (B, 2K)
        scores = torch.cat([self.scores, live_scores.double() / float(length) ** length_penalty], 1)
        log_probs = torch.cat([self.log_probs, live_scores], 1)
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :n]  # (B, n)
        scores, log_probs = scores.gather(1, order).flatten(), log_probs.gather(1, order).flatten()
        missing = scores == -float("inf")  # (B*n,) an item with fewer than n hypotheses
        lengths = lengths.gather(1, order).flatten().masked_fill(missing, 0)
        sequences = tokens.gather(1, order[..., None].expand(b, n, width)).flatten(0, 1)  # (B*n, max_length)
        sequences = sequences.masked_fill(missing[:, None], self.pad)
        return GenerationOutput(sequences[:, : max(int(lengths.max()), 1)], scores.float(), log_probs)


def sequence_log_probs(
    decoder: TextDecoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced log-probability of given sequences -> (N,), differentiable.

    memory (B, M, D), memory_mask (B, M); target_ids / target_mask (N, T), N a multiple of B:
    `[BOS] tokens [EOS] [PAD]*`, the N / B candidates of item i in rows i*N/B .. (i+1)*N/B - 1,
    sharing the item's memory (it is not copied per candidate). Returns the summed log-probability
    of tokens 1 .. T-1 where target_mask is 1 (BOS is given, not scored).
    """
    hidden, _ = decoder(target_ids, target_mask, memory, memory_mask)  # (N, T, D)
    scored = target_mask[:, 1:].bool()  # (N, T-1): token t+1 is predicted from positions <= t
    logits = decoder.logits(hidden[:, :-1][scored]).float()  # (P, V), padding skipped
    token_logp = -F.cross_entropy(logits, target_ids[:, 1:][scored], reduction="none")  # (P,)
    rows = scored.nonzero(as_tuple=True)[0]
    return token_logp.new_zeros(target_ids.shape[0]).index_add(0, rows, token_logp)
