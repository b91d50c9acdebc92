"""mPLUG for pretraining: towers, fusion, decoder, the four objectives, and the momentum step.

`forward` is pure: it computes the losses and returns the (gathered) momentum features; the
trainer calls `momentum_update(output)` after `optimizer.step()` to move the EMA encoders and
the feature queues. Nothing in `forward` changes the model's state.
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
    TEMP_MAX,
    TEMP_MIN,
    gather_features,
    itc_loss,
    mask_tokens,
    sample_hard_negatives,
    split_prefix,
)
from mplug.text import LMHead, TextDecoder, TextEncoder
from mplug.vision import CLIPVisionTransformer, VisualAdapter


@dataclass
class MPlugPretrainingOutput:
    """What one pretraining forward returns.

    loss: () sum of the enabled objectives' losses (equal weights).
    loss_itc, loss_itm, loss_mlm, loss_prefix: () each objective; a disabled one is a zero tensor.
    image_feat_m, text_feat_m: (B_global, embed_dim) L2-normalised momentum features of the whole
        data-parallel batch (gathered over ranks), to enqueue in `momentum_update`; None without ITC.
    """

    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_mlm: torch.Tensor
    loss_prefix: torch.Tensor
    image_feat_m: torch.Tensor | None = None
    text_feat_m: torch.Tensor | None = None


class MPlugPreTrainedModel(PreTrainedModel):
    """HF plumbing: config class, weight init, safetensors save/load, activation checkpointing."""

    config_class = MPlugConfig
    config: MPlugConfig
    base_model_prefix = "mplug"
    main_input_name = "images"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Embedding N(0, 0.02), LayerNorm (1, 0)
        std = self.config.text_config.initializer_range
        if isinstance(module, LMHead):
            init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        elif isinstance(module, CLIPVisionTransformer):
            init.normal_(module.pos_embed, std=std)
            init.normal_(module.cls_token, std=std)
        elif isinstance(module, MPlugForPretraining):
            if module.temp is not None:
                init.constant_(module.temp, self.config.temperature)
            if module.image_queue is not None:
                # Random unit vectors, as the official code starts its queues.
                init.copy_(module.image_queue, F.normalize(torch.randn_like(module.image_queue), dim=0))
                init.copy_(module.text_queue, F.normalize(torch.randn_like(module.text_queue), dim=0))
                init.zeros_(module.queue_ptr)

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute every transformer block (BERT blocks and timm ViT blocks) in backward."""
        self._activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)


