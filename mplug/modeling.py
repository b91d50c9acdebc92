"""mPLUG models: the shared towers and their Hugging Face plumbing, the contrastive machinery
(ITC with momentum encoders and queues, ITM with hard negatives) and the pretraining model.

Every task model (`MPlugForPretraining` here; VQA, captioning, retrieval, grounding and the
classifiers in their own modules) composes the same towers under the same names
(`visual_encoder`, `visual_adapter`, `text_encoder`, `fusion_encoder`, `text_decoder`), so one
checkpoint filter maps any source onto any of them, and a task model builds only the towers and
heads its forward runs.

`forward` is pure: it computes losses and returns the (gathered) momentum features; the trainer
calls `momentum_update(output)` after `optimizer.step()` to move the EMA encoders and the
feature queues. Nothing in `forward` changes the model's state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertEmbeddings

from mplug.config import MPlugConfig
from mplug.fusion import FusionEncoder
from mplug.generation import generate as _generate
from mplug.objectives import (
    NO_NEGATIVE,
    TEMP_MAX,
    TEMP_MIN,
    FeatureGather,
    itc_loss,
    local_features,
    mask_tokens,
    sample_hard_negatives,
    split_prefix,
)
from mplug.text import LMHead, TextDecoder, TextEncoder
from mplug.vision import CLIPVisionTransformer, VisualAdapter, sincos_position_table


def ones_mask(tokens: torch.Tensor) -> torch.Tensor:
    """All-ones 1/0 mask for a (B, L, D) token sequence (visual tokens are never padded)."""
    return torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)


def frame_count(images: torch.Tensor) -> int:
    """Frames per item: T of a video batch (B, T, 3, H, W), 1 of an image batch (B, 3, H, W)."""
    return images.shape[1] if images.dim() == 5 else 1


def encode_frames(encoder: nn.Module, adapter: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Visual tokens of images (B, 3, H, W) -> (B, L, D); of a video (B, T, 3, H, W), each frame
    through the tower on its own and the frames' tokens concatenated in time order -> (B, T*L, D),
    as the official video scripts feed the fusion and the decoder. Frame by frame: evaluation
    holds one frame's activations per video at a time."""
    if images.dim() == 4:
        return adapter(encoder.forward_features(images))
    return torch.cat([adapter(encoder.forward_features(images[:, t])) for t in range(images.shape[1])], dim=1)


