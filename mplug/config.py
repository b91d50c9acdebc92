"""mPLUG configuration: one composed config (vision tower, BERT text side, fusion, objectives).

Cross-tower values (the visual adapter, the visual token count) are derived here, in one place,
and an invalid combination raises an error that names the offending field and what is valid.
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, PreTrainedConfig

FUSION_MODES = ("skip", "merged", "coattention")


@strict
class MPlugVisionConfig(PreTrainedConfig):
    """CLIP-style ViT (pre-LN, class token, `ln_pre`, quick-GELU, no output projection).

    Fields:
        image_size: side of the (square) training image in pixels; other sizes work at run time
            (position embeddings are resampled), this one fixes the stored position table.
        patch_size: side of a patch in pixels; `image_size` must be a multiple of it.
        hidden_size: token width of the ViT.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: attention heads per block; must divide `hidden_size`.
        intermediate_size: MLP hidden width.
        layer_norm_eps: epsilon of every LayerNorm in the tower (CLIP uses 1e-5).
        hidden_act: MLP activation, a timm activation name ("quick_gelu" for CLIP).
        drop_path_rate: stochastic depth rate (0 in the official recipe).
        position_init: how a model built from scratch starts its patch position table:
            "normal" (N(0, initializer_range), as CLIP's random start) or "sincos" (MAE's fixed
            2-D sine-cosine table, values in [-1, 1], still learned after). Weights loaded from
            a checkpoint replace either.
    """

    model_type: ClassVar[str] = "mplug_vision"
    base_config_key: ClassVar[str] = "vision_config"

    image_size: int = 256
    patch_size: int = 16
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    drop_path_rate: float = 0.0
    position_init: str = "normal"


POSITION_INITS = ("normal", "sincos")


def _bert_base() -> dict[str, Any]:
    return dict(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
    )


def _preset_table() -> dict[str, dict[str, Any]]:
    """The four named sizes. Built fresh on every call so callers can't mutate a shared table."""
    return {
        # CPU tests and the demo: 64 px, 65 visual tokens, 2 layers per tower. The full BERT
        # vocabulary (30,522) dominates the parameter count, which is fine.
        "tiny": dict(
            vision_config=dict(
                image_size=64,
                patch_size=8,
                hidden_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=512,
                # Position as strong as content from the first step: with a N(0, 0.1) table a
                # patch token is ~10% position, and a decoder trained from scratch needed ~1,000
                # steps before it read where a lone square was (sincos: ~300; BENCHMARKS.md).
                position_init="sincos",
            ),
            text_config=dict(
                vocab_size=30522,
                hidden_size=128,
                num_hidden_layers=4,  # = text_layers + fusion_layers, the official layout
                num_attention_heads=4,
                intermediate_size=512,
                max_position_embeddings=128,
                # No dropout: tiny trains from scratch for minutes, and on CPU SDPA with
                # attention dropout falls back to the slow math kernel.
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                # From-scratch towers at BERT's 0.02 start with collapsed CLS features (text cos
                # 0.9999 between different shapes-world captions, image 0.997) and ITC did not
                # move in 200 steps; at 0.1 they start apart (0.94 / 0.55) and ITC learns.
                initializer_range=0.1,
            ),
            text_layers=2,
            fusion_layers=2,
            decoder_layers=2,
            # S = 1 makes fusion layer 1 connected, so the tiny model exercises both layer kinds.
            fusion_stride=1,
            embed_dim=128,
            queue_size=1024,
            max_text_len=32,
        ),
        # Text side initialisable from the packaged MiniLM-L6-H384 (6 layers): text = layers 0-2,
        # fusion = layers 3-5, decoder = all 6 layers (see `mplug.official.init_text_from_bert`).
        "mini": dict(
            vision_config=dict(
                image_size=128,
                patch_size=16,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=6,
                intermediate_size=1536,
            ),
            text_config=dict(
                vocab_size=30522,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                intermediate_size=1536,
                max_position_embeddings=512,
            ),
            text_layers=3,
            fusion_layers=3,
            decoder_layers=6,
            fusion_stride=2,
            queue_size=4096,
        ),
        # CLIP ViT-B/16 + BERT-base, S = 3 (fusion layer 3 is connected); pretraining resolution 256.
        "base": dict(
            vision_config=dict(
                image_size=256,
                patch_size=16,
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
            ),
            text_config=_bert_base(),
            fusion_stride=3,
        ),
        # CLIP ViT-L/14 + visual adapter (1024 -> 768) + BERT-base, S = 6: with six fusion layers
        # no layer is connected, exactly as the official large config runs.
        "large": dict(
            vision_config=dict(
                image_size=224,
                patch_size=14,
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
            ),
            text_config=_bert_base(),
            fusion_stride=6,
            use_visual_adapter=True,
        ),
    }


