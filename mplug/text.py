"""BERT-side building blocks: attention with SDPA and a key/value cache, the BERT layer, text
encoder, decoder and LM head.

Embeddings, output projections and FFN come from `transformers`' BERT modules. The attention
core is our own (~40 lines) because mPLUG needs three things transformers' BertLayer does not
offer in one call: self-attention over a concatenated [visual; text] sequence, cross-attention
to a sequence of a different width, and a plain per-layer KV cache for beam search. Parameter
names stay BERT's (`attention.self.query`, `crossattention.output.dense`, `intermediate.dense`,
...), so BERT checkpoints map key by key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfOutput,
)


def attention_mask(
    key_mask: torch.Tensor, query_len: int | None = None, causal: bool = False
) -> torch.Tensor:
    """THE mask helper: a 1/0 key mask (B, Lk) -> boolean SDPA mask (B, 1, Lq or 1, Lk), True = attend.

    With `causal`, query i attends keys <= i + (Lk - Lq) (the offset covers cached keys).
    """
    mask = key_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        lk = key_mask.shape[1]
        lq = lk if query_len is None else query_len
        tri = torch.ones(lq, lk, dtype=torch.bool, device=key_mask.device).tril(diagonal=lk - lq)
        mask = mask & tri[None, None]  # (B, 1, Lq, Lk)
    return mask


@dataclass
class LayerCache:
    """One decoder layer's keys/values from earlier decoding steps, each (rows, heads, L, head_dim).

    Self-attention: one row per decoded sequence (N), in buffers with room for `capacity`
    positions, filled up to `length`: a step writes its keys in place instead of re-concatenating
    the whole prefix. Cross-attention: the memory's keys/values, one row per memory item (B),
    shared by the N / B sequences decoded from that item (beams) and computed once.
    The cache is updated in place (inference only: no autograd through it).
    """

    capacity: int = 0  # positions to allocate on the first write; grows by doubling after
    length: int = 0
    self_key: torch.Tensor | None = None  # (N, nh, capacity, hd)
    self_value: torch.Tensor | None = None
    cross_key: torch.Tensor | None = None  # (B, nh, M, hd)
    cross_value: torch.Tensor | None = None

    def past(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached self-attention keys/values (N, nh, length, hd), or None when empty."""
        if self.self_key is None or self.length == 0:
            return None
        return self.self_key[:, :, : self.length], self.self_value[:, :, : self.length]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (N, nh, Lnew, hd) after the cached ones -> all (N, nh, length, hd)."""
        start, end = self.length, self.length + key.shape[2]
        if self.self_key is None or end > self.self_key.shape[2]:
            self._grow(key, max(end, self.capacity, 2 * start))
        self.self_key[:, :, start:end] = key
        self.self_value[:, :, start:end] = value
        self.length = end
        return self.past()

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        n, heads, _, head_dim = like.shape
        old = self.past()
        self.self_key, self.self_value = (like.new_empty(n, heads, capacity, head_dim) for _ in range(2))
        if old is not None:
            self.self_key[:, :, : self.length], self.self_value[:, :, : self.length] = old

    def reorder(self, index: torch.Tensor) -> LayerCache:
        """Keep self-attention rows `index` (beam search's surviving beams). The cross keys stay:
        an index must map each sequence to one decoded from the same memory item."""
        if self.self_key is not None:
            self.self_key = self.self_key.index_select(0, index)
            self.self_value = self.self_value.index_select(0, index)
        return self


class SdpaAttention(nn.Module):
    """Multi-head attention core with BERT's `query`/`key`/`value` names and torch SDPA."""

    def __init__(self, config: BertConfig, kv_width: int | None = None) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width or width, width)
        self.value = nn.Linear(kv_width or width, width)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.key(x)), self._heads(self.value(x))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q = self._heads(self.query(hidden))  # (B, nh, Lq, hd)
        k, v = kv
        p = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, Lq, hd)
        b, _, lq, _ = out.shape
        return out.transpose(1, 2).reshape(b, lq, -1)


