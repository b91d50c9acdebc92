"""mPLUG for visual question answering, as the official `model_vqa_mplug.py` builds it.

question → text encoder → fusion with the image → the decoder generates the answer while
cross-attending to [fused visual; fused question]. Training: each distinct answer of a question
is a target sequence weighted by its share of the human answers; the loss of a sequence is the
sum of its token cross-entropies, and the weighted sum is averaged over questions. Inference:
open-ended beam search (official: beam 5, at most 10 tokens), or ranking a given answer list
(official `rank_answer`: top-k candidates by first-token probability, re-scored by full-sequence
likelihood).

The official model also distils from momentum copies of all four towers; this one trains on the
human answers alone (no momentum copies: half the parameters in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mplug.config import MPlugConfig
from mplug.generation import generate as _generate
from mplug.generation import sequence_log_probs
from mplug.modeling import MPlugPreTrainedModel


@dataclass
class MPlugVQAOutput:
    """loss: () weighted answer NLL averaged over questions; answer_nll: (N,) per target answer."""

    loss: torch.Tensor
    answer_nll: torch.Tensor


class MPlugForQuestionAnswering(MPlugPreTrainedModel):
    """Vision tower, text encoder, fusion and answer decoder."""

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__(config)
        self._build_vision()
        self._build_text()
        self._build_fusion()
        self._build_decoder()
        self.post_init()

    def question_memory(
        self, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's memory: [fused visual; fused question] (B, Lv + Lq, D) and its mask."""
        memory, memory_mask, _ = self.fused_memory(self.encode_image(images), question_ids, question_mask)
        return memory, memory_mask

    def forward(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        answer_weights: torch.Tensor,
    ) -> MPlugVQAOutput:
        """images (B, 3, H, W); question_ids/mask (B, Lq); answer_ids/mask (B, A, La): up to A
        answers per question as `[CLS] answer [SEP] [PAD]*`; answer_weights (B, A): each answer's
        weight, 0 for padding slots."""
        memory, memory_mask = self.question_memory(images, question_ids, question_mask)
        question, slot = (answer_weights > 0).nonzero(as_tuple=True)  # (N,), (N,): the real answers
        nll = -sequence_log_probs(
            self.text_decoder, memory[question], memory_mask[question],
            answer_ids[question, slot], answer_mask[question, slot],
        )  # fmt: skip
        loss = (answer_weights[question, slot].float() * nll).sum() / images.shape[0]
        return MPlugVQAOutput(loss, nll.detach())

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        num_beams: int = 5,
        max_length: int = 10,
        min_length: int = 1,
    ) -> torch.Tensor:
        """Open-ended answers: (B, T) ids without the leading [CLS], ending in [SEP]."""
        memory, memory_mask = self.question_memory(images, question_ids, question_mask)
        cfg = self.config
        return _generate(
            self.text_decoder, memory, memory_mask, bos_token_id=cfg.cls_token_id, eos_token_id=cfg.sep_token_id,
            pad_token_id=cfg.pad_token_id_text, num_beams=num_beams, max_length=max_length, min_length=min_length,
        )  # fmt: skip

    @torch.no_grad()
    def rank_answers(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
        candidate_mask: torch.Tensor,
        k: int = 128,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick answers from a fixed list (official `rank_answer`). candidate_ids/mask (C, La)
        `[CLS] answer [SEP]`. The k candidates whose first token is likeliest are re-scored by
        their whole sequence's log-likelihood. Returns (B, k) candidate indices, best first, and
        their probabilities (softmax over the k sequence likelihoods)."""
        memory, memory_mask = self.question_memory(images, question_ids, question_mask)
        b, c = memory.shape[0], candidate_ids.shape[0]
        k = min(k, c)
        start = torch.full((b, 1), self.config.cls_token_id, dtype=torch.long, device=memory.device)
        hidden, _ = self.text_decoder(start, torch.ones_like(start), memory, memory_mask)
        first = self.text_decoder.logits(hidden[:, 0]).float().log_softmax(-1)  # (B, V)
        first_logp = first.index_select(1, candidate_ids[:, 1])  # (B, C) log p(first token)
        top_logp, top = first_logp.topk(k, dim=1)  # (B, k)
        ids, mask = candidate_ids[top.flatten()], candidate_mask[top.flatten()]  # (B*k, La), question-major
        # The decoder reads each question's memory for its k consecutive candidates: no copies.
        rest = -sequence_log_probs(self.text_decoder, memory, memory_mask, ids, mask)
        # The full sequence's NLL includes the first token; the official code adds the first
        # token's log-probability again (chain rule over its own top-k step): keep that scoring.
        scores = (top_logp.flatten() - rest).view(b, k)
        probs, order = scores.softmax(-1).topk(k, dim=1)
        return torch.gather(top, 1, order), probs
