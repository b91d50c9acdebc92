"""Analytic FLOPs (`mplug.flops`) against hand-computed values and against what torch dispatches.

The independent measurement is `torch.utils.flop_counter.FlopCounterMode` (through
`mplug.flops.measured_flop_counts`) run on the project's real modules: the CLIP ViT and adapter, the
text encoder, the decoder, `FusionEncoder` in every mode and a whole `MPlugForPretraining` forward, at
the tiny preset's widths so the tests stay fast.
"""

from __future__ import annotations

import pytest
import torch

from mplug import flops
from mplug.config import MPlugConfig

pytestmark = pytest.mark.unit


def width4_config(**overrides) -> MPlugConfig:
    """Width D = 4 (FFN 8, one head) on both sides, so fusion counts can be done by hand."""
    return MPlugConfig.preset(
        "tiny",
        vision_config={"hidden_size": 4, "num_attention_heads": 1, "intermediate_size": 16},
        text_config={"hidden_size": 4, "num_attention_heads": 1, "intermediate_size": 8},
        fusion_layers=6,
        **overrides,
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
    skip = width4_config(fusion_stride=3)
    assert flops.fusion_layer_kinds(skip) == ["asymmetric"] * 3 + ["connected"] + ["asymmetric"] * 2
    assert flops.fusion_flops(skip, 3, 2) == 5 * 992 + 1680
    assert flops.fusion_flops(width4_config(fusion_mode="merged"), 3, 2) == 6 * 1680
    assert flops.fusion_flops(width4_config(fusion_mode="coattention"), 3, 2) == 6 * 2320


def test_vit_b16_at_224_matches_published_count():
    # timm lists ViT-B/16 at 224 as 17.6 GMACs = 35.2 GFLOPs (classifier head excluded, as here).
    cfg = MPlugConfig.preset("base", image_size=224)
    assert flops.vision_flops(cfg) == pytest.approx(35.2e9, rel=0.01)
    # by hand: patch conv 2·196·(3·16·16)·768, then 12 x (8·197·768² + 4·197²·768 + 4·197·768·3072)
    per_layer = 8 * 197 * 768**2 + 4 * 197**2 * 768 + 4 * 197 * 768 * 3072
    assert flops.vision_flops(cfg) == 2 * 196 * 768 * 768 + 12 * per_layer
    assert flops.vision_flops(MPlugConfig.preset("base"), image_size=224) == flops.vision_flops(cfg)


def test_base_forward_parts_by_hand():
    parts = flops.forward_flops(MPlugConfig.preset("base"), text_len=30)  # 256 px → 257 visual tokens
    assert set(parts) == {*flops.PART_NAMES, "total"}
    assert parts["total"] == pytest.approx(sum(parts[p] for p in flops.PART_NAMES))
    # asymmetric fusion layer at Lv = 257, Lt = 30 (D = 768, F = 3072): self-attn, cross-attn, FFN
    asym = (
        (8 * 30 * 768**2 + 4 * 30**2 * 768)
        + (4 * 30 * 768**2 + 4 * 257 * 768**2 + 4 * 30 * 257 * 768)
        + 4 * 30 * 768 * 3072
    )
    conn = 8 * 287 * 768**2 + 4 * 287**2 * 768 + 4 * 287 * 768 * 3072  # layer 3, over 257 + 30 tokens
    assert parts["fusion"] == 5 * asym + conn
    assert parts["text_encoder"] == 6 * (8 * 30 * 768**2 + 4 * 30**2 * 768 + 4 * 30 * 768 * 3072)
    # ITC projections 2·(2·768·256), ITM 2·768·2, MLM head on 15% of 30 tokens: 4.5 x (2·768² + 2·768·30522)
    assert parts["heads"] == 4 * 768 * 256 + 2 * 768 * 2 + 4.5 * (2 * 768**2 + 2 * 768 * 30522)
    # decoder: 12 x (self-attn over 30, cross-attn to 257 + 30, FFN) + LM head on 30 tokens
    dec_layer = (
        (8 * 30 * 768**2 + 4 * 30**2 * 768)
        + (4 * 30 * 768**2 + 4 * 287 * 768**2 + 4 * 30 * 287 * 768)
        + 4 * 30 * 768 * 3072
    )
    assert parts["decoder"] == 12 * dec_layer + 30 * (2 * 768**2 + 2 * 768 * 30522)
    assert parts["vision"] > parts["decoder"] > parts["fusion"] > parts["text_encoder"]


def test_larger_image_changes_only_the_visual_parts():
    cfg = MPlugConfig.preset("base")
    small, big = flops.forward_flops(cfg, image_size=256), flops.forward_flops(cfg, image_size=384)
    assert small["text_encoder"] == big["text_encoder"] and small["heads"] == big["heads"]
    for part in ("vision", "fusion", "decoder"):
        assert big[part] > small[part]


def test_large_adds_the_visual_adapter():
    cfg = MPlugConfig.preset("large")  # ViT-L/14 at 224 → 257 tokens of width 1024, adapter to 768
    per_layer = 8 * 257 * 1024**2 + 4 * 257**2 * 1024 + 4 * 257 * 1024 * 4096
    patch_conv = 2 * 256 * (3 * 14 * 14) * 1024
    assert flops.vision_flops(cfg) - patch_conv - 24 * per_layer == 2 * 257 * 1024 * 768


# --- structure and ratios ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_visual_tokens", [257, 577])
def test_skip_is_cheaper_than_merged_and_coattention(num_visual_tokens):
    costs = {
        mode: flops.fusion_flops(MPlugConfig.preset("base", fusion_mode=mode), num_visual_tokens, 30)
        for mode in flops.FUSION_MODES
    }
    assert costs["skip"] < costs["merged"] < costs["coattention"]


def test_skip_over_merged_ratio_falls_as_visual_sequence_grows():
    skip, merged = MPlugConfig.preset("base"), MPlugConfig.preset("base", fusion_mode="merged")
    ratios = [flops.fusion_flops(skip, lv, 30) / flops.fusion_flops(merged, lv, 30) for lv in (50, 257, 577)]
    assert ratios[0] > ratios[1] > ratios[2]
    assert ratios[1] == pytest.approx(0.385, abs=0.005)
    assert ratios[2] == pytest.approx(0.331, abs=0.005)


@pytest.mark.parametrize("stride", [6, 100])
def test_stride_at_least_layer_count_means_no_connected_layer(stride):
    # mPLUG-large: S = 6 with 6 fusion layers leaves every layer asymmetric
    cfg = MPlugConfig.preset("base", fusion_stride=stride)
    assert flops.fusion_layer_kinds(cfg) == ["asymmetric"] * 6
    assert flops.fusion_flops(cfg, 577, 30) == 6 * flops.fusion_layer_flops("asymmetric", 577, 30, 768, 3072)


def test_merged_is_all_connected_and_stride_one_differs_only_in_layer_zero():
    merged = MPlugConfig.preset("base", fusion_mode="merged")
    stride1 = MPlugConfig.preset("base", fusion_stride=1)
    assert flops.fusion_layer_kinds(merged) == ["connected"] * 6
    assert flops.fusion_layer_kinds(stride1) == ["asymmetric"] + ["connected"] * 5
    conn = flops.fusion_layer_flops("connected", 257, 30, 768, 3072)
    asym = flops.fusion_layer_flops("asymmetric", 257, 30, 768, 3072)
    assert flops.fusion_flops(merged, 257, 30) - flops.fusion_flops(stride1, 257, 30) == conn - asym


def test_pretraining_step_accounts_for_every_objective():
    cfg = MPlugConfig.preset("base")
    steps = flops.pretraining_step_breakdown(cfg, text_len=30)
    fwd = flops.forward_flops(cfg, text_len=30)
    assert steps["total"] == pytest.approx(sum(v for k, v in steps.items() if k != "total"))
    assert flops.pretraining_step_flops(cfg, text_len=30) == steps["total"]
    # encoders trained (3x), momentum copies forward only (1x)
    assert steps["vision"] == 3 * fwd["vision"] and steps["text_encoder"] == 3 * fwd["text_encoder"]
    assert (
        fwd["vision"] + fwd["text_encoder"] < steps["momentum"] < 1.01 * (fwd["vision"] + fwd["text_encoder"])
    )
    # ITM: the fusion on 3 pairs, trained
    assert steps["itm"] == pytest.approx(9 * fwd["fusion"], rel=1e-6)
    # PrefixLM: prefix and target each padded to 30 tokens, 12 target tokens predicted
    prefix = flops.pretraining_step_breakdown(cfg, text_len=30, prefix_lm_tokens=12)["prefix_lm"]
    assert prefix == 3 * (fwd["text_encoder"] + fwd["fusion"] + flops.decoder_flops(cfg, 30, 287, 12))
    # the ITC queue similarities are a small share at base size
    no_queue = flops.pretraining_step_flops(cfg, text_len=30, queue_size=0)
    assert 0 < steps["total"] - no_queue < 0.01 * steps["total"]
    # for MFU: about 3x a forward of every part, more for ITM's extra pairs
    assert 3 * fwd["total"] < steps["total"] < 6 * fwd["total"]


def test_switched_off_objectives_cost_nothing():
    cfg = MPlugConfig.preset("base", use_itc=False, use_itm=False, use_prefix=False)
    steps = flops.pretraining_step_breakdown(cfg, text_len=30)
    assert (
        steps["itc"] == steps["momentum"] == steps["itm"] == steps["prefix_lm"] == steps["text_encoder"] == 0
    )
    assert steps["total"] == steps["vision"] + steps["mlm"] > 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda cfg: flops.forward_flops(cfg, image_size=250), "image_size=250"),
        (lambda cfg: flops.pretraining_step_flops(cfg, text_len=30, mlm_tokens=31), "mlm_tokens=31"),
        (lambda cfg: flops.pretraining_step_flops(cfg, batch_size=0), "batch_size=0"),
        (lambda cfg: flops.fusion_flops(cfg, 0, 30), "num_visual_tokens=0"),
        (lambda cfg: flops.fusion_layer_flops("cross", 3, 2, 4, 8), "'cross'"),
    ],
)
def test_bad_inputs_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call(MPlugConfig.preset("base"))