class BertStyleAttention(nn.Module):
    """Attention + BERT's output block (dense, dropout, residual, LayerNorm): `self` and `output`."""

    def __init__(self, config: BertConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.self = SdpaAttention(config, kv_width)
        self.output = BertSelfOutput(config)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        return self.output(self.self(hidden, mask, kv), hidden)


class BertBlock(GradientCheckpointingLayer):
    """One BERT layer: self-attention, optional cross-attention, FFN (post-LN, as BERT).

    `cache`, when given, holds this layer's keys/values from earlier decoding steps; the block
    returns the updated cache (or None when not caching).
    """

    def __init__(
        self, config: BertConfig, cross_attention: bool = False, kv_width: int | None = None
    ) -> None:
        super().__init__()
        self.attention = BertStyleAttention(config)
        self.crossattention = BertStyleAttention(config, kv_width) if cross_attention else None
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        encoder_hidden: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, LayerCache | None]:
        """hidden (N, L, D); encoder_hidden (B, M, D) with N a multiple of B: the N / B consecutive
        rows of each memory item share it (beams, or candidate answers)."""
        k, v = self.attention.self.project_kv(hidden)  # (N, nh, Lnew, hd)
        if use_cache:
            cache = cache if cache is not None else LayerCache()
            k, v = cache.append(k, v)  # (N, nh, Lpast + Lnew, hd)
        elif cache is not None and cache.past() is not None:  # read the cache, leave it as it is
            past_k, past_v = cache.past()
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        hidden = self.attention(hidden, self_mask, (k, v))
        if self.crossattention is not None:
            if encoder_hidden is None:
                raise ValueError("this layer has cross-attention: pass encoder_hidden")
            if cache is not None and cache.cross_key is not None:
                ck, cv = cache.cross_key, cache.cross_value  # encoder keys are computed once per item
            else:
                ck, cv = self.crossattention.self.project_kv(encoder_hidden)  # (B, nh, M, hd)
                if use_cache:
                    cache.cross_key, cache.cross_value = ck, cv
            hidden = self._cross_attend(hidden, encoder_mask, (ck, cv))
        return self.output(self.intermediate(hidden), hidden), cache if use_cache else None

    def _cross_attend(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """hidden (N, L, D), keys/values (B, nh, M, hd), N = B * r. The r sequences of an item
        attend to its memory together, folded into the query axis (B, r * L, D): the memory's
        keys/values are never copied per sequence. Every op in the sublayer is per query token, so
        this equals attending row by row."""
        n, length, width = hidden.shape
        b = kv[0].shape[0]
        if n == b:
            return self.crossattention(hidden, mask, kv)
        if n % b:
            raise ValueError(f"{n} sequences cannot share a memory of {b} items: need a multiple of {b}")
        folded = hidden.reshape(b, n // b * length, width)  # (B, r * L, D)
        return self.crossattention(folded, mask, kv).view(n, length, width)


class TextEncoder(nn.Module):
    """BERT embeddings + self-attention layers (official `text_encoder`: BERT layers 0..n-1)."""

    def __init__(self, config: BertConfig, num_layers: int) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList([BertBlock(config) for _ in range(num_layers)])

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)  # (B, L, D)
        self_mask = attention_mask(mask)
        for layer in self.layer:
            hidden, _ = layer(hidden, self_mask)
        return hidden


class LMHead(nn.Module):
    """BERT's LM prediction head; the output matrix is the word-embedding matrix (tied by use,
    not by a second Parameter, so safetensors stores it once)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)  # (..., V)


class TextDecoder(nn.Module):
    """Causal BERT decoder with cross-attention to the fused sequence, and its LM head."""

    def __init__(self, config: BertConfig, num_layers: int) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList([BertBlock(config, cross_attention=True) for _ in range(num_layers)])
        self.head = LMHead(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        cache: list[LayerCache] | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, list[LayerCache] | None]:
        """input_ids (N, Lnew), mask (N, Lpast + Lnew) 1/0, encoder_hidden (B, M, D), encoder_mask
        (B, M) -> hidden states (N, Lnew, D), cache. N is a multiple of B: rows i*N/B .. (i+1)*N/B - 1
        are decoded against memory item i (beams, candidates), which is not copied per row.
        `cache` (one `LayerCache` per layer) holds the earlier steps; with `use_cache` it is
        created if None, extended in place and returned."""
        past = 0 if cache is None else cache[0].length
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        hidden = self.embeddings(input_ids=input_ids, position_ids=positions)
        self_mask = attention_mask(mask, query_len=input_ids.shape[1], causal=True)
        cross_mask = attention_mask(encoder_mask)
        new_cache: list[LayerCache] | None = [] if use_cache else None
        for i, layer in enumerate(self.layer):
            layer_cache = cache[i] if cache is not None else None
            hidden, c = layer(
                hidden, self_mask, encoder_hidden, cross_mask, cache=layer_cache, use_cache=use_cache
            )
            if new_cache is not None:
                new_cache.append(c)
        return hidden, new_cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, self.embeddings.word_embeddings.weight)
