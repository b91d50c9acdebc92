"""Pretraining objectives as pure functions: ITC (with queue and distillation), ITM
hard-negative sampling, MLM masking, PrefixLM splitting.

Random choices use the torch RNG, so every epoch masks and splits differently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TEMP_MIN, TEMP_MAX = 0.001, 0.5


# ---- ITC ---------------------------------------------------------------------------------
# Gathers a no-grad feature batch over the data-parallel ranks -> (all ranks' rows concatenated,
# offset of this rank's first row). The training side passes one in (`pipelines/distributed.py`);
# the library itself stays free of torch.distributed.
FeatureGather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def local_features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The `FeatureGather` of one process: its own rows, at offset 0."""
    return x, 0


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m_all: torch.Tensor,
    text_feat_m_all: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    offset: int,
    temp: torch.Tensor,
    alpha: float,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-text contrastive loss with momentum keys, queues and momentum distillation.

    image_feat, text_feat: (B, E) online features of this rank, L2-normalised.
    *_m_all: (B_global, E) momentum features gathered over ranks; *_m: (B, E) this rank's.
    *_queue: (E, Q) queued momentum features. offset: index of this rank's first row in the
    gathered batch (the positives). positives: optional (B, B_global + Q) bool, True where a key
    is a positive of the query (retrieval: every caption of the query's image, as ALBEF/mPLUG
    finetune it); the target then spreads evenly over a query's positives. Returns the mean over
    this rank's pairs of (i2t + t2i) / 2; averaged over ranks this equals the loss of one process
    holding the whole batch.
    """
    text_keys = torch.cat([text_feat_m_all.t(), text_queue], dim=1)  # (E, B_global + Q)
    image_keys = torch.cat([image_feat_m_all.t(), image_queue], dim=1)  # (E, B_global + Q)
    b = image_feat.shape[0]
    if positives is None:
        targets = torch.zeros(b, text_keys.shape[1], device=image_feat.device, dtype=image_feat.dtype)
        targets[torch.arange(b), offset + torch.arange(b)] = 1.0  # (B, B_global + Q)
    else:
        targets = positives.to(image_feat.dtype)
        targets = targets / targets.sum(1, keepdim=True)
    if alpha > 0:
        with torch.no_grad():  # momentum distillation: soften targets with the momentum model
            targets_i2t = alpha * F.softmax(image_feat_m @ text_keys / temp, dim=1) + (1 - alpha) * targets
            targets_t2i = alpha * F.softmax(text_feat_m @ image_keys / temp, dim=1) + (1 - alpha) * targets
    else:
        targets_i2t = targets_t2i = targets
    sim_i2t = image_feat @ text_keys / temp  # (B, B_global + Q)
    sim_t2i = text_feat @ image_keys / temp
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def distill_alpha(alpha: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Distillation weight: ramped linearly from 0 to `alpha` over the first epoch (official recipe)."""
    if epoch > 0 or steps_per_epoch <= 0:
        return alpha
    return alpha * min(1.0, step / steps_per_epoch)


# ---- ITM ---------------------------------------------------------------------------------
NO_NEGATIVE = -1  # a query whose every other candidate is excluded (all captions of one image)


def negative_weights(sim: torch.Tensor, hard: bool = True) -> torch.Tensor:
    """(B, B) sampling weights of each query's negatives: the softmax of the similarities (hard)
    or uniform, exactly 0 on the positive (diagonal) and on excluded candidates (entries at -inf:
    other captions of the query's image). A small floor keeps every allowed candidate possible."""
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    allowed = torch.isfinite(sim) & ~eye
    logits = sim.float() if hard else torch.zeros_like(sim, dtype=torch.float32)
    logits = logits.masked_fill(~allowed, -float("inf"))
    weights = F.softmax(logits, dim=1).nan_to_num(0.0)  # a row with nothing allowed: all 0
    return (weights + 1e-6) * allowed


