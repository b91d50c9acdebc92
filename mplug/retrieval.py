"""mPLUG for image-text retrieval, as ALBEF/mPLUG finetune it (official `model_retrieval_mplug.py`).

Training: ITC with momentum encoders, queues and distillation, where every caption of the same
image is a positive (rows carry an integer image id; the queue remembers the ids of its keys),
plus ITM with one hard negative image and text per pair drawn from the contrastive
similarities (never another caption of the same image). Loss = ITC + ITM.

Inference (`pipelines/eval/retrieval.py`): ITC similarity for all pairs, then the top k
candidates of each query re-scored by the ITM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mplug.config import MPlugConfig
from mplug.modeling import ContrastiveKeys, MPlugContrastiveModel, frame_count


@dataclass
class MPlugRetrievalOutput:
    """loss = loss_itc + loss_itm; keys: the step's momentum keys for `momentum_update`."""

    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    keys: ContrastiveKeys | None = None


class MPlugForRetrieval(MPlugContrastiveModel):
    """Vision and text towers, fusion, ITC projections (+ momentum copies, queues with image
    ids) and the ITM head."""

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__(config)
        self._build_contrastive(itc=True, itm=True, id_queue=True)
        self.post_init()
        self.sync_momentum()

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        alpha: float = 0.0,
        keys: ContrastiveKeys | None = None,
        key_offset: int = 0,
        itm_hard_negatives: bool = True,
    ) -> MPlugRetrievalOutput:
        """images (B, 3, H, W) or videos (B, T, 3, H, W), input_ids/attention_mask (B, L), image_ids (B,) int64: rows with
        one id are captions of one image. keys/key_offset: the step's momentum keys
        (`gather_keys`), by default this batch's own, gathered over ranks. itm_hard_negatives=False
        draws ITM's negatives uniformly from the batch (other captions of the image excluded)."""
        visual = self.encode_image(images)
        text = self.encode_text(input_ids, attention_mask)
        if keys is None:
            batch = {"images": images, "input_ids": input_ids, "attention_mask": attention_mask}
            keys, offsets = self.gather_keys([batch], [image_ids])
            key_offset = offsets[0]
        loss_itc, sim_i2t = self._itc(visual, text, keys, key_offset, alpha, image_ids, frame_count(images))
        loss_itm = self._itm_loss(visual, text, attention_mask, sim_i2t, itm_hard_negatives)
        return MPlugRetrievalOutput(loss_itc + loss_itm, loss_itc, loss_itm, keys)
