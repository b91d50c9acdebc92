"""CLIP-style ViT on timm, and the one position-embedding resampler.

timm's `VisionTransformer` with `pre_norm=True` (CLIP's `ln_pre`, bias-free patch conv),
class token, quick-GELU and no head is CLIP's visual tower without the output projection;
`forward_features` returns every token after the final LayerNorm (`ln_post`), CLS included,
which is what mPLUG feeds the fusion.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mplug.config import MPlugConfig, MPlugVisionConfig


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """THE resampler: (1, 1 + h*w, D) -> (1, 1 + grid[0]*grid[1], D), class position kept,
    patch grid resized bilinearly as the official code does. Used at load and at run time."""
    old = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if old * old != pos_embed.shape[1] - 1:
        raise ValueError(f"position table of {pos_embed.shape[1]} rows is not 1 + a square grid")
    if (old, old) == tuple(grid):
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, new_size=list(grid), old_size=[old, old], num_prefix_tokens=1,
        interpolation="bilinear", antialias=False,
    )  # fmt: skip


def sincos_position_table(grid: int, width: int) -> torch.Tensor:
    """MAE's fixed 2-D position code -> (grid * grid, width), rows in row-major patch order: the
    first half of the channels encodes the column, the second the row, each as sines and cosines
    at `width / 4` frequencies from 1 to 1/10000 per patch."""
    if width % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (W/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.flatten().double()[:, None] * omega[None]  # (grid², W/4)
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([code(cols), code(rows)], dim=1).float()


class CLIPVisionTransformer(VisionTransformer):
    """timm ViT configured as CLIP's visual tower; any image size (multiple of the patch) works."""

    def __init__(self, config: MPlugVisionConfig) -> None:
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.hidden_size,
            depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            mlp_ratio=config.intermediate_size / config.hidden_size,
            class_token=True,
            pre_norm=True,
            global_pool="",
            num_classes=0,
            act_layer=config.hidden_act,
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
            drop_path_rate=config.drop_path_rate,
            # NHWC patches, any input size: the grid is known when position embeddings are added.
            dynamic_img_size=True,
        )

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape  # (B, H/p, W/p, D)
        pos = resize_pos_embed(self.pos_embed, (h, w))  # (1, 1 + h*w, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        return self.pos_drop(x + pos.to(x.dtype))

    # HF's `gradient_checkpointing_enable` flips every module's `gradient_checkpointing`;
    # map it onto timm's own switch.
    @property
    def gradient_checkpointing(self) -> bool:
        return self.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.grad_checkpointing = value


class VisualAdapter(nn.Module):
    """Linear(vision width -> text width) + LayerNorm + Dropout (official `visn_fc`,
    `visn_layer_norm`, `dropout`), used when the ViT is wider than the text side."""

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__()
        width = config.text_config.hidden_size
        self.fc = nn.Linear(config.vision_config.hidden_size, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(config.text_config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.fc(x)))