PRESETS: tuple[str, ...] = tuple(_preset_table())


@strict
class MPlugConfig(PreTrainedConfig):
    """Configuration of an mPLUG model.

    Fields:
        vision_config: the ViT (`MPlugVisionConfig`).
        text_config: a `transformers.BertConfig` shared by text encoder, fusion and decoder
            (width, heads, FFN size, vocabulary, dropout, max positions). Its
            `num_hidden_layers` is the BERT checkpoint's depth and is not used to build layers.
        text_layers: self-attention-only layers of the text encoder (official: BERT layers 0-5).
        fusion_layers: fusion layers (official: BERT layers 6-11).
        decoder_layers: decoder layers with cross-attention (official: all 12 BERT layers).
        fusion_stride: S; fusion layer n (0-based) is a connected layer when n != 0 and n % S == 0
            (only in `fusion_mode="skip"`).
        fusion_mode: "skip" (mPLUG: asymmetric co-attention + connected attention every S
            layers), "merged" (every layer self-attends over [visual; text]) or "coattention"
            (ALBEF/METER-style two streams, each cross-attending to the other in every layer).
        use_visual_adapter: Linear(vision width -> text width) + LayerNorm + Dropout after the
            ViT (required when the widths differ, as in `large`).
        embed_dim: width of the ITC embeddings.
        temperature: initial ITC temperature (learnable, clamped to [0.001, 0.5]).
        momentum: EMA coefficient of the momentum encoders.
        queue_size: length of the image and text feature queues; 0 means no queue (negatives
            are the gathered batch only). Training from scratch for a few hundred steps needs 0:
            while the towers still map every input to nearly the same feature, stale queued
            keys give the query a direction to flee that is not alignment, and ITC collapses
            (BENCHMARKS.md has the measurement).
        distill_alpha: momentum-distillation weight alpha (ramped by the trainer in epoch 0).
        itm_random_negative_steps: training steps at the start whose ITM negatives are drawn
            uniformly from the batch; hard negatives (by ITC similarity, the official sampling)
            after. 0 (official) samples hard ones from the first step. From scratch, once ITC
            separates, the hard negatives differ from the positive in one word, and ITM stays at
            its 1:2 prior with a fusion that never reads the image; uniform ones teach it to
            compare caption and image first (shapes-world tiny: ITM off the prior by step 200
            with them, still on it at step 400 without; BENCHMARKS.md).
        mlm_probability: fraction of non-special caption tokens masked for MLM.
        max_text_len: caption length in tokens (padding/truncation length).
        use_itc, use_itm, use_mlm, use_prefix: switch each pretraining objective on or off.
        cls_token_id, sep_token_id, mask_token_id: BERT special tokens ([PAD] is
            `text_config.pad_token_id`); [CLS] also starts every decoded sequence.
        num_images: images per example of a classifier (2 for NLVR2's image pairs).
        box_bins: coordinate bins of the grounding decoder; 0 means `image_size + 1` (the
            official 337 at 336 px). Classifier labels live in `id2label` (PreTrainedConfig).
    """

    model_type: ClassVar[str] = "mplug"
    sub_configs_defaults: ClassVar[dict] = {"vision_config": MPlugVisionConfig, "text_config": BertConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    text_layers: int = 6
    fusion_layers: int = 6
    decoder_layers: int = 12
    fusion_stride: int = 3
    fusion_mode: str = "skip"
    use_visual_adapter: bool = False
    embed_dim: int = 256
    temperature: float = 0.07
    momentum: float = 0.995
    queue_size: int = 65536
    distill_alpha: float = 0.4
    itm_random_negative_steps: int = 0
    mlm_probability: float = 0.15
    max_text_len: int = 40
    use_itc: bool = True
    use_itm: bool = True
    use_mlm: bool = True
    use_prefix: bool = True
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    num_images: int = 1
    box_bins: int = 0

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._validate()

    # ---- derived values -------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def num_visual_tokens(self) -> int:
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return grid * grid + 1

    @property
    def pad_token_id_text(self) -> int:
        return int(self.text_config.pad_token_id or 0)

    def connected_layer_indices(self) -> list[int]:
        """Fusion layers that run connected attention over [visual; text]."""
        if self.fusion_mode == "merged":
            return list(range(self.fusion_layers))
        if self.fusion_mode == "coattention":
            return []
        return [n for n in range(self.fusion_layers) if n != 0 and n % self.fusion_stride == 0]

    # ---- validation -----------------------------------------------------------------------
    def _validate(self) -> None:
        v, t = self.vision_config, self.text_config
        if self.fusion_mode not in FUSION_MODES:
            raise ValueError(f"fusion_mode={self.fusion_mode!r} is not valid; choose one of {FUSION_MODES}")
        for name in (
            "text_layers",
            "fusion_layers",
            "decoder_layers",
            "fusion_stride",
            "embed_dim",
            "max_text_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if v.position_init not in POSITION_INITS:
            raise ValueError(
                f"vision_config.position_init={v.position_init!r} is not valid; choose one of {POSITION_INITS}"
            )
        if self.num_images < 1:
            raise ValueError(f"num_images={self.num_images} must be >= 1")
        if self.box_bins < 0 or self.box_bins == 1:
            raise ValueError(f"box_bins={self.box_bins} must be 0 (image_size + 1) or >= 2")
        if self.queue_size < 0:
            raise ValueError(f"queue_size={self.queue_size} must be >= 0 (0: no queue)")
        if v.image_size % v.patch_size != 0:
            raise ValueError(
                f"vision_config.image_size={v.image_size} must be a multiple of "
                f"vision_config.patch_size={v.patch_size}"
            )
        if v.hidden_size % v.num_attention_heads != 0:
            raise ValueError(
                f"vision_config.hidden_size={v.hidden_size} is not divisible by "
                f"vision_config.num_attention_heads={v.num_attention_heads}"
            )
        if t.hidden_size % t.num_attention_heads != 0:
            raise ValueError(
                f"text_config.hidden_size={t.hidden_size} is not divisible by "
                f"text_config.num_attention_heads={t.num_attention_heads}"
            )
        if v.hidden_size != t.hidden_size and not self.use_visual_adapter:
            raise ValueError(
                f"vision_config.hidden_size={v.hidden_size} != text_config.hidden_size={t.hidden_size}: "
                "set use_visual_adapter=True (Linear + LayerNorm maps visual tokens to the text width)"
            )
        if self.max_text_len > t.max_position_embeddings:
            raise ValueError(
                f"max_text_len={self.max_text_len} exceeds text_config.max_position_embeddings="
                f"{t.max_position_embeddings}"
            )
        if not 0.001 <= self.temperature <= 0.5:
            raise ValueError(f"temperature={self.temperature} must lie in [0.001, 0.5] (the clamp range)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must lie in [0, 1)")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha={self.distill_alpha} must lie in [0, 1]")
        if self.itm_random_negative_steps < 0:
            raise ValueError(f"itm_random_negative_steps={self.itm_random_negative_steps} must be >= 0")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={self.mlm_probability} must lie in (0, 1)")
        if not (self.use_itc or self.use_itm or self.use_mlm or self.use_prefix):
            raise ValueError("all objectives are off: set at least one of use_itc/use_itm/use_mlm/use_prefix")
        for name in ("cls_token_id", "sep_token_id", "mask_token_id"):
            if not 0 <= getattr(self, name) < t.vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is outside the vocabulary [0, {t.vocab_size})"
                )

    # ---- presets --------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MPlugConfig:
        """A named size ("tiny", "mini", "base", "large") with optional field overrides.

        `overrides` are top-level fields; `vision_config` / `text_config` dicts are merged into the
        preset's, and `image_size=` is a shortcut for `vision_config={"image_size": ...}`.
        """
        table = _preset_table()
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(table)}")
        values = table[name]
        valid = {f for f in cls.__dataclass_fields__ if not f.startswith("_")} | {"image_size"}
        for key, value in overrides.items():
            if key not in valid:
                raise ValueError(f"unknown MPlugConfig field {key!r}; valid fields: {sorted(valid)}")
            if key == "image_size":
                values.setdefault("vision_config", {})["image_size"] = value
            elif key in ("vision_config", "text_config"):
                values[key] = {**values.get(key, {}), **dict(value)}
            else:
                values[key] = value
        return cls(**values)
