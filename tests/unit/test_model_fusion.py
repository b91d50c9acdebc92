"""FusionEncoder: shapes, masks, and the skip invariant at the right layer indices."""

from __future__ import annotations

import pytest
import torch

from mplug import MPlugConfig
from mplug.fusion import FusionEncoder

pytestmark = pytest.mark.unit

B, LT, LV = 2, 7, 17


def _fusion(mode: str = "skip", stride: int = 3, layers: int = 6) -> tuple[FusionEncoder, MPlugConfig]:
    cfg = MPlugConfig.preset(
        "tiny",
        fusion_mode=mode,
        fusion_stride=stride,
        fusion_layers=layers,
        text_config={"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
        vision_config={"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
    )
    torch.manual_seed(0)
    return FusionEncoder(cfg).eval(), cfg


def _inputs(width: int = 32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    text = torch.randn(B, LT, width, generator=g)
    text_mask = torch.ones(B, LT, dtype=torch.long)
    text_mask[1, 4:] = 0  # second caption is padded
    visual = torch.randn(B, LV, width, generator=g)
    return text, text_mask, visual, torch.ones(B, LV, dtype=torch.long)


@pytest.mark.parametrize("mode", ["skip", "merged", "coattention"])
def test_shapes(mode: str) -> None:
    fusion, _ = _fusion(mode)
    text_out, visual_out = fusion(*_inputs())
    assert text_out.shape == (B, LT, 32) and visual_out.shape == (B, LV, 32)
    assert torch.isfinite(text_out).all() and torch.isfinite(visual_out).all()


@pytest.mark.parametrize(("stride", "expected"), [(3, [3]), (6, []), (2, [2, 4]), (1, [1, 2, 3, 4, 5])])
def test_skip_invariant(stride: int, expected: list[int]) -> None:
    """Visual tokens pass asymmetric layers unchanged and change exactly at connected layers."""
    fusion, _ = _fusion("skip", stride)
    assert fusion.connected_layer_indices == expected
    text, text_mask, visual, visual_mask = _inputs()
    states = fusion.layer_states(text, text_mask, visual, visual_mask)
    previous = visual
    changed = []
    for n, (_, v) in enumerate(states):
        if not torch.equal(v, previous):
            changed.append(n)
        previous = v
    assert changed == expected
    # Connected layers have no cross-attention module; asymmetric ones do.
    for n, layer in enumerate(fusion.layer):
        assert (layer.crossattention is None) == (n in expected)


def test_connected_layer_adds_visual_residual() -> None:
    """skip: visual_out = visual_in + new visual from the shared layer; merged: just the new visual."""
    skip, _ = _fusion("skip", stride=1, layers=2)
    merged, _ = _fusion("merged", layers=2)
    # Make merged's layer 0 identical to skip's layer 1 (both connected, same weights).
    merged.layer[0].load_state_dict(skip.layer[1].state_dict())
    text, text_mask, visual, visual_mask = _inputs()
    t0, v0 = skip.layer_states(text, text_mask, visual, visual_mask)[0]
    assert torch.equal(v0, visual)
    _, v1 = skip.layer_states(text, text_mask, visual, visual_mask)[1]
    _, new_v = merged.layer_states(t0, text_mask, visual, visual_mask)[0]
    torch.testing.assert_close(v1, visual + new_v)


@pytest.mark.parametrize("mode", ["merged", "coattention"])
def test_alternatives_update_visual_every_layer(mode: str) -> None:
    fusion, _ = _fusion(mode)
    text, text_mask, visual, visual_mask = _inputs()
    previous = visual
    for _, v in fusion.layer_states(text, text_mask, visual, visual_mask):
        assert not torch.equal(v, previous)
        previous = v
    if mode == "coattention":
        assert fusion.visual_layer is not None and len(fusion.visual_layer) == 6


@pytest.mark.parametrize("mode", ["skip", "merged", "coattention"])
def test_padding_is_masked(mode: str) -> None:
    """Changing padded text positions changes nothing at real positions, nor visual tokens."""
    fusion, _ = _fusion(mode)
    text, text_mask, visual, visual_mask = _inputs()
    t1, v1 = fusion(text, text_mask, visual, visual_mask)
    noisy = text.clone()
    noisy[1, 4:] += 5.0
    t2, v2 = fusion(noisy, text_mask, visual, visual_mask)
    torch.testing.assert_close(t1[1, :4], t2[1, :4])
    torch.testing.assert_close(t1[0], t2[0])
    torch.testing.assert_close(v1, v2)