class MPlugForPretraining(MPlugPreTrainedModel):
    """mPLUG with ITC, ITM, MLM and PrefixLM heads.

    Parameter groups: every ViT parameter lives under `visual_encoder.`; the visual adapter
    (large) is separate, under `visual_adapter.` (newly initialised, so it takes the main lr).
    Momentum copies end in `_m` and never require grad. The ITC image embedding projects the
    CLS visual token after the adapter (text width), the text embedding the text encoder's CLS.
    """

    def __init__(self, config: MPlugConfig) -> None:
        super().__init__(config)
        tc = config.text_config
        width = tc.hidden_size
        self.visual_encoder = CLIPVisionTransformer(config.vision_config)
        self.visual_adapter = VisualAdapter(config) if config.use_visual_adapter else nn.Identity()
        self.text_encoder = TextEncoder(tc, config.text_layers)
        self.fusion_encoder = FusionEncoder(config)
        self.text_decoder = TextDecoder(tc, config.decoder_layers)
        # Heads exist only for enabled objectives: no layer is built that forward never runs.
        self.mlm_head = LMHead(tc) if config.use_mlm else None
        self.itm_head = nn.Linear(width, 2) if config.use_itm else None
        self.vision_proj = nn.Linear(width, config.embed_dim) if config.use_itc else None
        self.text_proj = nn.Linear(width, config.embed_dim) if config.use_itc else None
        # Shape (1,), not a scalar: FSDP2 cannot shard 0-d parameters (official: scalar).
        self.temp = nn.Parameter(torch.full((1,), config.temperature)) if config.use_itc else None
        if config.use_itc:
            self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
            self.visual_adapter_m = copy.deepcopy(self.visual_adapter)
            self.text_encoder_m = copy.deepcopy(self.text_encoder)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            for module in self._momentum_pairs_modules():
                module.requires_grad_(False)
            self.register_buffer("image_queue", torch.zeros(config.embed_dim, config.queue_size))
            self.register_buffer("text_queue", torch.zeros(config.embed_dim, config.queue_size))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        else:
            self.image_queue = self.text_queue = self.queue_ptr = None
        # Which token ids start a word (not a '##' continuation); PrefixLM cuts only there.
        # A plain CPU tensor, not a buffer: it is derived from the vocabulary, never saved.
        self._word_start = _word_start_table(tc.vocab_size)
        self.post_init()
        self._sync_momentum()

    # ---- momentum -----------------------------------------------------------------------
    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if not self.config.use_itc:
            return []
        names = ("visual_encoder", "visual_adapter", "text_encoder", "vision_proj", "text_proj")
        return [(getattr(self, n), getattr(self, n + "_m")) for n in names]

    def _momentum_pairs_modules(self) -> list[nn.Module]:
        return [m for _, m in self._momentum_pairs()]

    @torch.no_grad()
    def _sync_momentum(self) -> None:
        for online, momentum in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), momentum.parameters()):
                p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self, output: MPlugPretrainingOutput) -> None:
        """After `optimizer.step()`: clamp the temperature, EMA-update the momentum encoders and
        enqueue the gathered momentum features of `output`. Call it on the unwrapped module on
        every rank (the gathered features are identical everywhere, so queues stay in sync)."""
        if not self.config.use_itc:
            return
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        m = self.config.momentum
        online = [p for o, _ in self._momentum_pairs() for p in o.parameters()]
        target = [p for _, t in self._momentum_pairs() for p in t.parameters()]
        torch._foreach_lerp_(target, online, 1.0 - m)  # p_m = m * p_m + (1 - m) * p
        if output.image_feat_m is not None:
            self._enqueue(output.image_feat_m, output.text_feat_m)

    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        q = self.config.queue_size
        if q == 0:
            return
        image_feat, text_feat = (
            image_feat[-q:],
            text_feat[-q:],
        )  # a batch larger than the queue keeps its tail
        n = image_feat.shape[0]
        ptr = int(self.queue_ptr.item())
        idx = (ptr + torch.arange(n, device=self.image_queue.device)) % q
        self.image_queue[:, idx] = image_feat.t().to(self.image_queue.dtype)
        self.text_queue[:, idx] = text_feat.t().to(self.text_queue.dtype)
        self.queue_ptr[0] = (ptr + n) % q

    # ---- encoders -----------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """images (B, 3, H, W) -> visual tokens at the text width (B, 1 + HW/p^2, D), CLS first."""
        vit, adapter = (
            (self.visual_encoder_m, self.visual_adapter_m)
            if momentum
            else (self.visual_encoder, self.visual_adapter)
        )
        return adapter(vit.forward_features(images))

    def fuse(
        self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fusion_encoder(text, text_mask, visual, visual_mask)

    def _require_itc(self, what: str) -> None:
        if not self.config.use_itc:
            raise ValueError(f"{what} needs the ITC projections, but this model has use_itc=False")

    def encode_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim) L2-normalised ITC image embeddings."""
        self._require_itc("encode_image_features")
        return F.normalize(self.vision_proj(self.encode_image(images)[:, 0]), dim=-1)

    def encode_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, embed_dim) L2-normalised ITC text embeddings."""
        self._require_itc("encode_text_features")
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)[:, 0]), dim=-1)

    def itm_scores(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Matching probability of each (image, text) row pair, (B,) (retrieval re-ranking)."""
        if self.itm_head is None:
            raise ValueError("itm_scores needs the ITM head, but this model has use_itm=False")
        visual = self.encode_image(images)
        text = self.text_encoder(input_ids, attention_mask)
        fused, _ = self.fuse(text, attention_mask, visual, _ones_mask(visual))
        return self.itm_head(fused[:, 0]).softmax(-1)[:, 1]

    # ---- forward ------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
    ) -> MPlugPretrainingOutput:
        """images (B, 3, H, W), input_ids/attention_mask (B, L) `[CLS] ... [SEP] [PAD]*`;
        alpha: momentum-distillation weight for ITC (0 disables distillation)."""
        cfg = self.config
        visual = self.encode_image(images)  # (B, Lv, D)
        visual_mask = _ones_mask(visual)  # (B, Lv)
        text = self.text_encoder(input_ids, attention_mask)  # (B, L, D)
        zero = visual.new_zeros((), dtype=torch.float32)
        loss_itc = loss_itm = loss_mlm = loss_prefix = zero
        image_all = text_all = None
        sim_i2t = sim_t2i = None

        if cfg.use_itc:
            image_feat = F.normalize(self.vision_proj(visual[:, 0]), dim=-1)  # (B, E)
            text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)  # (B, E)
            temp = self.temp.clamp(TEMP_MIN, TEMP_MAX)
            with torch.no_grad():
                image_feat_m = F.normalize(
                    self.vision_proj_m(self.encode_image(images, momentum=True)[:, 0]), dim=-1
                )
                text_feat_m = F.normalize(
                    self.text_proj_m(self.text_encoder_m(input_ids, attention_mask)[:, 0]), dim=-1
                )
                image_all, offset = gather_features(image_feat_m)  # (B_global, E)
                text_all, _ = gather_features(text_feat_m)
            loss_itc = itc_loss(
                image_feat, text_feat, image_all, text_all,
                self.image_queue, self.text_queue,  # itc_loss concatenates: autograd never holds the queues
                offset, temp, alpha, image_feat_m, text_feat_m,
            )  # fmt: skip
            sim_i2t = image_feat @ text_feat.t() / temp  # (B, B) in-batch, for hard negatives
            sim_t2i = sim_i2t.t()

        if cfg.use_itm:
            loss_itm = self._itm_loss(visual, visual_mask, text, attention_mask, sim_i2t, sim_t2i)
        if cfg.use_mlm:
            loss_mlm = self._mlm_loss(input_ids, attention_mask, visual, visual_mask)
        if cfg.use_prefix:
            loss_prefix = self._prefix_loss(input_ids, attention_mask, visual, visual_mask)

        loss = loss_itc + loss_itm + loss_mlm + loss_prefix
        return MPlugPretrainingOutput(loss, loss_itc, loss_itm, loss_mlm, loss_prefix, image_all, text_all)

    def _itm_loss(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        sim_i2t: torch.Tensor | None,
        sim_t2i: torch.Tensor | None,
    ) -> torch.Tensor:
        b = visual.shape[0]
        if b < 2:
            raise ValueError(f"ITM draws in-batch negatives and needs batch_size >= 2, got {b}")
        if sim_i2t is None:  # without ITC there are no similarities: negatives uniformly at random
            sim_i2t = sim_t2i = visual.new_zeros(b, b, dtype=torch.float32)
        neg_text, neg_image = sample_hard_negatives(sim_i2t.detach(), sim_t2i.detach())
        # One fused pass over 3B pairs: positives, (image, hard-negative text), (hard-negative image, text).
        texts = torch.cat([text, text[neg_text], text], dim=0)
        text_masks = torch.cat([text_mask, text_mask[neg_text], text_mask], dim=0)
        visuals = torch.cat([visual, visual, visual[neg_image]], dim=0)
        fused, _ = self.fuse(texts, text_masks, visuals, visual_mask.repeat(3, 1))
        logits = self.itm_head(fused[:, 0])  # (3B, 2)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return F.cross_entropy(logits.float(), labels)

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
        fused, _ = self.fuse(self.text_encoder(masked, text_mask), text_mask, visual, visual_mask)
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
            input_ids, text_mask, self._word_start, cfg.cls_token_id, cfg.pad_token_id_text
        )
        text = self.text_encoder(prefix_ids, prefix_mask)
        fused_text, fused_visual = self.fuse(text, prefix_mask, visual, visual_mask)
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
        visual_mask = _ones_mask(visual)
        if prompt_ids is None:
            return visual, visual_mask
        if prompt_mask is None:
            prompt_mask = (prompt_ids != self.config.pad_token_id_text).long()
        text = self.text_encoder(prompt_ids, prompt_mask)
        fused_text, fused_visual = self.fuse(text, prompt_mask, visual, visual_mask)
        return torch.cat([fused_visual, fused_text], 1), torch.cat([visual_mask, prompt_mask], 1)

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

    # ---- helpers ------------------------------------------------------------------------
    def example_inputs(self, batch_size: int, seed: int = 0) -> dict[str, Any]:
        """A valid forward batch for this config: random images at `config.image_size` and
        random `[CLS] words [SEP] [PAD]*` captions of varied length, on the model's device."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        cfg = self.config
        param = next(self.parameters())
        gen = torch.Generator().manual_seed(seed)
        size, seq = cfg.image_size, cfg.max_text_len
        images = torch.randn(batch_size, 3, size, size, generator=gen)
        # Ordinary word ids: above [MASK] and the [unused*] block of the BERT vocabulary.
        specials = (cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id, cfg.pad_token_id_text)
        low = 1000 if cfg.text_config.vocab_size > 2000 else max(specials) + 1
        ids = torch.randint(low, cfg.text_config.vocab_size, (batch_size, seq), generator=gen)
        lengths = torch.randint(min(4, seq), seq + 1, (batch_size,), generator=gen)  # incl. [CLS]/[SEP]
        pos = torch.arange(seq)[None]
        ids[:, 0] = cfg.cls_token_id
        ids = torch.where(pos == lengths[:, None] - 1, torch.full_like(ids, cfg.sep_token_id), ids)
        mask = (pos < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, cfg.pad_token_id_text)
        dev = param.device
        return {
            "images": images.to(dev, param.dtype),
            "input_ids": ids.to(dev),
            "attention_mask": mask.to(dev),
        }

    def init_text_from_bert(self, state_dict_or_dir: Any) -> Any:
        """Same as `mplug.official.init_text_from_bert(self, state_dict_or_dir)`."""
        from mplug.official import init_text_from_bert  # official.py imports this module

        return init_text_from_bert(self, state_dict_or_dir)

    def num_parameters_without_momentum(self) -> int:
        """Parameters a training step uses: everything except the `_m` momentum copies."""
        return sum(p.numel() for n, p in self.named_parameters() if "_m." not in n)


def _ones_mask(tokens: torch.Tensor) -> torch.Tensor:
    """All-ones 1/0 mask for a (B, L, D) token sequence (visual tokens are never padded)."""
    return torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)


def _word_start_table(vocab_size: int) -> torch.Tensor:
    """(V,) bool: True for tokens that start a word. Built from the packaged BERT vocabulary when it
    matches `vocab_size`; otherwise every token counts as a word start (any cut is a word cut)."""
    from mplug.tokenizer import load_tokenizer

    table = torch.ones(vocab_size, dtype=torch.bool, device="cpu")
    try:
        vocab = load_tokenizer().get_vocab()
    except FileNotFoundError:
        return table
    if len(vocab) != vocab_size:
        return table
    for token, idx in vocab.items():
        if token.startswith("##"):
            table[idx] = False
    return table