# --- against torch's FLOP counter on the real modules -------------------------------------------------


def test_vision_formula_matches_the_vision_tower_and_adapter():
    from mplug.vision import CLIPVisionTransformer, VisualAdapter

    cfg = MPlugConfig.preset(
        "tiny",
        vision_config={"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256},
        use_visual_adapter=True,
    )
    vit, adapter = CLIPVisionTransformer(cfg.vision_config).eval(), VisualAdapter(cfg).eval()
    images = torch.randn(2, 3, 48, 48)  # not the config's 64 px: the count follows the run-time size
    with torch.no_grad():
        measured = flops.measured_flops(lambda: adapter(vit.forward_features(images)))
    assert measured == 2 * flops.vision_flops(cfg, image_size=48)


def test_text_encoder_and_decoder_formulas_match_the_modules():
    from mplug.text import TextDecoder, TextEncoder

    cfg = MPlugConfig.preset("tiny")
    encoder = TextEncoder(cfg.text_config, cfg.text_layers).eval()
    decoder = TextDecoder(cfg.text_config, cfg.decoder_layers).eval()
    ids, mask = torch.randint(0, 1000, (3, 7)), torch.ones(3, 7)
    memory, memory_mask = torch.randn(3, 11, 128), torch.ones(3, 11)

    def decode() -> torch.Tensor:
        hidden, _ = decoder(ids, mask, memory, memory_mask)
        return decoder.logits(hidden)

    with torch.no_grad():
        assert flops.measured_flops(lambda: encoder(ids, mask)) == 3 * flops.text_encoder_flops(cfg, 7)
        assert flops.measured_flops(decode) == 3 * flops.decoder_flops(cfg, 7, 11)


@pytest.mark.parametrize("mode", ["skip", "merged", "coattention"])
def test_fusion_formula_matches_the_fusion_encoder(mode):
    from mplug.fusion import FusionEncoder

    cfg = MPlugConfig.preset("tiny", fusion_mode=mode, fusion_layers=4, fusion_stride=2)
    fusion = FusionEncoder(cfg).eval()
    kinds = flops.fusion_layer_kinds(cfg)
    assert fusion.connected_layer_indices == [n for n, k in enumerate(kinds) if k == "connected"]
    lv, lt = cfg.num_visual_tokens, 9
    text, visual = torch.randn(2, lt, 128), torch.randn(2, lv, 128)
    with torch.no_grad():
        measured = flops.measured_flops(lambda: fusion(text, torch.ones(2, lt), visual, torch.ones(2, lv)))
    assert measured == 2 * flops.fusion_flops(cfg, lv, lt)


def test_training_step_costs_about_three_forwards():
    # The 3x rule behind the MFU, checked on the fusion: backward ≈ 2x forward in matmul FLOPs.
    from mplug.fusion import FusionEncoder

    cfg = MPlugConfig.preset("tiny", fusion_layers=3)
    fusion = FusionEncoder(cfg)
    text = torch.randn(2, 9, 128, requires_grad=True)
    visual = torch.randn(2, cfg.num_visual_tokens, 128, requires_grad=True)
    masks = (torch.ones(2, 9), torch.ones(2, cfg.num_visual_tokens))

    def step() -> None:
        t, v = fusion(text, masks[0], visual, masks[1])
        (t.sum() + v.sum()).backward()

    both = flops.measured_flops(step)
    assert both / flops.measured_flops(lambda: fusion(text, masks[0], visual, masks[1])) == pytest.approx(
        3, rel=0.1
    )


def test_pretraining_forward_matches_the_pretraining_model():
    # One forward of MPlugForPretraining (all four objectives, distillation on) counted by torch, against
    # the breakdown's forward share (trained parts / 3 + momentum). The MLM and PrefixLM vocabulary
    # heads score a random number of positions, so the test counts them separately and sets the
    # analytic head tokens to what ran.
    from mplug.modeling import MPlugForPretraining

    cfg = MPlugConfig.preset("tiny")
    model = MPlugForPretraining(cfg).eval()
    batch, b = model.example_inputs(4, seed=1), 4
    with torch.no_grad():
        counts = flops.measured_flop_counts(lambda: model(**batch, alpha=0.4))
    per_token = flops.lm_head_flops(cfg, 1)
    mlm_tokens = counts["MPlugForPretraining.mlm_head"] / per_token / b
    prefix_tokens = counts["MPlugForPretraining.text_decoder.head"] / per_token / b
    assert 0 < mlm_tokens * b <= b * cfg.max_text_len and mlm_tokens * b == int(mlm_tokens * b)
    assert 0 < prefix_tokens * b < b * cfg.max_text_len and prefix_tokens * b == int(prefix_tokens * b)
    steps = flops.pretraining_step_breakdown(
        cfg, batch_size=b, mlm_tokens=mlm_tokens, prefix_lm_tokens=prefix_tokens
    )
    forward = steps["momentum"] + sum(v for k, v in steps.items() if k not in ("momentum", "total")) / 3
    assert counts["Global"] == pytest.approx(b * forward, rel=1e-9)
    # the fusion runs 5 times per sample: 3 ITM pairs, MLM, PrefixLM
    assert counts["MPlugForPretraining.fusion_encoder"] == 5 * b * flops.fusion_flops(
        cfg, cfg.num_visual_tokens, cfg.max_text_len
    )
