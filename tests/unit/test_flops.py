"""Analytic FLOPs (`mplug.flops`) against hand-computed values and against what torch dispatches.

The independent measurement is `torch.utils.flop_counter.FlopCounterMode` (through
`mplug.flops.measured_flops`) run on real modules: timm's ViT, transformers' BERT and the project's
`FusionEncoder`, at small widths so the tests stay fast.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mplug import flops

pytestmark = pytest.mark.unit


def stand_in_config(
    *,
    width: int = 768,
    intermediate: int = 3072,
    heads: int = 12,
    vocab: int = 30522,
    vision_width: int = 768,
    vision_layers: int = 12,
    image_size: int = 256,
    patch_size: int = 16,
    text_layers: int = 6,
    fusion_layers: int = 6,
    decoder_layers: int = 12,
    fusion_stride: int = 3,
    fusion_mode: str = "skip",
    use_visual_adapter: bool = False,
    embed_dim: int = 256,
    max_text_len: int = 30,
) -> SimpleNamespace:
    """The `MPlugConfig` fields `mplug.flops` reads, with mPLUG-base values by default."""
    vision = SimpleNamespace(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_width // 64),
        intermediate_size=4 * vision_width,
    )
    text = SimpleNamespace(
        hidden_size=width, intermediate_size=intermediate, vocab_size=vocab, num_attention_heads=heads
    )
    return SimpleNamespace(
        vision_config=vision,
        text_config=text,
        text_layers=text_layers,
        fusion_layers=fusion_layers,
        decoder_layers=decoder_layers,
        fusion_stride=fusion_stride,
        fusion_mode=fusion_mode,
        use_visual_adapter=use_visual_adapter,
        embed_dim=embed_dim,
        max_text_len=max_text_len,
        image_size=image_size,
        num_visual_tokens=(image_size // patch_size) ** 2 + 1,
    )


# --- hand-computed -----------------------------------------------------------------------------------


def test_fusion_layers_by_hand_at_width_4():
    # D = 4, F = 8, Lv = 3 visual tokens, Lt = 2 text tokens.
    # asymmetric: text self-attn 8·2·16 + 4·2²·4 = 320; cross-attn Q,O 4·2·16 = 128, K,V 4·3·16 = 192,
    #   QKᵀ+PV 4·2·3·4 = 96 → 416; FFN 4·2·4·8 = 256.  Total 992.
    assert flops.fusion_layer_flops("asymmetric", 3, 2, 4, 8) == 992
    # connected over L = 5: 8·5·16 + 4·25·4 + 4·5·4·8 = 640 + 400 + 640 = 1680.
    assert flops.fusion_layer_flops("connected", 3, 2, 4, 8) == 1680
    # co-attention: 992 for the text stream + visual stream: self 8·3·16 + 4·9·4 = 528;
    #   cross Q,O 4·3·16 = 192, K,V 4·2·16 = 128, products 4·3·2·4 = 96 → 416; FFN 4·3·4·8 = 384.
    assert flops.fusion_layer_flops("coattention", 3, 2, 4, 8) == 992 + 528 + 416 + 384


def test_fusion_total_sums_layer_kinds_by_hand():
    cfg = stand_in_config(width=4, intermediate=8, fusion_layers=6, fusion_stride=3)
    assert flops.fusion_layer_kinds(cfg) == ["asymmetric"] * 3 + ["connected"] + ["asymmetric"] * 2
    assert flops.fusion_flops(cfg, 3, 2) == 5 * 992 + 1680
    cfg.fusion_mode = "merged"
    assert flops.fusion_flops(cfg, 3, 2) == 6 * 1680
    cfg.fusion_mode = "coattention"
    assert flops.fusion_flops(cfg, 3, 2) == 6 * 2320


def test_vit_b16_at_224_matches_published_count():
    # timm lists ViT-B/16 at 224 as 17.6 GMACs = 35.2 GFLOPs (classifier head excluded, as here).
    cfg = stand_in_config(image_size=224)
    assert flops.vision_flops(cfg) == pytest.approx(35.2e9, rel=0.01)
    # by hand: patch conv 2·196·768·768, then 12 x (8·197·768² + 4·197²·768 + 4·197·768·3072)
    per_layer = 8 * 197 * 768**2 + 4 * 197**2 * 768 + 4 * 197 * 768 * 3072
    assert flops.vision_flops(cfg) == 2 * 196 * 768 * 768 + 12 * per_layer


def test_base_forward_parts_and_total():
    cfg = stand_in_config()  # mPLUG-base: ViT-B/16 at 256 → 257 tokens, 30 text tokens
    parts = flops.forward_flops(cfg)
    assert set(parts) == {*flops.PART_NAMES, "total"}
    assert parts["total"] == pytest.approx(sum(parts[p] for p in flops.PART_NAMES))
    # asymmetric layer at Lv = 257, Lt = 30 (D = 768, F = 3072), by hand
    asym = (
        (8 * 30 * 768**2 + 4 * 30**2 * 768)
        + (4 * 30 * 768**2 + 4 * 257 * 768**2 + 4 * 30 * 257 * 768)
        + 4 * 30 * 768 * 3072
    )
    conn = 8 * 287 * 768**2 + 4 * 287**2 * 768 + 4 * 287 * 768 * 3072
    assert parts["fusion"] == 5 * asym + conn
    # the vision tower dominates a base forward
    assert parts["vision"] > parts["fusion"] > parts["text_encoder"]


def test_larger_image_changes_only_the_visual_parts():
    cfg = stand_in_config()
    small, big = flops.forward_flops(cfg, image_size=256), flops.forward_flops(cfg, image_size=384)
    assert small["text_encoder"] == big["text_encoder"] and small["heads"] == big["heads"]
    for part in ("vision", "fusion", "decoder"):
        assert big[part] > small[part]


def test_visual_adapter_adds_one_linear_per_token():
    cfg = stand_in_config(vision_width=1024, vision_layers=2, patch_size=14, image_size=224)
    without = flops.vision_flops(cfg)
    cfg.use_visual_adapter = True
    assert flops.vision_flops(cfg) - without == 2 * 257 * 1024 * 768


# --- structure and ratios ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_visual_tokens", [257, 577])
def test_skip_is_cheaper_than_merged_and_coattention(num_visual_tokens):
    costs = {
        mode: flops.fusion_flops(stand_in_config(fusion_mode=mode), num_visual_tokens, 30)
        for mode in flops.FUSION_MODES
    }
    assert costs["skip"] < costs["merged"] < costs["coattention"]


def test_skip_over_merged_ratio_falls_as_visual_sequence_grows():
    skip, merged = stand_in_config(fusion_mode="skip"), stand_in_config(fusion_mode="merged")
    ratios = [flops.fusion_flops(skip, lv, 30) / flops.fusion_flops(merged, lv, 30) for lv in (50, 257, 577)]
    assert ratios[0] > ratios[1] > ratios[2]
    assert ratios[1] == pytest.approx(0.385, abs=0.005)
    assert ratios[2] == pytest.approx(0.331, abs=0.005)


def test_stride_at_least_layer_count_means_no_connected_layer():
    # mPLUG-large: S = 6 with 6 fusion layers leaves every layer asymmetric
    cfg = stand_in_config(fusion_stride=6)
    assert "connected" not in flops.fusion_layer_kinds(cfg)
    assert flops.fusion_flops(cfg, 577, 30) == 6 * flops.fusion_layer_flops("asymmetric", 577, 30, 768, 3072)
    cfg.fusion_stride = 100
    assert flops.fusion_flops(cfg, 577, 30) == 6 * flops.fusion_layer_flops("asymmetric", 577, 30, 768, 3072)


def test_merged_is_all_connected_and_stride_one_differs_only_in_layer_zero():
    merged, stride1 = stand_in_config(fusion_mode="merged"), stand_in_config(fusion_stride=1)
    assert flops.fusion_layer_kinds(merged) == ["connected"] * 6
    assert flops.fusion_layer_kinds(stride1) == ["asymmetric"] + ["connected"] * 5
    conn = flops.fusion_layer_flops("connected", 257, 30, 768, 3072)
    asym = flops.fusion_layer_flops("asymmetric", 257, 30, 768, 3072)
    assert flops.fusion_flops(merged, 257, 30) - flops.fusion_flops(stride1, 257, 30) == conn - asym


def test_pretraining_step_accounts_for_every_objective():
    cfg = stand_in_config()
    steps = flops.pretraining_step_breakdown(cfg)
    fwd = flops.forward_flops(cfg)
    assert steps["total"] == pytest.approx(sum(v for k, v in steps.items() if k != "total"))
    assert flops.pretraining_step_flops(cfg) == steps["total"]
    # encoders trained (3x), momentum copies forward only (1x)
    assert steps["encoders"] == pytest.approx(3 * (fwd["vision"] + fwd["text_encoder"]))
    assert steps["momentum"] > fwd["vision"] + fwd["text_encoder"]
    # ITM: the fusion on 3 pairs, trained
    assert steps["itm"] == pytest.approx(9 * fwd["fusion"], rel=1e-6)
    # more of the caption as prefix moves work from the decoder into the encoder and fusion
    assert flops.pretraining_step_flops(cfg, prefix_len=5) != flops.pretraining_step_flops(cfg, prefix_len=25)
    # queue similarities are a small share at base size
    no_queue = flops.pretraining_step_flops(cfg, queue_size=0)
    assert 0 < steps["total"] - no_queue < 0.01 * steps["total"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda cfg: flops.forward_flops(cfg, image_size=250), "image_size=250"),
        (lambda cfg: flops.pretraining_step_flops(cfg, prefix_len=30), "prefix_len=30"),
        (lambda cfg: flops.fusion_flops(cfg, 0, 30), "num_visual_tokens=0"),
        (lambda cfg: flops.fusion_layer_flops("cross", 3, 2, 4, 8), "'cross'"),
    ],
)
def test_bad_inputs_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call(stand_in_config())


def test_unknown_fusion_mode_is_an_error():
    with pytest.raises(ValueError, match="'parallel'"):
        flops.fusion_layer_kinds(stand_in_config(fusion_mode="parallel"))


# --- against torch's FLOP counter on real modules ----------------------------------------------------


def test_vision_formula_matches_timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    cfg = stand_in_config(vision_width=64, vision_layers=2, image_size=32, patch_size=8)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4, num_classes=0
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        measured = flops.measured_flops(lambda: vit.forward_features(images))
    assert measured == 2 * flops.vision_flops(cfg)


def test_text_and_decoder_formulas_match_transformers_bert():
    from transformers import BertConfig, BertLMHeadModel, BertModel

    cfg = stand_in_config(width=64, intermediate=128, heads=2, vocab=97, text_layers=2, decoder_layers=2)
    bert_kw = dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=2, vocab_size=97, num_hidden_layers=2
    )
    encoder = BertModel(BertConfig(**bert_kw), add_pooling_layer=False).eval()
    decoder = BertLMHeadModel(BertConfig(**bert_kw, is_decoder=True, add_cross_attention=True)).eval()
    text = torch.randint(0, 97, (3, 7))
    memory = torch.randn(3, 11, 64)
    with torch.no_grad():
        enc = flops.measured_flops(lambda: encoder(input_ids=text))
        dec = flops.measured_flops(lambda: decoder(input_ids=text, encoder_hidden_states=memory))
    assert enc == 3 * flops.text_encoder_flops(cfg, 7)
    assert dec == 3 * flops.decoder_flops(cfg, 7, 11)


def test_training_step_costs_about_three_forwards():
    # The 3x rule the MFU uses, checked on a BERT stack: backward ≈ 2x forward in matmul FLOPs.
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2),
        add_pooling_layer=False,
    )
    hidden = torch.randn(2, 16, 64, requires_grad=True)
    fwd = flops.measured_flops(lambda: model.encoder(hidden))
    both = flops.measured_flops(lambda: model.encoder(hidden).last_hidden_state.sum().backward())
    assert both / fwd == pytest.approx(3.0, rel=0.1)
