"""mPLUG classifiers over fused image-text states: SNLI-VE (image + hypothesis → entailment /
neutral / contradiction) and NLVR2 (two images + a statement → true / false).

SNLI-VE, as ALBEF's visual-entailment head: the fused [CLS] → Linear(D, 2D) → ReLU → Linear(2D, 3).

NLVR2 (`num_images = 2`): the statement is fused with each image separately by the same
(pretrained) fusion encoder, and the two fused [CLS] states, concatenated in image order, go
through Linear(2D, D) → ReLU → Linear(D, 2). Why this and not ALBEF's split of the fusion
layers between the two images: it keeps the pretrained fusion exactly as pretraining trained it
(ALBEF's split needs an extra "text-assignment" pretraining stage to learn which image a fusion
layer reads), costs the same FLOPs (two fused passes of one image each instead of one pass of
two), and the classifier still sees both images at once, in order, so "left"/"right"
statements stay decidable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mplug.config import MPlugConfig
from mplug.modeling import MPlugPreTrainedModel, ones_mask


@dataclass
class MPlugClassifierOutput:
    """logits: (B, num_labels); loss: () cross-entropy, or None without labels."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class MPlugForImageTextClassification(MPlugPreTrainedModel):
    """Vision tower, text encoder, fusion and an MLP over `num_images` fused [CLS] states."""

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__(config)
        self._build_vision()
        self._build_text()
        self._build_fusion()
        width, n = config.text_config.hidden_size, config.num_images
        hidden = 2 * width if n == 1 else width  # ALBEF's VE head widens; the pair head narrows
        self.cls_head = nn.Sequential(
            nn.Linear(n * width, hidden), nn.ReLU(), nn.Linear(hidden, config.num_labels)
        )
        self.post_init()

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> MPlugClassifierOutput:
        """images (B, 3, H, W), or (B, num_images, 3, H, W); input_ids/attention_mask (B, L);
        labels (B,) int64 (optional)."""
        n = self.config.num_images
        if images.dim() == 4:
            images = images[:, None]
        if images.shape[1] != n:
            raise ValueError(
                f"this model classifies {n} image(s) per example, got images {tuple(images.shape)}"
            )
        b = images.shape[0]
        visual = self.encode_image(images.flatten(0, 1))  # (B·n, Lv, D), image j of row i at i·n + j
        text = self.encode_text(input_ids, attention_mask).repeat_interleave(n, dim=0)
        mask = attention_mask.repeat_interleave(n, dim=0)
        fused, _ = self.fuse(text, mask, visual, ones_mask(visual))
        logits = self.cls_head(fused[:, 0].reshape(b, -1))  # (B, n·D) -> (B, labels)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return MPlugClassifierOutput(logits, loss)