def sample_hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, hard: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image one negative text, for each text one negative image, drawn from the softmax
    of the in-batch similarities (hard=False: uniformly), never the positive and never an excluded
    candidate (-inf: another caption of the same image). sim_*: (B, B) -> indices (B,), (B,);
    `NO_NEGATIVE` where a query has no allowed candidate (its batch holds no other image)."""
    with torch.no_grad():
        out = []
        for sim in (sim_i2t, sim_t2i):
            weights = negative_weights(sim, hard)
            has = weights.sum(1) > 0
            drawn = torch.multinomial(weights.masked_fill(~has[:, None], 1.0), 1).squeeze(1)
            out.append(drawn.masked_fill(~has, NO_NEGATIVE))
    return out[0], out[1]


# ---- MLM ---------------------------------------------------------------------------------
def special_tokens_mask(input_ids: torch.Tensor, special_ids: tuple[int, ...]) -> torch.Tensor:
    """True where the token is one of `special_ids` ([CLS], [SEP], [PAD], ...)."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for tok in special_ids:
        special |= input_ids == tok
    return special


def mask_tokens(
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    probability: float,
    mask_token_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the non-special, non-pad tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with -100 where unpicked).
    At least one token per batch is picked, so the loss is always defined."""
    eligible = ~special_tokens_mask(input_ids, special_ids) & attention.bool()
    picked = (torch.rand(input_ids.shape, device=input_ids.device) < probability) & eligible
    if not picked.any() and eligible.any():
        first = eligible.nonzero()[0]
        picked[first[0], first[1]] = True
    labels = input_ids.masked_fill(~picked, -100)
    roll = torch.rand(input_ids.shape, device=input_ids.device)
    masked = input_ids.masked_fill(picked & (roll < 0.8), mask_token_id)
    randomise = picked & (roll >= 0.8) & (roll < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, device=input_ids.device)
    masked = torch.where(randomise, random_ids, masked)
    return masked, labels


# ---- PrefixLM ----------------------------------------------------------------------------
def split_prefix(
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    word_start: torch.Tensor,
    cls_token_id: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split every caption at a random word boundary.

    input_ids/attention (B, L) are `[CLS] w... [SEP] [PAD]*`; word_start (V,) bool marks tokens
    that begin a word (not `##` continuations). The cut k is drawn uniformly among word starts
    at positions 2..n-1 (n = caption length incl. [SEP]), so both sides hold at least one word
    (the prefix may be empty when the caption has a single word).
    Returns prefix ids/mask (B, L) = `[CLS] w_1..w_{k-1} [PAD]*` and target ids/mask (B, L) =
    `[CLS] w_k .. [SEP] [PAD]*`: the decoder reads the target shifted and predicts the rest.
    """
    b, seq = input_ids.shape
    pos = torch.arange(seq, device=input_ids.device)[None]  # (1, L)
    length = attention.sum(1, keepdim=True)  # (B, 1) incl. [CLS] and [SEP]
    starts = word_start.to(input_ids.device)[input_ids] & (pos >= 2) & (pos < length - 1)  # (B, L)
    # Captions with one word have no admissible cut: cut at 1 (empty prefix, whole caption decoded).
    starts[:, 1] |= ~starts.any(1)
    scores = torch.rand(b, seq, device=input_ids.device).masked_fill(~starts, -1.0)
    cut = scores.argmax(1, keepdim=True)  # (B, 1) first target token
    prefix_mask = (pos < cut).long() * attention
    prefix_ids = input_ids.masked_fill(prefix_mask == 0, pad_token_id)
    # Target: [CLS] then tokens cut..end, left-aligned.
    src = (pos - 1 + cut).clamp(max=seq - 1)  # (B, L) where target position j reads from
    target_ids = torch.gather(input_ids, 1, src)
    target_mask = torch.gather(attention, 1, src) * (pos - 1 + cut < seq).long()
    target_ids[:, 0] = cls_token_id
    target_mask[:, 0] = 1
    target_ids = target_ids.masked_fill(target_mask == 0, pad_token_id)
    return prefix_ids, prefix_mask, target_ids, target_mask
