"""mPLUG for visual grounding (referring expressions), as the official `model_grounding_mplug.py`
does it: the box is generated as text.

The expression is encoded and fused with the image; the decoder, cross-attending to [fused
visual; fused text], starts from a start token and emits four coordinate tokens: the
normalised (cx, cy, w, h) of the box in the padded square image, each quantised into one of
`box_bins` bins (official: 337 bins at 336 px, i.e. one per pixel edge). The official model uses
BERT's `[unused339]` as the start token and `[unused340]`… as the bins; decoding is restricted
to the bin tokens. Loss: each coordinate token's cross-entropy, weighted by the L1 error of the
greedily decoded coordinate (clamped to 5) and by (1 − GIoU) of the decoded box; mean.

The bins are 337 unrelated classes to the loss: bin 120 is as wrong as bin 5 when 121 is right.
`init_box_bins` (ours, `grounding.bin_init: ordinal`) starts their token rows from an ordinal
code, so neighbouring coordinates start with similar embeddings and logits; the official model
starts them from BERT's never-trained `[unused]` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mplug.config import MPlugConfig
from mplug.metrics import box_cxcywh_to_xyxy, generalized_box_iou
from mplug.modeling import MPlugPreTrainedModel

START_TOKEN_ID = 344  # BERT uncased `[unused339]` (ids 1-99 are [unused0-98], 104-1097 [unused99-992])
FIRST_BIN_TOKEN_ID = 345  # `[unused340]`


def ordinal_bin_code(num_bins: int, width: int, seed: int = 0) -> torch.Tensor:
    """(num_bins, width) unit rows whose similarity falls with the distance between bins: sines
    and cosines of the bin's place t in [0, 1] at `width / 2` frequencies from 1 to 8
    half-periods over the range (neighbours ~0.98 alike, bins a quarter apart ~0), turned by a
    fixed random rotation so no channel is special."""
    if width % 2:
        raise ValueError(f"an ordinal code needs an even width, got {width}")
    t = torch.linspace(0, 1, num_bins, dtype=torch.float64)[:, None]  # (N, 1)
    half = width // 2
    freqs = 8.0 ** (torch.arange(half, dtype=torch.float64) / max(1, half - 1))  # (W/2,) 1..8
    code = torch.cat([torch.sin(torch.pi * freqs * t), torch.cos(torch.pi * freqs * t)], dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(seed)))  # fmt: skip
    return F.normalize(code @ rotation, dim=1).float()


@dataclass
class MPlugGroundingOutput:
    """loss: () weighted coordinate-token cross-entropy; pred_boxes: (B, 4) greedy decoded
    normalised (cx, cy, w, h) under teacher forcing."""

    loss: torch.Tensor
    pred_boxes: torch.Tensor


class MPlugForGrounding(MPlugPreTrainedModel):
    """Vision tower, text encoder, fusion and the box decoder."""

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__(config)
        self.num_bins = config.box_bins or config.image_size + 1
        last = FIRST_BIN_TOKEN_ID + self.num_bins - 1
        if last >= config.text_config.vocab_size:
            raise ValueError(
                f"{self.num_bins} box bins need token ids up to {last}, beyond the vocabulary "
                f"({config.text_config.vocab_size}); lower box_bins"
            )
        self._build_vision()
        self._build_text()
        self._build_fusion()
        self._build_decoder()
        self.post_init()

    @torch.no_grad()
    def init_box_bins(self) -> None:
        """Give the bin tokens an ordinal code (`ordinal_bin_code`, scaled to the vocabulary's mean
        row norm) in the decoder's tied embedding / LM-head matrix, and equal LM-head biases."""
        weight = self.text_decoder.embeddings.word_embeddings.weight
        first, last = FIRST_BIN_TOKEN_ID, FIRST_BIN_TOKEN_ID + self.num_bins
        scale = weight.norm(dim=1).mean()
        weight[first:last] = ordinal_bin_code(self.num_bins, weight.shape[1]).to(weight) * scale
        self.text_decoder.head.bias[first:last] = 0.0

    def boxes_to_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) normalised boxes in [0, 1] -> (B, 4) bin token ids (floor(x · (bins − 1)))."""
        bins = (boxes.clamp(0, 1) * (self.num_bins - 1)).floor().long()
        return bins + FIRST_BIN_TOKEN_ID

    def tokens_to_boxes(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens - FIRST_BIN_TOKEN_ID).float() / (self.num_bins - 1)

    def _memory(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor):
        memory, memory_mask, _ = self.fused_memory(self.encode_image(images), text_ids, text_mask)
        return memory, memory_mask

    def _bin_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits with every token but the bins at -inf: decoding is restricted to them."""
        logits = self.text_decoder.logits(hidden).float()
        first, last = FIRST_BIN_TOKEN_ID, FIRST_BIN_TOKEN_ID + self.num_bins
        masked = torch.full_like(logits, -float("inf"))
        masked[..., first:last] = logits[..., first:last]
        return masked

    def forward(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        boxes: torch.Tensor,
        weighted: bool = True,
    ) -> MPlugGroundingOutput:
        """images (B, 3, S, S) letterboxed squares; text_ids/mask (B, L) the expression; boxes
        (B, 4) normalised (cx, cy, w, h) in the square. `weighted=False`: plain token
        cross-entropy, without the official L1 and (1 − GIoU) weights."""
        memory, memory_mask = self._memory(images, text_ids, text_mask)
        b = images.shape[0]
        targets = self.boxes_to_tokens(boxes)  # (B, 4)
        start = torch.full((b, 1), START_TOKEN_ID, dtype=torch.long, device=images.device)
        inputs = torch.cat([start, targets[:, :3]], dim=1)  # predict token t from positions < t
        hidden, _ = self.text_decoder(inputs, torch.ones_like(inputs), memory, memory_mask)
        logits = self._bin_logits(hidden)  # (B, 4, V)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, 4)
        with torch.no_grad():
            pred = self.tokens_to_boxes(logits.argmax(-1))
            l1 = F.l1_loss(pred, boxes.float(), reduction="none").clamp(0, 5)  # (B, 4)
            giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(boxes.float()))  # (B,)
        loss = (nll * l1 * (1 - giou)[:, None]).mean() if weighted else nll.mean()
        return MPlugGroundingOutput(loss, pred)

    @torch.no_grad()
    def predict_boxes(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Greedy decoding of the four coordinate tokens -> (B, 4) normalised (cx, cy, w, h)."""
        memory, memory_mask = self._memory(images, text_ids, text_mask)
        tokens = torch.full((images.shape[0], 1), START_TOKEN_ID, dtype=torch.long, device=images.device)
        cache = None
        for _ in range(4):
            step = tokens if cache is None else tokens[:, -1:]
            hidden, cache = self.text_decoder(
                step, torch.ones_like(tokens), memory, memory_mask, cache=cache, use_cache=True
            )
            tokens = torch.cat([tokens, self._bin_logits(hidden[:, -1]).argmax(-1, keepdim=True)], dim=1)
        return self.tokens_to_boxes(tokens[:, 1:])
