"""MPlugConfig: presets, derived values, validation errors that name the bad field."""

from __future__ import annotations

import pytest

from mplug import MPlugConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("name", "tokens", "connected", "adapter"),
    [("tiny", 65, [1], False), ("mini", 65, [2], False), ("base", 257, [3], False), ("large", 257, [], True)],
)
def test_presets(name: str, tokens: int, connected: list[int], adapter: bool) -> None:
    cfg = MPlugConfig.preset(name)
    assert cfg.num_visual_tokens == tokens
    assert cfg.connected_layer_indices() == connected
    assert cfg.use_visual_adapter is adapter
    assert cfg.text_config.vocab_size == 30522


def test_official_strides() -> None:
    assert MPlugConfig.preset("base").fusion_stride == 3
    large = MPlugConfig.preset("large")
    assert large.fusion_stride == 6 and large.fusion_layers == 6
    assert large.connected_layer_indices() == []  # S = 6 with six layers: no connected layer
    assert MPlugConfig.preset("base", fusion_stride=2).connected_layer_indices() == [2, 4]
    assert MPlugConfig.preset("base", fusion_mode="merged").connected_layer_indices() == list(range(6))
    assert MPlugConfig.preset("base", fusion_mode="coattention").connected_layer_indices() == []


def test_overrides_and_round_trip(tmp_path) -> None:
    cfg = MPlugConfig.preset("tiny", image_size=96, use_mlm=False, text_config={"hidden_dropout_prob": 0.2})
    assert cfg.image_size == 96 and cfg.num_visual_tokens == 145
    cfg.save_pretrained(tmp_path)
    back = MPlugConfig.from_pretrained(tmp_path)
    assert back.image_size == 96 and back.use_mlm is False
    assert back.text_config.hidden_dropout_prob == 0.2
    assert back.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"fusion_mode": "cross"}, "fusion_mode"),
        ({"use_visual_adapter": False}, "use_visual_adapter"),
        ({"image_size": 230}, "patch_size"),
        ({"max_text_len": 1000}, "max_text_len"),
        ({"temperature": 0.9}, "temperature"),
        ({"mlm_probability": 0.0}, "mlm_probability"),
        ({"use_itc": False, "use_itm": False, "use_mlm": False, "use_prefix": False}, "objectives"),
        ({"fusion_stride": 0}, "fusion_stride"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_invalid_combinations_name_the_field(overrides: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        MPlugConfig.preset("large", **overrides)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="valid presets"):
        MPlugConfig.preset("huge")
