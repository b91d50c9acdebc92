"""Analytic FLOPs of mPLUG, part by part, per sample.

Used for model FLOPs utilisation (MFU): the trainer divides `pretraining_step_flops(...) * samples/s`
by the accelerator's peak. Every figure is per sample (batch size 1) and per forward pass unless a
name says otherwise.

Conventions (the same as PaLM's MFU appendix and `torch.utils.flop_counter`):

* A multiply-add is 2 FLOPs. A linear map of `n` tokens from width `a` to width `b` costs `2·n·a·b`.
* Only matrix products are counted: linear layers, the patch convolution (a linear map of each
  `3·p·p` patch) and the two attention products `Q·Kᵀ` and `P·V` (`2·Lq·Lk·D` each, summed over
  heads). Softmax, LayerNorm, GELU, residual adds, biases, dropout and embedding look-ups are left
  out: each is O(L·D) element-wise work, against O(L·D²) for the matrix products, so at BERT-base
  width (D = 768, FFN 3072) they are under 2% of the total (about 10-20 element-wise ops per
  token-channel per layer, against 2·(4·D + 2·F) = 18,432 FLOPs per token-channel in the linear
  layers). They are also memory-bound, so their cost shows up as time, not FLOPs.
* Attention is counted dense: a causal or padding mask does not remove work from the kernels the
  model runs (SDPA with a mask computes the full score matrix), and that is what MFU should charge.
* Backward costs twice the forward (one product for the input gradient, one for the weight gradient),
  so a trained part costs 3x its forward and a momentum (no-grad) part 1x. This slightly over-counts
  products with a constant operand (the ITC queue, the first layer's input), well under 1% here.

The parts follow DESIGN.md §3 (official mPLUG):

* vision: CLIP ViT. Patch convolution over `(image/p)²` patches, then `num_hidden_layers` pre-norm
  blocks over `Lv = (image/p)² + 1` tokens (CLS included), each self-attention + FFN at width `Dv`,
  then (large) the visual adapter `Linear(Dv → D)` on every token. CLIP's output projection is unused.
* text_encoder: `text_layers` BERT layers (self-attention + FFN) over `Lt` tokens.
* fusion: `fusion_layers` layers at width `D`; see `fusion_layer_flops` for each layer kind.
* decoder: `decoder_layers` BERT layers over `Ld` target tokens, each causal self-attention,
  cross-attention to a memory of `Lm` tokens (visual + fused text) and FFN, then the LM head
  (BERT prediction transform `Linear(D → D)` + vocabulary decoder `Linear(D → V)`) on the
  positions that are predicted.
* heads: the ITC projections of the visual and text CLS (`Linear(D → embed_dim)` each), the ITM head
  on the fused CLS (`Linear(D → 2)`) and the MLM head (transform + vocabulary decoder) on the masked
  positions only, as `mplug.modeling` computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mplug.config import FUSION_MODES

if TYPE_CHECKING:
    from mplug.config import MPlugConfig

FUSION_LAYER_KINDS = ("asymmetric", "connected", "coattention")
PART_NAMES = ("vision", "text_encoder", "fusion", "decoder", "heads")

# RGB input: each patch the convolution sees holds 3·p·p values.
IMAGE_CHANNELS = 3
# Pretraining batch of DESIGN.md §3; with the queue it sizes the per-sample share of the ITC similarities.
DEFAULT_BATCH_SIZE = 256
# ITM scores the positive pair and two hard negatives (a negative image for the text, a negative text
# for the image), so the fusion runs on 3 pairs per sample.
ITM_PAIRS_PER_SAMPLE = 3


# ---------------------------------------------------------------------------------------------------
# Building blocks (exact integers for integer token counts; the part functions return floats)
# ---------------------------------------------------------------------------------------------------


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """`tokens` rows through `Linear(d_in → d_out)`: 2·tokens·d_in·d_out (exact for int `tokens`)."""
    return 2 * tokens * d_in * d_out


def attention_flops(q_len: int, kv_len: int, width: int, kv_width: int | None = None) -> int:
    """Multi-head attention of `q_len` queries over `kv_len` keys, all heads together.

    Q and output projections on the queries (2 · 2·Lq·D²), K and V projections on the keys
    (2 · 2·Lk·Dkv·D, `Dkv` = `kv_width`, the key tokens' width, default `width`), and the score and
    weighted-sum products `Q·Kᵀ`, `P·V` (2 · 2·Lq·Lk·D; head count does not matter, heads split D).
    Self-attention is `q_len == kv_len` over the same tokens: 8·L·D² + 4·L²·D.
    """
    kv_width = width if kv_width is None else kv_width
    projections = 2 * linear_flops(q_len, width, width) + 2 * linear_flops(kv_len, kv_width, width)
    products = 2 * (2 * q_len * kv_len * width)
    return projections + products


def ffn_flops(tokens: int, width: int, intermediate: int) -> int:
    """Position-wise FFN `Linear(D → F)`, GELU, `Linear(F → D)`: 4·L·D·F."""
    return linear_flops(tokens, width, intermediate) + linear_flops(tokens, intermediate, width)


def encoder_layer_flops(tokens: int, width: int, intermediate: int) -> int:
    """One BERT/ViT layer: self-attention + FFN over `tokens`: 8·L·D² + 4·L²·D + 4·L·D·F."""
    return attention_flops(tokens, tokens, width) + ffn_flops(tokens, width, intermediate)


# ---------------------------------------------------------------------------------------------------
# Structure read from the config
# ---------------------------------------------------------------------------------------------------


def visual_token_count(config: MPlugConfig, image_size: int | None = None) -> int:
    """Visual tokens `Lv = (image_size / patch_size)² + 1` (CLS included); the config's own when None."""
    if image_size is None:
        return int(config.num_visual_tokens)
    patch = config.vision_config.patch_size
    if image_size <= 0 or image_size % patch != 0:
        raise ValueError(
            f"image_size={image_size} must be a positive multiple of the patch size {patch} "
            f"(e.g. {patch * (224 // patch)})"
        )
    return (image_size // patch) ** 2 + 1


def fusion_layer_kinds(config: MPlugConfig) -> list[str]:
    """Kind of each fusion layer, in order: "asymmetric", "connected" or "coattention".

    * "skip" (mPLUG): layer n (0-based) is connected when n != 0 and n % fusion_stride == 0, else
      asymmetric. Base (S = 3, 6 layers): layer 3 connected. Large (S = 6, 6 layers): none.
    * "merged" (all-connected, single stream): every layer connected.
    * "coattention" (two streams, ALBEF/METER style, the "co-attention" of the paper's fusion
      comparison): every layer updates both streams.
    The connected layers come from `config.connected_layer_indices()`, the rule the model builds from.
    """
    if config.fusion_mode not in FUSION_MODES:
        raise ValueError(f"fusion_mode={config.fusion_mode!r} is not one of {FUSION_MODES}")
    if config.fusion_mode == "coattention":
        return ["coattention"] * config.fusion_layers
    connected = set(config.connected_layer_indices())
    return ["connected" if n in connected else "asymmetric" for n in range(config.fusion_layers)]


def fusion_layer_flops(
    kind: str, num_visual_tokens: int, text_len: int, width: int, intermediate: int
) -> int:
    """Forward FLOPs of one fusion layer of `kind` (see `fusion_layer_kinds`), Lv visual, Lt text tokens.

    * asymmetric co-attention: text self-attention over Lt, text→visual cross-attention (Lt queries,
      Lv keys/values: the K/V projections of the visual tokens, 4·Lv·D², run in every such layer and
      dominate at Lv >> Lt), FFN on the text only; the visual tokens pass through untouched.
        8·Lt·D² + 4·Lt²·D  +  4·Lt·D² + 4·Lv·D² + 4·Lt·Lv·D  +  4·Lt·D·F
    * connected attention: one self-attention and one FFN over the concatenation [visual; text] of
      L = Lv + Lt tokens (no cross-attention): 8·L·D² + 4·L²·D + 4·L·D·F.
    * co-attention (two streams): the asymmetric text update plus its mirror image for the visual
      stream (visual self-attention over Lv, visual→text cross-attention, FFN on the visual tokens):
        asymmetric(Lv, Lt) + [8·Lv·D² + 4·Lv²·D  +  4·Lv·D² + 4·Lt·D² + 4·Lv·Lt·D  +  4·Lv·D·F]
    """
    lv, lt, d, f = num_visual_tokens, text_len, width, intermediate

    def one_stream(queries: int, keys: int) -> int:
        # self-attention on the stream, cross-attention to the other stream, FFN on the stream
        return (
            attention_flops(queries, queries, d)
            + attention_flops(queries, keys, d)
            + ffn_flops(queries, d, f)
        )

    if kind == "asymmetric":
        return one_stream(lt, lv)
    if kind == "connected":
        return encoder_layer_flops(lv + lt, d, f)
    if kind == "coattention":
        return one_stream(lt, lv) + one_stream(lv, lt)
    raise ValueError(f"fusion layer kind {kind!r} is not one of {FUSION_LAYER_KINDS}")


# ---------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------


def _width(config: MPlugConfig) -> tuple[int, int]:
    return config.text_config.hidden_size, config.text_config.intermediate_size


def lm_head_flops(config: MPlugConfig, tokens: float) -> float:
    """BERT's LM prediction head on `tokens` positions (an expected count may be fractional):
    transform `Linear(D → D)` (+ GELU, LayerNorm), then the vocabulary decoder `Linear(D → V)`."""
    d, _ = _width(config)
    return float(linear_flops(tokens, d, d) + linear_flops(tokens, d, config.text_config.vocab_size))


def vision_flops(config: MPlugConfig, image_size: int | None = None) -> float:
    """CLIP ViT forward per image: patch conv + layers over Lv tokens (+ the visual adapter if used)."""
    vc = config.vision_config
    num_tokens = visual_token_count(config, image_size)
    patches = num_tokens - 1
    total = linear_flops(patches, IMAGE_CHANNELS * vc.patch_size**2, vc.hidden_size)
    total += vc.num_hidden_layers * encoder_layer_flops(num_tokens, vc.hidden_size, vc.intermediate_size)
    if config.use_visual_adapter:
        total += linear_flops(num_tokens, vc.hidden_size, config.text_config.hidden_size)
    return float(total)


def text_encoder_flops(config: MPlugConfig, text_len: int) -> float:
    """Text encoder forward: `text_layers` self-attention BERT layers over `text_len` tokens."""
    d, f = _width(config)
    return float(config.text_layers * encoder_layer_flops(text_len, d, f))


def fusion_flops(config: MPlugConfig, num_visual_tokens: int, text_len: int) -> float:
    """Fusion forward per image-text pair: the sum of `fusion_layer_flops` over `fusion_layer_kinds`."""
    if num_visual_tokens < 1 or text_len < 1:
        raise ValueError(f"num_visual_tokens={num_visual_tokens} and text_len={text_len} must both be >= 1")
    d, f = _width(config)
    return float(
        sum(fusion_layer_flops(k, num_visual_tokens, text_len, d, f) for k in fusion_layer_kinds(config))
    )


def decoder_flops(
    config: MPlugConfig, target_len: int, memory_len: int, predicted_tokens: float | None = None
) -> float:
    """Decoder forward: `decoder_layers` x (causal self-attention over `target_len` tokens,
    cross-attention to `memory_len` tokens, FFN), then the LM head on `predicted_tokens` positions
    (default all `target_len`; training computes logits only where a next token exists)."""
    d, f = _width(config)
    layer = (
        attention_flops(target_len, target_len, d)
        + attention_flops(target_len, memory_len, d)
        + ffn_flops(target_len, d, f)
    )
    predicted = target_len if predicted_tokens is None else predicted_tokens
    return float(config.decoder_layers * layer) + lm_head_flops(config, predicted)


def expected_mlm_tokens(config: MPlugConfig, text_len: int) -> float:
    """Positions the MLM head scores: the masked ones only (`mplug.modeling` picks them before the
    vocabulary matmul), `mlm_probability` of the caption; an upper bound, as [CLS]/[SEP]/padding are
    never masked."""
    return config.mlm_probability * text_len


def heads_flops(config: MPlugConfig, text_len: int) -> float:
    """ITC projections (visual and text CLS → embed_dim), ITM head (fused CLS → 2) and the MLM head on
    the `expected_mlm_tokens` masked positions."""
    d, _ = _width(config)
    itc = 2 * linear_flops(1, d, config.embed_dim)
    itm = linear_flops(1, d, 2)
    return float(itc + itm) + lm_head_flops(config, expected_mlm_tokens(config, text_len))


def forward_flops(
    config: MPlugConfig, image_size: int | None = None, text_len: int | None = None
) -> dict[str, float]:
    """One forward of each part per sample, keys `PART_NAMES` + "total".

    `image_size` defaults to the config's, `text_len` to `config.max_text_len`. Every text part sees
    `text_len` tokens; the decoder decodes `text_len` tokens, LM head on all of them, with a memory of
    the visual tokens plus `text_len` fused text tokens (the VQA shape: a question fused, an answer
    decoded). For a pretraining step, where parts run several times, use `pretraining_step_flops`.
    """
    lt = config.max_text_len if text_len is None else text_len
    lv = visual_token_count(config, image_size)
    parts = {
        "vision": vision_flops(config, image_size),
        "text_encoder": text_encoder_flops(config, lt),
        "fusion": fusion_flops(config, lv, lt),
        "decoder": decoder_flops(config, lt, lv + lt),
        "heads": heads_flops(config, lt),
    }
    parts["total"] = sum(parts.values())
    return parts


def pretraining_step_breakdown(
    config: MPlugConfig,
    image_size: int | None = None,
    text_len: int | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    queue_size: int | None = None,
    mlm_tokens: float | None = None,
    prefix_lm_tokens: float | None = None,
) -> dict[str, float]:
    """Training FLOPs (forward + backward) of one pretraining sample, by objective; "total" is the sum.

    Counted as `mplug.modeling.MPlugForPretraining` runs a step, every text tensor padded to
    `text_len` (default `config.max_text_len`): trained parts count 3x their forward, momentum
    parts 1x, and an objective switched off in the config (`use_itc`, `use_itm`, `use_mlm`,
    `use_prefix`) counts 0.

    * "vision": the image through the ViT (and adapter), once; every objective reuses its tokens.
    * "text_encoder": the caption through the text encoder, once, for ITC and ITM.
    * "itc": the two CLS projections, each sample's row of the image→text and text→image similarity
      matrices against the `batch_size` in-batch (global, gathered over data-parallel ranks) plus
      the `queue_size` queued features (2 · 2·E·(B + Q); Q defaults to `config.queue_size`), and
      its row of the in-batch similarity that picks hard negatives (2·E·B).
    * "momentum": for ITC, the momentum ViT, text encoder and projections, and the two momentum
      similarity rows that soften the targets (distillation, alpha > 0), forward only.
    * "itm": the fusion on 3 pairs (positive + hard-negative text + hard-negative image, reusing the
      encoders' outputs) and the ITM head on each fused CLS.
    * "mlm": the masked caption through the text encoder again, the fusion with the image, and the
      MLM head on `mlm_tokens` masked positions (default `expected_mlm_tokens`).
    * "prefix_lm": the prefix (padded to `text_len`) through the text encoder and the fusion, the
      decoder over the target (padded to `text_len`) with a memory of Lv + `text_len` tokens, and the
      LM head on `prefix_lm_tokens` predicted positions (default `text_len / 2`: the cut falls on a
      uniformly random word, so about half the caption is predicted).
    """
    lt = config.max_text_len if text_len is None else text_len
    queue = config.queue_size if queue_size is None else queue_size
    if batch_size < 1 or queue < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and queue_size={queue} >= 0")
    mlm_predicted = expected_mlm_tokens(config, lt) if mlm_tokens is None else mlm_tokens
    prefix_predicted = lt / 2 if prefix_lm_tokens is None else prefix_lm_tokens
    for name, value in (("mlm_tokens", mlm_predicted), ("prefix_lm_tokens", prefix_predicted)):
        if not 0 <= value <= lt:
            raise ValueError(f"{name}={value} must lie in [0, text_len={lt}]")
    lv = visual_token_count(config, image_size)
    d, e = _width(config)[0], config.embed_dim
    train, fwd_only = 3.0, 1.0

    vision = vision_flops(config, image_size)
    text = text_encoder_flops(config, lt)
    fusion = fusion_flops(config, lv, lt)
    projections = 2.0 * linear_flops(1, d, e)
    # one row of each of the two similarity matrices, against the B in-batch + Q queued features
    similarities = 2.0 * linear_flops(1, e, batch_size + queue)
    in_batch = float(linear_flops(1, e, batch_size))
    itm_head = float(linear_flops(1, d, 2))
    itc, itm, mlm, prefix = config.use_itc, config.use_itm, config.use_mlm, config.use_prefix

    breakdown = {
        "vision": train * vision,
        "text_encoder": train * text if (itc or itm) else 0.0,
        "itc": train * (projections + similarities + in_batch) if itc else 0.0,
        "momentum": fwd_only * (vision + text + projections + similarities) if itc else 0.0,
        "itm": train * ITM_PAIRS_PER_SAMPLE * (fusion + itm_head) if itm else 0.0,
        "mlm": train * (text + fusion + lm_head_flops(config, mlm_predicted)) if mlm else 0.0,
        "prefix_lm": train * (text + fusion + decoder_flops(config, lt, lv + lt, prefix_predicted))
        if prefix
        else 0.0,
    }
    breakdown["total"] = sum(breakdown.values())
    return breakdown


def pretraining_step_flops(
    config: MPlugConfig,
    image_size: int | None = None,
    text_len: int | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    queue_size: int | None = None,
    mlm_tokens: float | None = None,
    prefix_lm_tokens: float | None = None,
) -> float:
    """Training FLOPs (forward + backward) per pretraining sample: `pretraining_step_breakdown(...)["total"]`.

    MFU = pretraining_step_flops(...) x samples per second / peak FLOP/s of the devices.
    """
    return pretraining_step_breakdown(
        config,
        image_size,
        text_len,
        batch_size=batch_size,
        queue_size=queue_size,
        mlm_tokens=mlm_tokens,
        prefix_lm_tokens=prefix_lm_tokens,
    )["total"]


# ---------------------------------------------------------------------------------------------------
# Measurement: what torch actually dispatches, to check the formulas against
# ---------------------------------------------------------------------------------------------------


def _cpu_sdpa_forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    b, h, lq, d = query_shape
    lk, dv = key_shape[2], value_shape[3]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv  # Q·Kᵀ, then P·V


def _cpu_sdpa_backward(
    grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    # Recompute Q·Kᵀ, then dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q: five products, as torch
    # counts its CUDA flash/efficient kernels.
    b, h, lq, d = query_shape
    lk = key_shape[2]
    return 5 * 2 * b * h * lq * lk * d


def measured_flop_counts(run: Callable[[], object]) -> dict[str, int]:
    """Matrix-product FLOPs torch dispatches while `run()` executes (forward, plus backward if `run`
    calls it), by `torch.utils.flop_counter.FlopCounterMode`: "Global" is the total, every other key
    a module's dotted name (e.g. "MPlugForPretraining.fusion_encoder") with what ran inside it.

    torch's counter has no formula for the CPU SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`)
    and would count CPU attention as zero; this adds it with the same convention as its GPU kernels.
    """
    import torch  # lazy: the analytic functions above need no torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


def measured_flops(run: Callable[[], object]) -> int:
    """Total of `measured_flop_counts(run)`: every matrix product `run()` dispatches."""
    return measured_flop_counts(run).get("Global", 0)