def visual_cls(visual: torch.Tensor, frames: int = 1) -> torch.Tensor:
    """The CLS token of visual tokens (B, L, D) -> (B, D); of a video's concatenated frames
    (B, T*L, D), the mean of its frames' CLS tokens (the official video retrieval ranks by the mean
    of the frames' projected CLS embeddings: the same, the projection being linear)."""
    if frames == 1:
        return visual[:, 0]
    b, length, d = visual.shape
    return visual.view(b, frames, length // frames, d)[:, :, 0].mean(1)


class MPlugPreTrainedModel(PreTrainedModel):
    """HF plumbing (config class, weight init, safetensors save/load, activation checkpointing)
    and the towers every task model composes. A subclass calls the `_build_*` methods it needs
    in `__init__`, then `post_init()`."""

    config_class = MPlugConfig
    config: MPlugConfig
    base_model_prefix = "mplug"
    main_input_name = "images"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    # ---- towers -----------------------------------------------------------------------------
    def _build_vision(self) -> None:
        self.visual_encoder = CLIPVisionTransformer(self.config.vision_config)
        self.visual_adapter = VisualAdapter(self.config) if self.config.use_visual_adapter else nn.Identity()

    def _build_text(self) -> None:
        self.text_encoder = TextEncoder(self.config.text_config, self.config.text_layers)

    def _build_fusion(self) -> None:
        self.fusion_encoder = FusionEncoder(self.config)

    def _build_decoder(self) -> None:
        self.text_decoder = TextDecoder(self.config.text_config, self.config.decoder_layers)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> visual tokens at the text width (B, 1 + HW/p^2, D), CLS first; a
        video (B, T, 3, H, W) -> its frames' tokens concatenated (B, T(1 + HW/p^2), D)."""
        return encode_frames(self.visual_encoder, self.visual_adapter, images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and 1/0 mask -> text encoder states (B, L, D)."""
        return self.text_encoder(input_ids, attention_mask)

    def fuse(
        self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused (text (B, Lt, D), visual (B, Lv, D))."""
        return self.fusion_encoder(text, text_mask, visual, visual_mask)

    def fused_memory(
        self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text encoded and fused with `visual` -> (decoder memory [fused visual; fused text]
        (B, Lv + Lt, D), its 1/0 mask, the fused text states (B, Lt, D))."""
        visual_mask = ones_mask(visual)
        fused_text, fused_visual = self.fuse(self.encode_text(input_ids, attention_mask), attention_mask,
                                             visual, visual_mask)  # fmt: skip
        memory = torch.cat([fused_visual, fused_text], dim=1)
        return memory, torch.cat([visual_mask, attention_mask], dim=1), fused_text

    # ---- weights ----------------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Embedding N(0, initializer_range), LayerNorm (1, 0)
        std = self.config.text_config.initializer_range
        if isinstance(module, LMHead):
            init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        elif isinstance(module, CLIPVisionTransformer):
            init.normal_(module.pos_embed, std=std)
            init.normal_(module.cls_token, std=std)
            if self.config.vision_config.position_init == "sincos":
                grid = self.config.image_size // self.config.vision_config.patch_size
                table = module.pos_embed.detach().clone()  # the class position keeps its random row
                table[0, 1:] = sincos_position_table(grid, table.shape[-1])
                init.copy_(module.pos_embed, table)  # a no-op for a loaded table, as every init here
        if isinstance(module, MPlugForPretraining):
            # A derived, non-persistent buffer: `from_pretrained` leaves it unset otherwise.
            module.word_start.fill_(True)
        if isinstance(module, MPlugContrastiveModel):
            if module.temp is not None:
                init.constant_(module.temp, self.config.temperature)
            if module.image_queue is not None:
                # Random unit vectors, as the official code starts its queues.
                init.copy_(module.image_queue, F.normalize(torch.randn_like(module.image_queue), dim=0))
                init.copy_(module.text_queue, F.normalize(torch.randn_like(module.text_queue), dim=0))
                init.zeros_(module.queue_ptr)
                if module.idx_queue is not None:
                    init.constant_(module.idx_queue, -100)  # matches no real image id

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute every transformer block (BERT blocks and timm ViT blocks) in backward."""
        self._activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def num_parameters_without_momentum(self) -> int:
        """Parameters a training step uses: everything except the `_m` momentum copies."""
        return sum(p.numel() for n, p in self.named_parameters() if "_m." not in n)

    # ---- helpers ----------------------------------------------------------------------------
    def example_inputs(self, batch_size: int, seed: int = 0) -> dict[str, Any]:
        """A valid forward batch for this config: random images at `config.image_size` and
        random `[CLS] words [SEP] [PAD]*` captions of varied length, on the model's device."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        cfg = self.config
        param = next(self.parameters())
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=gen)
        ids, mask = random_captions(cfg, batch_size, cfg.max_text_len, gen)
        return {
            "images": images.to(param.device, param.dtype),
            "input_ids": ids.to(param.device),
            "attention_mask": mask.to(param.device),
        }


def random_captions(
    cfg: MPlugConfig, batch_size: int, seq: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, seq) `[CLS] words [SEP] [PAD]*` ids of random lengths and their 1/0 mask."""
    # Ordinary word ids: above [MASK] and the [unused*] block of the BERT vocabulary.
    specials = (cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id, cfg.pad_token_id_text)
    low = 1000 if cfg.text_config.vocab_size > 2000 else max(specials) + 1
    ids = torch.randint(low, cfg.text_config.vocab_size, (batch_size, seq), generator=gen)
    lengths = torch.randint(min(4, seq), seq + 1, (batch_size,), generator=gen)  # incl. [CLS]/[SEP]
    pos = torch.arange(seq)[None]
    ids[:, 0] = cfg.cls_token_id
    ids = torch.where(pos == lengths[:, None] - 1, torch.full_like(ids, cfg.sep_token_id), ids)
    mask = (pos < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, cfg.pad_token_id_text), mask


@dataclass
class ContrastiveKeys:
    """Momentum features of one optimizer step: every micro-batch of every rank, in the order
    (rank, micro-batch, row). ITC scores each query against all of them (plus the queue); the
    momentum step enqueues them once.

    image, text: (N, embed_dim) L2-normalised. image_ids: (N,) int64 or None: rows with equal
    ids are positives of each other (retrieval: captions of one image); None: only a row's own
    pair is positive (pretraining).
    """

    image: torch.Tensor
    text: torch.Tensor
    image_ids: torch.Tensor | None = None


class MPlugContrastiveModel(MPlugPreTrainedModel):
    """Vision and text towers, fusion, ITC projections with momentum encoders and queues, and the
    ITM head: what pretraining and retrieval share.

    Parameter groups: every ViT parameter lives under `visual_encoder.`; the visual adapter
    (large) under `visual_adapter.`. Momentum copies end in `_m` and never require grad. The ITC
    image embedding projects the CLS visual token after the adapter, the text embedding the
    text encoder's CLS.
    """

    def _build_contrastive(self, itc: bool, itm: bool, id_queue: bool = False) -> None:
        config, width = self.config, self.config.text_config.hidden_size
        # How ITC's momentum keys are gathered over data-parallel ranks: one process by default;
        # the training side sets its gather (`set_feature_gather`) when it parallelises the model.
        self.feature_gather: FeatureGather = local_features
        self._build_vision()
        self._build_text()
        self._build_fusion()
        self.itm_head = nn.Linear(width, 2) if itm else None
        self.vision_proj = nn.Linear(width, config.embed_dim) if itc else None
        self.text_proj = nn.Linear(width, config.embed_dim) if itc else None
        # Shape (1,), not a scalar: FSDP2 cannot shard 0-d parameters (official: scalar).
        self.temp = nn.Parameter(torch.full((1,), config.temperature)) if itc else None
        if not itc:
            self.image_queue = self.text_queue = self.queue_ptr = self.idx_queue = None
            return
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.visual_adapter_m = copy.deepcopy(self.visual_adapter)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for module in self._momentum_modules():
            module.requires_grad_(False)
        self.register_buffer("image_queue", torch.zeros(config.embed_dim, config.queue_size))
        self.register_buffer("text_queue", torch.zeros(config.embed_dim, config.queue_size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # Retrieval: the image id of each queued pair (its captions are positives of each other).
        idx = torch.full((config.queue_size,), -100, dtype=torch.long) if id_queue else None
        self.register_buffer("idx_queue", idx)

    # ---- momentum -----------------------------------------------------------------------
    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if self.temp is None:
            return []
        names = ("visual_encoder", "visual_adapter", "text_encoder", "vision_proj", "text_proj")
        return [(getattr(self, n), getattr(self, n + "_m")) for n in names]

    def _momentum_modules(self) -> list[nn.Module]:
        return [m for _, m in self._momentum_pairs()]

    @torch.no_grad()
    def sync_momentum(self) -> None:
        """Copy the online towers into their momentum copies (after loading online weights)."""
        for online, momentum in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), momentum.parameters()):
                p_m.copy_(p)

    _sync_momentum = sync_momentum  # the name mplug.official calls (until the checkpoint filter moves)

    @torch.no_grad()
    def momentum_features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's momentum ITC features (B, E) of images and texts (no grad)."""
        visual = encode_frames(self.visual_encoder_m, self.visual_adapter_m, images)
        image = F.normalize(self.vision_proj_m(visual_cls(visual, frame_count(images))), dim=-1)
        text = F.normalize(self.text_proj_m(self.text_encoder_m(input_ids, attention_mask)[:, 0]), dim=-1)
        return image, text

    @torch.no_grad()
    def momentum_update(self, output: Any) -> None:
        """After `optimizer.step()`: clamp the temperature, EMA-update the momentum encoders and
        enqueue the step's momentum keys carried by `output` (`output.keys`). Call it on the
        unwrapped module on every rank (the gathered keys are identical everywhere, so queues
        stay in sync), once per optimizer step."""
        if self.temp is None:
            return
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        m = self.config.momentum
        online = [p for o, _ in self._momentum_pairs() for p in o.parameters()]
        target = [p for _, t in self._momentum_pairs() for p in t.parameters()]
        torch._foreach_lerp_(target, online, 1.0 - m)  # p_m = m * p_m + (1 - m) * p
        keys = getattr(output, "keys", None)
        if keys is not None:
            self._enqueue(keys)

    def _enqueue(self, keys: ContrastiveKeys) -> None:
        q = self.config.queue_size
        if q == 0:
            return
        image, text = keys.image[-q:], keys.text[-q:]  # more keys than slots: the newest stay
        n = image.shape[0]
        ptr = int(self.queue_ptr.item())
        idx = (ptr + torch.arange(n, device=self.image_queue.device)) % q
        self.image_queue[:, idx] = image.t().to(self.image_queue.dtype)
        self.text_queue[:, idx] = text.t().to(self.text_queue.dtype)
        if self.idx_queue is not None and keys.image_ids is not None:
            self.idx_queue[idx] = keys.image_ids[-q:].to(self.idx_queue.device)
        self.queue_ptr[0] = (ptr + n) % q

    def set_feature_gather(self, gather: FeatureGather) -> None:
        """How `gather_keys` collects every rank's momentum keys (ITC contrasts against the whole
        global batch): a function (B, E) -> (concatenated over ranks, offset of this rank's rows)."""
        self.feature_gather = gather

    def gather_keys(
        self, micro_batches: list[dict[str, torch.Tensor]], image_ids: list[torch.Tensor] | None = None
    ) -> tuple[ContrastiveKeys, list[int]]:
        """Momentum keys of every micro-batch of this step, gathered over ranks, and each
        micro-batch's offset (its first row) among them. With one micro-batch and one rank
        this is the batch's own momentum features at offset 0."""
        parts = [
            self.momentum_features(b["images"], b["input_ids"], b["attention_mask"]) for b in micro_batches
        ]
        gather = self.feature_gather
        image_all, rank_offset = gather(torch.cat([p[0] for p in parts]))
        text_all, _ = gather(torch.cat([p[1] for p in parts]))
        ids_all = gather(torch.cat(image_ids))[0] if image_ids is not None else None
        offsets, start = [], rank_offset
        for p in parts:
            offsets.append(start)
            start += p[0].shape[0]
        return ContrastiveKeys(image_all, text_all, ids_all), offsets

    # ---- ITC / ITM ------------------------------------------------------------------------
    def _require_itc(self, what: str) -> None:
        if self.temp is None:
            raise ValueError(f"{what} needs the ITC projections, but this model has use_itc=False")

    def encode_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim) L2-normalised ITC image embeddings; a video (B, T, 3, H, W)
        is embedded by the mean of its frames' CLS tokens."""
        self._require_itc("encode_image_features")
        cls = visual_cls(self.encode_image(images), frame_count(images))
        return F.normalize(self.vision_proj(cls), dim=-1)

    def encode_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, embed_dim) L2-normalised ITC text embeddings."""
        self._require_itc("encode_text_features")
        return F.normalize(self.text_proj(self.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)

    def itm_logits(self, visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Matched/unmatched logits (B, 2) of (visual tokens, encoded text) row pairs."""
        fused, _ = self.fuse(text, text_mask, visual, ones_mask(visual))
        return self.itm_head(fused[:, 0])

    def itm_scores(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Matching probability of each (image, text) row pair, (B,) (retrieval re-ranking)."""
        if self.itm_head is None:
            raise ValueError("itm_scores needs the ITM head, but this model has use_itm=False")
        visual = self.encode_image(images)
        text = self.encode_text(input_ids, attention_mask)
        return self.itm_logits(visual, text, attention_mask).float().softmax(-1)[:, 1]

    def _itc(
        self,
        visual: torch.Tensor,
        text: torch.Tensor,
        keys: ContrastiveKeys,
        offset: int,
        alpha: float,
        image_ids: torch.Tensor | None = None,
        frames: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC loss of this micro-batch's queries against `keys` + the queue, and the in-batch
        similarities (B, B) that ITM draws hard negatives from. `frames`: T when `visual` holds
        videos' concatenated frames."""
        b = visual.shape[0]
        image_feat = F.normalize(self.vision_proj(visual_cls(visual, frames)), dim=-1)  # (B, E)
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)  # (B, E)
        temp = self.temp.clamp(TEMP_MIN, TEMP_MAX)
        positives = None
        if image_ids is not None:
            key_ids = torch.cat([keys.image_ids, self.idx_queue])  # (N + Q,)
            positives = image_ids[:, None] == key_ids[None, :]  # (B, N + Q)
        loss = itc_loss(
            image_feat, text_feat, keys.image, keys.text,
            self.image_queue, self.text_queue,  # itc_loss concatenates: autograd never holds the queues
            offset, temp, alpha, keys.image[offset : offset + b], keys.text[offset : offset + b],
            positives=positives,
        )  # fmt: skip
        sim_i2t = image_feat @ text_feat.t() / temp  # (B, B) in-batch
        if image_ids is not None:  # another caption of the same image is no negative
            sim_i2t = sim_i2t.masked_fill(image_ids[:, None] == image_ids[None, :], -float("inf"))
        return loss, sim_i2t

    def _itm_loss(
        self,
        visual: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        sim_i2t: torch.Tensor | None,
        hard_negatives: bool = True,
    ) -> torch.Tensor:
        b = visual.shape[0]
        if b < 2:
            raise ValueError(f"ITM draws in-batch negatives and needs batch_size >= 2, got {b}")
        if sim_i2t is None:  # without ITC there are no similarities: negatives uniformly at random
            sim_i2t = visual.new_zeros(b, b, dtype=torch.float32)
        neg_text, neg_image = sample_hard_negatives(sim_i2t.detach(), sim_i2t.detach().t(), hard_negatives)
        # A query whose batch holds no other image has no negative: it keeps only its positive.
        with_text = (neg_text != NO_NEGATIVE).nonzero().squeeze(1)  # images that got a negative text
        with_image = (neg_image != NO_NEGATIVE).nonzero().squeeze(1)  # texts that got a negative image
        # One fused pass: positives, (image, hard-negative text), (hard-negative image, text).
        texts = torch.cat([text, text[neg_text[with_text]], text[with_image]], dim=0)
        text_masks = torch.cat([text_mask, text_mask[neg_text[with_text]], text_mask[with_image]], dim=0)
        visuals = torch.cat([visual, visual[with_text], visual[neg_image[with_image]]], dim=0)
        logits = self.itm_logits(visuals, texts, text_masks)  # (B + negatives, 2)
        negatives = len(with_text) + len(with_image)
        labels = torch.cat([torch.ones(b), torch.zeros(negatives)]).long().to(logits.device)
        return F.cross_entropy(logits.float(), labels)


@dataclass
class MPlugPretrainingOutput:
    """What one pretraining forward returns.

    loss: () sum of the enabled objectives' losses (equal weights).
    loss_itc, loss_itm, loss_mlm, loss_prefix: () each objective; a disabled one is a zero tensor.
    keys: the step's momentum keys (gathered over ranks and micro-batches) for
        `momentum_update`; None without ITC.
    """

    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_mlm: torch.Tensor
    loss_prefix: torch.Tensor
    keys: ContrastiveKeys | None = None

    @property
    def image_feat_m(self) -> torch.Tensor | None:
        """(N, embed_dim) gathered momentum image features (what the queue receives)."""
        return None if self.keys is None else self.keys.image

    @property
    def text_feat_m(self) -> torch.Tensor | None:
        return None if self.keys is None else self.keys.text


class MPlugForPretraining(MPlugContrastiveModel):
    """mPLUG with ITC, ITM, MLM and PrefixLM heads (each built only when its objective is on)."""

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__(config)
        self._build_contrastive(itc=config.use_itc, itm=config.use_itm)
        self._build_decoder()
        self.mlm_head = LMHead(config.text_config) if config.use_mlm else None
        # Which token ids start a word (not a '##' continuation); PrefixLM cuts only there. Derived
        # from the vocabulary, not learnt: a non-persistent buffer the task sets from its
        # tokenizer (`set_word_starts`); until then every token counts as a word start.
        self.register_buffer(
            "word_start", torch.ones(config.text_config.vocab_size, dtype=torch.bool), persistent=False
        )
        self.post_init()
        self.sync_momentum()

    def set_word_starts(self, table: torch.Tensor) -> None:
        """(V,) bool: True where a token id starts a word (`mplug.tokenizer.word_start_table`)."""
        if table.shape != self.word_start.shape:
            raise ValueError(
                f"word-start table {tuple(table.shape)} != vocabulary {tuple(self.word_start.shape)}"
            )
        self.word_start.copy_(table)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
        keys: ContrastiveKeys | None = None,
        key_offset: int = 0,
        itm_hard_negatives: bool = True,
    ) -> MPlugPretrainingOutput:
        """images (B, 3, H, W), input_ids/attention_mask (B, L) `[CLS] ... [SEP] [PAD]*`;
        alpha: momentum-distillation weight for ITC (0 disables distillation); keys/key_offset:
        the step's momentum keys (`gather_keys`) when the step has several micro-batches; by
        default this batch's own, gathered over ranks. itm_hard_negatives=False draws ITM's
        negatives uniformly from the batch instead of by ITC similarity."""
        cfg = self.config
        visual = self.encode_image(images)  # (B, Lv, D)
        visual_mask = ones_mask(visual)  # (B, Lv)
        text = self.encode_text(input_ids, attention_mask)  # (B, L, D)
        zero = visual.new_zeros((), dtype=torch.float32)
        loss_itc = loss_itm = loss_mlm = loss_prefix = zero
        sim_i2t = None
        if cfg.use_itc:
            if keys is None:
                keys, offsets = self.gather_keys(
                    [{"images": images, "input_ids": input_ids, "attention_mask": attention_mask}]
                )
                key_offset = offsets[0]
            loss_itc, sim_i2t = self._itc(visual, text, keys, key_offset, alpha, frames=frame_count(images))
        else:
            keys = None
        if cfg.use_itm:
            loss_itm = self._itm_loss(visual, text, attention_mask, sim_i2t, itm_hard_negatives)
        if cfg.use_mlm:
            loss_mlm = self._mlm_loss(input_ids, attention_mask, visual, visual_mask)
        if cfg.use_prefix:
            loss_prefix = self._prefix_loss(input_ids, attention_mask, visual, visual_mask)
        loss = loss_itc + loss_itm + loss_mlm + loss_prefix
        return MPlugPretrainingOutput(loss, loss_itc, loss_itm, loss_mlm, loss_prefix, keys)

    def _mlm_loss(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        masked, labels = mask_tokens(
            input_ids, text_mask, cfg.mlm_probability, cfg.mask_token_id, cfg.text_config.vocab_size,
            special_ids=(cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id_text),
        )  # fmt: skip
        fused, _ = self.fuse(self.encode_text(masked, text_mask), text_mask, visual, visual_mask)
        picked = labels != -100  # logits only where a token was masked: saves a (B, L, V) matmul
        logits = self.mlm_head(fused[picked], self.text_encoder.embeddings.word_embeddings.weight)
        return F.cross_entropy(logits.float(), labels[picked])

    def _prefix_loss(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        prefix_ids, prefix_mask, target_ids, target_mask = split_prefix(
            input_ids, text_mask, self.word_start, cfg.cls_token_id, cfg.pad_token_id_text
        )
        fused_text, fused_visual = self.fuse(self.encode_text(prefix_ids, prefix_mask), prefix_mask,
                                             visual, visual_mask)  # fmt: skip
        memory = torch.cat([fused_visual, fused_text], dim=1)  # decoder reads [visual; prefix]
        memory_mask = torch.cat([visual_mask, prefix_mask], dim=1)
        hidden, _ = self.text_decoder(target_ids, target_mask, memory, memory_mask)
        valid = target_mask[:, 1:].bool()  # predict token t+1 from positions <= t
        logits = self.text_decoder.logits(hidden[:, :-1][valid])
        return F.cross_entropy(logits.float(), target_ids[:, 1:][valid])

    # ---- generation ---------------------------------------------------------------------
    def decoder_memory(
        self,
        images: torch.Tensor,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder cross-attends to: visual tokens alone (captioning), or the fused
        [visual; prompt] when a text prompt / question is given (VQA)."""
        visual = self.encode_image(images)
        if prompt_ids is None:
            return visual, ones_mask(visual)
        if prompt_mask is None:
            prompt_mask = (prompt_ids != self.config.pad_token_id_text).long()
        memory, memory_mask, _ = self.fused_memory(visual, prompt_ids, prompt_mask)
        return memory, memory_mask

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        num_beams: int = 1,
        max_length: int = 20,
        min_length: int = 1,
        length_penalty: float = 1.0,
        eos_token_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Decode text for each image (greedy when num_beams == 1, else beam search).

        Returns (B, T) token ids without the leading [CLS], T <= max_length new tokens, ending
        in `eos_token_id` ([SEP] by default) unless max_length was reached, then [PAD]-filled.
        """
        memory, memory_mask = self.decoder_memory(images, prompt_ids, prompt_mask)
        return _generate(
            self.text_decoder, memory, memory_mask,
            bos_token_id=self.config.cls_token_id,
            eos_token_id=self.config.sep_token_id if eos_token_id is None else eos_token_id,
            pad_token_id=self.config.pad_token_id_text,
            num_beams=num_beams, max_length=max_length, min_length=min_length,
            length_penalty=length_penalty, use_cache=use_cache,
        )  # fmt: skip
