"""mPLUG for image captioning, as the official `model_caption_mplug.py` runs it: the decoder
cross-attends to the visual tokens alone (neither the text encoder nor the fusion runs).

Training has two stages of one model: cross-entropy on `[CLS] caption [SEP]` (mean over target
tokens), then self-critical sequence training (SCST, Rennie et al. 2017, as mPLUG and its
official `caption_mplug_scst.py` do it): beam-search n captions per image, reward each by its
CIDEr-D against the image's references, and push up the length-normalised log-probability of
those above the mean reward of the image's beams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mplug.config import MPlugConfig
from mplug.generation import generate as _generate
from mplug.generation import sequence_log_probs
from mplug.modeling import MPlugPreTrainedModel, ones_mask


@dataclass
class MPlugCaptionOutput:
    """loss: () mean cross-entropy over target tokens (CE stage) or the SCST loss."""

    loss: torch.Tensor


class MPlugForCaptioning(MPlugPreTrainedModel):
    """Vision tower and caption decoder."""

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__(config)
        self._build_vision()
        self._build_decoder()
        self.post_init()

    def visual_memory(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.encode_image(images)
        return visual, ones_mask(visual)

    def forward(
        self,
        images: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor,
        rewards: torch.Tensor | None = None,
    ) -> MPlugCaptionOutput:
        """images (B, 3, H, W); caption_ids/mask (B, L) `[CLS] caption [SEP] [PAD]*`: the
        cross-entropy loss. With `rewards` (B, n), caption_ids/mask (B*n, L) are n sampled
        captions per image and the loss is SCST's (`scst_loss`)."""
        if rewards is not None:
            return self.scst_loss(images, caption_ids, caption_mask, rewards)
        memory, memory_mask = self.visual_memory(images)
        hidden, _ = self.text_decoder(caption_ids, caption_mask, memory, memory_mask)
        valid = caption_mask[:, 1:].bool()
        logits = self.text_decoder.logits(hidden[:, :-1][valid])
        return MPlugCaptionOutput(F.cross_entropy(logits.float(), caption_ids[:, 1:][valid]))

    def scst_loss(
        self,
        images: torch.Tensor,
        sequences: torch.Tensor,
        sequence_mask: torch.Tensor,
        rewards: torch.Tensor,
    ) -> MPlugCaptionOutput:
        """images (B, 3, H, W); sequences/mask (B*n, L): the n sampled captions of each image as
        `[CLS] caption [SEP] [PAD]*`; rewards (B, n). Loss = −mean over captions of
        (log p(caption) / its length) × (reward − mean reward of the image's n captions)."""
        if sequences.shape[0] != rewards.numel():
            raise ValueError(f"{sequences.shape[0]} sampled captions but rewards {tuple(rewards.shape)}")
        memory, memory_mask = self.visual_memory(images)
        # The decoder reads each image's memory for its n consecutive captions: no copies.
        logp = sequence_log_probs(self.text_decoder, memory, memory_mask, sequences, sequence_mask)  # (B*n,)
        length = sequence_mask[:, 1:].sum(1).clamp(min=1)  # generated tokens, [SEP] included
        advantage = (rewards - rewards.mean(1, keepdim=True)).flatten().to(logp.dtype)
        return MPlugCaptionOutput(-((logp / length) * advantage).mean())

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        num_beams: int = 5,
        max_length: int = 25,
        min_length: int = 8,
        num_return_sequences: int = 1,
    ) -> torch.Tensor:
        """Captions (B * num_return_sequences, T) without the leading [CLS], best beam first."""
        memory, memory_mask = self.visual_memory(images)
        cfg = self.config
        kwargs = {"num_return_sequences": num_return_sequences} if num_return_sequences > 1 else {}
        out = _generate(
            self.text_decoder, memory, memory_mask, bos_token_id=cfg.cls_token_id, eos_token_id=cfg.sep_token_id,
            pad_token_id=cfg.pad_token_id_text, num_beams=num_beams, max_length=max_length, min_length=min_length,
            **kwargs,
        )  # fmt: skip
        return out[0] if isinstance(out, tuple) else out
