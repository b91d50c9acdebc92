"""Cross-modal fusion, as mPLUG §3 describes it, plus the two designs the paper compares with.

skip (mPLUG): layer n is *connected attention* when n != 0 and n % S == 0, else *asymmetric
    co-attention*.
    - Asymmetric co-attention: text self-attention, text -> visual cross-attention, FFN. The long
      visual sequence only supplies keys/values: visual tokens leave the layer unchanged, which is
      where the saving comes from.
    - Connected attention: concatenate [visual; text], one self-attention + FFN shared by both
      (no cross-attention), split. Text takes the new text; visual becomes old visual + new
      visual (the cross-modal skip connection).
merged: every layer is a plain connected layer over [visual; text] (single-stream, as in
    UNITER/VisualBERT); both streams take the new states, no extra visual residual.
coattention: two streams (ALBEF/METER-style): in every layer text self-attends, cross-attends to
    visual and runs its FFN, while visual does the same towards text (separate weights in
    `visual_layer`), both reading the layer's input states.
"""

from __future__ import annotations

import torch
from torch import nn

from mplug.config import MPlugConfig
from mplug.text import BertBlock, attention_mask


class FusionEncoder(nn.Module):
    """Fuses text (B, Lt, D) with visual tokens (B, Lv, D); both already at the text width."""

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__()
        self.mode = config.fusion_mode
        connected = set(config.connected_layer_indices())
        # Connected layers carry no cross-attention: the official code builds one there and never runs it.
        self.layer = nn.ModuleList(
            [
                BertBlock(config.text_config, cross_attention=n not in connected)
                for n in range(config.fusion_layers)
            ]
        )
        self._connected = tuple(sorted(connected))
        self.visual_layer = (
            nn.ModuleList(
                [BertBlock(config.text_config, cross_attention=True) for _ in range(config.fusion_layers)]
            )
            if self.mode == "coattention"
            else None
        )

    @property
    def connected_layer_indices(self) -> list[int]:
        """Indices of layers that run connected attention over [visual; text]."""
        return list(self._connected)

    def forward(
        self,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        visual_hidden: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, Lt, D), text_mask (B, Lt), visual (B, Lv, D), visual_mask (B, Lv) -> (text, visual)."""
        return self.layer_states(text_hidden, text_mask, visual_hidden, visual_mask)[-1]

    def layer_states(
        self,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        visual_hidden: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Like `forward`, but returns (text, visual) after every layer (for inspection and tests)."""
        lv = visual_hidden.shape[1]
        text_self = attention_mask(text_mask)  # (B, 1, 1, Lt)
        text_to_visual = attention_mask(visual_mask)  # (B, 1, 1, Lv)
        joint = attention_mask(torch.cat([visual_mask, text_mask], dim=1))  # (B, 1, 1, Lv + Lt)
        t, v = text_hidden, visual_hidden
        states = []
        for n, layer in enumerate(self.layer):
            if n in self._connected:
                out, _ = layer(torch.cat([v, t], dim=1), joint)  # (B, Lv + Lt, D)
                new_v, t = out[:, :lv], out[:, lv:]
                v = v + new_v if self.mode == "skip" else new_v
            elif self.visual_layer is not None:
                t_new, _ = layer(t, text_self, v, text_to_visual)
                v, _ = self.visual_layer[n](v, text_to_visual, t, text_self)
                t = t_new
            else:  # asymmetric co-attention: visual tokens only supply keys/values
                t, _ = layer(t, text_self, v, text_to_visual)
            states.append((t, v))
        return states
