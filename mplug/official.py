"""Foreign weights, through one filter: an OpenAI CLIP checkpoint (the vision tower), a Hugging
Face BERT folder (the text side) and the official mPLUG checkpoints (pretraining and task models).

Every source runs the same pipeline: read (any fsspec URI: safetensors, a pickled state dict
possibly wrapped in `model` / `module` / `state_dict` and loaded with `weights_only=True`, or a
TorchScript archive only when the caller trusts it: loading one runs its code) -> normalise names ->
map each key onto ours -> shape-check / resize -> load -> report. Every source key ends in exactly
one of three places: loaded (onto one or more model tensors), ignored with a logged reason, or an
error naming it. A key the model has no module for (an ITM head loaded into a captioning model)
is ignored as "not used by this task's model"; a key the filter does not know, a key aimed at a
module the model has but a tensor it lacks (one layer too many), a shape or depth mismatch: an
error, raised before anything is loaded. Momentum copies (`*_m`) the source does not provide are
re-synced from the online weights just loaded. The returned `LoadReport` prints as one line.

Official naming (X-PLUG/mPLUG @c666bfa, its task models and the pretraining `mplug_*.pth`):

    visual_encoder.visual.class_embedding            -> visual_encoder.cls_token        (D) -> (1, 1, D)
    visual_encoder.visual.positional_embedding       -> visual_encoder.pos_embed        resized to our grid
    visual_encoder.visual.conv1.weight               -> visual_encoder.patch_embed.proj.weight
    visual_encoder.visual.ln_pre / ln_post           -> visual_encoder.norm_pre / norm
    ...transformer.resblocks.i.attn.in_proj_*        -> visual_encoder.blocks.i.attn.qkv.*
    ...transformer.resblocks.i.attn.out_proj.*       -> visual_encoder.blocks.i.attn.proj.*
    ...transformer.resblocks.i.ln_1 / ln_2           -> visual_encoder.blocks.i.norm1 / norm2
    ...transformer.resblocks.i.mlp.c_fc / c_proj     -> visual_encoder.blocks.i.mlp.fc1 / fc2
    visn_fc / visn_layer_norm                        -> visual_adapter.fc / visual_adapter.norm
    text_encoder[.bert].embeddings.*                 -> text_encoder.embeddings.*
    text_encoder[.bert].encoder.layer.i.*            -> text_encoder.layer.i.*
    fusion_encoder[.fusion|.bert].encoder.layer.(start + i).* -> fusion_encoder.layer.i.*
    text_decoder.bert.embeddings.*                   -> text_decoder.embeddings.*
    text_decoder.bert.encoder.layer.i.*              -> text_decoder.layer.i.*
    text_decoder.cls.predictions.transform.* / bias  -> text_decoder.head.transform.* / bias
    fusion_encoder.cls.predictions.*                 -> mlm_head.*   (text_encoder.cls.* if the only one)
    vision_proj, text_proj, itm_head, temp, image_queue, text_queue, queue_ptr, idx_queue: same names

and each momentum copy `X_m` of the above onto our `X_m` (visn_fc_m -> visual_adapter_m), never
onto the online module: a model without that momentum copy ignores it. The fusion model holds
a full BERT depth and runs its last `fusion_layers` layers (start = depth - fusion_layers).
The CLIP file uses the same visual names without the `visual_encoder.` prefix.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from torch import nn

from mplug.vision import resize_pos_embed

log = logging.getLogger(__name__)

Source = str | os.PathLike | Mapping[str, Any]


# ---- the report -------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """Where every key went. `loaded`: source key -> the model keys it set; `ignored`: source key
    -> why; `resynced`: momentum keys copied from their online weights; `left_at_init`: model
    keys nothing set. `str(report)` is the one line a trainer logs."""

    source: str
    loaded: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    resynced: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)

    def model_keys_loaded(self) -> list[str]:
        return sorted({name for names in self.loaded.values() for name in names})

    def __str__(self) -> str:
        into = self.model_keys_loaded()
        parts = [f"{len(self.loaded)} tensors loaded into {len(into)} ({_by_module(into) or 'none'})"]
        if self.ignored:
            reasons = Counter(self.ignored.values())
            parts.append(
                f"{len(self.ignored)} ignored ("
                + "; ".join(f"{why}: {n}" for why, n in reasons.most_common())
                + ")"
            )
        if self.resynced:
            parts.append(f"{len(self.resynced)} momentum tensors re-synced from the online weights")
        parts.append(f"{len(self.left_at_init)} left at init ({_by_module(self.left_at_init) or 'none'})")
        return ", ".join(parts)


def _by_module(keys: Iterable[str]) -> str:
    counts = Counter(key.split(".", 1)[0] for key in keys)
    return ", ".join(f"{module} {n}" for module, n in sorted(counts.items()))


# ---- reading ----------------------------------------------------------------------------------
def _pickle_safe_globals() -> list[Any]:
    """Plain data classes training scripts put next to the weights (argparse args, numpy scalars
    such as a best score); allow-listed so `weights_only=True` still refuses anything executable."""
    import argparse

    import numpy as np

    scalar = np._core.multiarray.scalar
    reconstruct = np._core.multiarray._reconstruct
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return [
        argparse.Namespace, np.dtype, np.ndarray, scalar, reconstruct, *dtypes,
        (scalar, "numpy.core.multiarray.scalar"), (reconstruct, "numpy.core.multiarray._reconstruct"),
    ]  # fmt: skip


def _is_torchscript(data: bytes) -> bool:
    """TorchScript archives (OpenAI's CLIP `.pt` files) are zips holding `constants.pkl`; a
    `torch.save` zip has none."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    return any(name.endswith("/constants.pkl") for name in zipfile.ZipFile(io.BytesIO(data)).namelist())


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping):
        inner = next(
            (obj[w] for w in ("model", "module", "state_dict") if isinstance(obj.get(w), Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict (str -> tensor), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [k for k in obj if k not in tensors]
    if others:
        raise ValueError(
            f"{where}: entries {others[:5]} are not tensors; expected a state dict, optionally wrapped "
            "in 'model', 'module' or 'state_dict'"
        )
    return tensors


class UntrustedTorchScript(ValueError):
    """A TorchScript archive met without `trust_torchscript`: loading it would run its code."""


def read_state_dict(source: Source, *, trust_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a mapping, or a file at any fsspec URI (s3://, gs://, file://, a
    path): safetensors, a pickled state dict (tensors and plain data only: `torch.load` with
    `weights_only=True`, so nothing in it runs), possibly wrapped in `model` / `module` /
    `state_dict` (nested wrappers too), or - only with `trust_torchscript` - a TorchScript archive.

    TorchScript (`torch.jit.load`) runs the code the archive holds, by design: anyone who can
    write the file can run code here. OpenAI's released CLIP `.pt` files are TorchScript; load
    one only from a source you trust, or convert it to safetensors first."""
    if isinstance(source, Mapping):
        return _unwrap(source, "state dict")
    uri = os.fspath(source)
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    if _is_torchscript(data):
        if not trust_torchscript:
            raise UntrustedTorchScript(
                f"{uri} is a TorchScript archive: loading one runs the code it holds. If it comes from a "
                "source you trust (OpenAI's released CLIP files are TorchScript), set "
                "model.trust_torchscript: true (CLI: --set model.trust_torchscript=true); else convert "
                "it to a state dict or safetensors file where it cannot run code"
            )
        with warnings.catch_warnings():  # torch.jit is deprecated, and the only reader of these files
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict())
    with torch.serialization.safe_globals(_pickle_safe_globals()):
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return _unwrap(obj, uri)


def _describe(source: Source) -> str:
    return "state dict" if isinstance(source, Mapping) else os.fspath(source)


# ---- the one pipeline -------------------------------------------------------------------------
@dataclass(frozen=True)
class Ignore:
    """A source key dropped on purpose, and why."""

    reason: str


# A key map: a normalised source key -> the model keys it feeds, an Ignore, or None (unknown).
KeyMap = Callable[[str], "tuple[str, ...] | Ignore | None"]

_LAYERED = re.compile(r"^(.*?\.(?:blocks|layer|visual_layer))\.(\d+)\.")
_RESHAPEABLE = ("temp", "queue_ptr", "idx_queue")  # same numel, another rank (official 0-d temp, (1, Q) ids)


def _layer_indices(keys: Iterable[str]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = defaultdict(set)
    for key in keys:
        if m := _LAYERED.match(key):
            out[m.group(1)].add(int(m.group(2)))
    return out


def _module(name: str) -> str:
    return name.split(".", 1)[0]


def _online_name(name: str) -> str | None:
    """`visual_encoder_m.blocks.0.x` -> `visual_encoder.blocks.0.x`; None for an online key."""
    head, _, rest = name.partition(".")
    return f"{head.removesuffix('_m')}.{rest}" if head.endswith("_m") and rest else None


UNUSED = "not used by this task's model"
MOMENTUM_NOT_KEPT = "momentum copy this model does not keep"


def _absent_reason(name: str) -> str:
    return MOMENTUM_NOT_KEPT if _module(name).endswith("_m") else UNUSED


def _fit(where: str, key: str, value: torch.Tensor, name: str, target: torch.Tensor) -> torch.Tensor:
    """`value` shaped as the model's `name`: class token reshaped, position table resampled to the
    model's grid (the one resampler), scalars reshaped; anything else must match exactly."""
    shape = tuple(value.shape)
    if name.endswith("pos_embed"):
        if value.shape[-1] != target.shape[-1]:
            raise ValueError(
                f"{where}: {key} {shape} -> {name} {tuple(target.shape)}: width {value.shape[-1]} != "
                f"the model's {target.shape[-1]}"
            )
        grid = math.isqrt(target.shape[1] - 1)
        value = resize_pos_embed(value.reshape(1, -1, value.shape[-1]).float(), (grid, grid))
    elif name.endswith("cls_token") and value.dim() == 1:
        value = value.reshape(1, 1, -1)
    elif name in _RESHAPEABLE and value.numel() == target.numel():
        value = value.reshape(target.shape)
    if value.shape != target.shape:
        raise ValueError(f"{where}: {key} {shape} -> {name} {tuple(target.shape)}: shapes differ")
    return value.to(target.dtype)


def _no_place_error(where: str, key: str, name: str, ours: Mapping[str, torch.Tensor]) -> ValueError:
    m = _LAYERED.match(name)
    if m:
        depth = len(_layer_indices(ours)[m.group(1)])
        why = f"{m.group(1)} has {depth} layers (0-{depth - 1}): the depths differ"
    else:
        why = f"the model's {_module(name)} has no such tensor"
    return ValueError(f"{where}: {key} -> {name}, but {why}")


def _filter_and_load(
    model: nn.Module, source: Mapping[str, tuple[str, torch.Tensor]], key_map: KeyMap, where: str, layout: str
) -> LoadReport:
    """Map, check and load every key of `source` (normalised name -> (the file's name, tensor))
    into `model`; the report and errors use the file's names. Nothing is loaded unless every key
    is accounted for."""
    ours = model.state_dict()
    modules = {_module(k) for k in ours}
    report = LoadReport(where)
    values: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # model key -> the source key that set it
    unknown: list[str] = []
    for normalised, (key, value) in source.items():
        target = key_map(normalised)
        if target is None:
            unknown.append(key)
            continue
        if isinstance(target, Ignore):
            report.ignored[key] = target.reason
            continue
        for name in target:
            if name not in ours and _module(name) in modules:
                raise _no_place_error(where, key, name, ours)
        present = [n for n in target if n in ours]
        if not present:
            report.ignored[key] = _absent_reason(target[0])
            continue
        for name in present:
            if name in origin:
                raise ValueError(f"{where}: {origin[name]} and {key} both map onto {name}")
            values[name] = _fit(where, key, value, name, ours[name])
            origin[name] = key
        report.loaded[key] = tuple(present)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ValueError(
            f"{where}: {len(unknown)} keys this filter does not know: {shown}. It reads {layout}"
        )
    # A tower the source fills must be filled at every depth (fewer layers would stay random).
    have = _layer_indices(ours)
    for prefix, filled in _layer_indices(origin).items():
        if filled != have[prefix]:
            raise ValueError(
                f"{where}: fills {prefix} layers {sorted(filled)} but the model has {len(have[prefix])}: "
                "the depths differ"
            )
    for name in ours:  # momentum copies the source lacks start from the online weights just loaded
        online = _online_name(name)
        if name not in values and online in values:
            values[name] = values[online]
            report.resynced.append(name)
    result = model.load_state_dict(values, strict=False)
    if result.unexpected_keys:  # every name was checked against the state dict above
        raise RuntimeError(f"{where}: load_state_dict rejected {result.unexpected_keys[:5]}")
    report.left_at_init = [k for k in ours if k not in values]
    _log_report(report)
    return report


def _log_report(report: LoadReport) -> None:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key, why in report.ignored.items():
        by_reason[why].append(key)
    for why, keys in by_reason.items():
        log.info("%s: ignoring %d keys (%s), e.g. %s", report.source, len(keys), why, keys[0])
        log.debug("%s: ignored (%s): %s", report.source, why, keys)
    if report.left_at_init:
        log.info("%s: left at init: %s", report.source, _by_module(report.left_at_init))
    log.info("%s: %s", report.source, report)


def _strip_module_prefix(key: str) -> str:
    """DDP / DeepSpeed wrappers prefix every key with `module.`."""
    while key.startswith("module."):
        key = key.removeprefix("module.")
    return key


def _normalised(
    source: Mapping[str, torch.Tensor], rename: Callable[[str], str], where: str
) -> dict[str, tuple[str, torch.Tensor]]:
    """Normalised name -> (the file's name, tensor)."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in source.items():
        name = rename(_strip_module_prefix(key))
        if name in out:
            raise ValueError(f"{where}: {out[name][0]!r} and {key!r} both normalise to {name!r}")
        out[name] = (key, value)
    return out


# ---- CLIP names (the OpenAI ViT, as a CLIP file and inside official mPLUG) ----------------------
_CLIP_BLOCK = {
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_CLIP_TOP = {
    "conv1.weight": "patch_embed.proj.weight",
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
    "class_embedding": "cls_token",
    "positional_embedding": "pos_embed",
}
_CLIP_TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
                    "logit_scale")  # fmt: skip
_CLIP_TEXT_REASON = "CLIP text tower (mPLUG encodes text with BERT)"
_CLIP_PROJ_REASON = "CLIP output projection (mPLUG uses every token before it)"
_CLIP_LAYOUT = (
    "OpenAI CLIP ViT keys: visual.{class_embedding, positional_embedding, conv1.weight, ln_pre.*, ln_post.*, "
    "proj, transformer.resblocks.N.{attn.in_proj_*, attn.out_proj.*, ln_1.*, ln_2.*, mlp.c_fc.*, "
    "mlp.c_proj.*}} "
    "and the text tower (token_embedding, positional_embedding, transformer.*, ln_final.*, text_projection, "
    "logit_scale), ignored"
)


def _clip_visual_name(rest: str) -> str | None:
    """Our ViT name (under `visual_encoder`) for a CLIP `visual.` key without that prefix."""
    if rest in _CLIP_TOP:
        return _CLIP_TOP[rest]
    block = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", rest)
    if block and block.group(2) in _CLIP_BLOCK:
        return f"blocks.{block.group(1)}.{_CLIP_BLOCK[block.group(2)]}"
    return None


def _clip_key_map(key: str) -> tuple[str, ...] | Ignore | None:
    if key in ("input_resolution", "context_length", "vocab_size"):
        return Ignore("CLIP model metadata")
    if not key.startswith("visual."):
        return Ignore(_CLIP_TEXT_REASON) if key.split(".", 1)[0] in _CLIP_TEXT_TOWER else None
    rest = key.removeprefix("visual.")
    if rest == "proj":
        return Ignore(_CLIP_PROJ_REASON)
    name = _clip_visual_name(rest)
    return None if name is None else (f"visual_encoder.{name}",)


def init_vision_from_clip(model: nn.Module, uri: Source, *, trust_torchscript: bool = False) -> LoadReport:
    """Initialise the vision tower (`visual_encoder`) from an OpenAI CLIP ViT checkpoint
    (ViT-B/16, ViT-L/14: the `visual.*` keys; the official `.pt` files are TorchScript, loaded only
    with `trust_torchscript` since loading one runs its code; a plain state dict or safetensors
    works too) at any fsspec URI, or from a state dict. The position table is resampled to the
    model's grid; the text tower and `visual.proj` are ignored with reasons; a width or depth
    mismatch is an error naming the key; `visual_encoder_m` is re-synced."""
    where = _describe(uri)
    source = _normalised(read_state_dict(uri, trust_torchscript=trust_torchscript), lambda k: k, where)
    return _filter_and_load(model, source, _clip_key_map, where, _CLIP_LAYOUT)


# ---- BERT -------------------------------------------------------------------------------------
_BERT_IGNORED: tuple[tuple[str, str], ...] = (
    (r"position_ids$", "position-id buffer"),
    (r"^cls\.predictions\.decoder\.weight$", "LM decoder matrix (tied to the word embeddings)"),
    (r"^cls\.predictions\.decoder\.bias$", "LM decoder bias (the same tensor as cls.predictions.bias)"),
    (r"^pooler\.", "BERT pooler (mPLUG never runs it)"),
    (r"^cls\.seq_relationship\.", "BERT next-sentence head (not an mPLUG objective)"),
)
_BERT_LAYOUT = (
    "Hugging Face BERT keys, with or without `bert.`: embeddings.*, encoder.layer.N.*, cls.predictions.*, "
    "pooler.* and cls.seq_relationship.* (ignored)"
)
_BERT_CHECKED = ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def _bert_rename(key: str) -> str:
    key = key.removeprefix("bert.")
    # Checkpoints converted from TensorFlow (the original bert-base-uncased) name LayerNorm gamma/beta.
    return re.sub(
        r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    )


def _bert_key_map(cfg: Any) -> KeyMap:
    """BERT layer n -> text encoder layer n (n < text_layers), fusion layer n - text_layers (the
    next fusion_layers), decoder layer n (n < decoder_layers); embeddings -> encoder and decoder;
    the MLM head -> `mlm_head` and the decoder's head."""
    text, fusion, decoder = cfg.text_layers, cfg.fusion_layers, cfg.decoder_layers

    def key_map(key: str) -> tuple[str, ...] | Ignore | None:
        reason = next((why for pattern, why in _BERT_IGNORED if re.search(pattern, key)), None)
        if reason is not None:
            return Ignore(reason)
        if key.startswith("embeddings."):
            return (f"text_encoder.{key}", f"text_decoder.{key}")
        if key.startswith("cls.predictions."):
            rest = key.removeprefix("cls.predictions.")
            return (f"mlm_head.{rest}", f"text_decoder.head.{rest}")
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", key)
        if m is None:
            return None
        n, rest = int(m.group(1)), m.group(2)
        names = []
        if n < text:
            names.append(f"text_encoder.layer.{n}.{rest}")
        elif n < text + fusion:
            names.append(f"fusion_encoder.layer.{n - text}.{rest}")
        if n < decoder:
            names.append(f"text_decoder.layer.{n}.{rest}")
        return tuple(names) or Ignore(f"BERT layers beyond text_layers + fusion_layers = {text + fusion}")

    return key_map


def _read_bert_folder(folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the weights of a Hugging Face BERT folder at any fsspec URI."""
    from safetensors.torch import load as load_safetensors

    fs, root = fsspec.core.url_to_fs(folder)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/config.json"):
        raise FileNotFoundError(f"{folder!r} is not a Hugging Face BERT folder: no config.json")
    with fs.open(f"{root}/config.json", "rb") as f:
        config = json.load(f)
    if fs.exists(f"{root}/model.safetensors"):
        with fs.open(f"{root}/model.safetensors", "rb") as f:
            return config, load_safetensors(f.read())
    if fs.exists(f"{root}/model.safetensors.index.json"):  # sharded
        with fs.open(f"{root}/model.safetensors.index.json", "rb") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            with fs.open(f"{root}/{shard}", "rb") as f:
                weights |= load_safetensors(f.read())
        return config, weights
    if fs.exists(f"{root}/pytorch_model.bin"):
        return config, read_state_dict(f"{folder.rstrip('/')}/pytorch_model.bin")
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder!r}")


def init_text_from_bert(model: nn.Module, folder_uri: str | os.PathLike) -> LoadReport:
    """Initialise the text side from a Hugging Face BERT folder (config.json + model.safetensors or
    pytorch_model.bin; a `BertModel` or a `BertForMaskedLM` / `BertForPreTraining`), as the official
    code does: text encoder = embeddings + BERT layers 0..text_layers-1; fusion layer i = BERT
    layer text_layers + i (self-attention and FFN; cross-attention stays at init); decoder =
    embeddings + BERT layers 0..decoder_layers-1; the MLM head (when the folder has one) ->
    `mlm_head` and the decoder's head. For BERT-base: text 0-5, fusion 6-11, decoder 0-11; for
    the packaged MiniLM-L6-H384 with the `mini` preset: text 0-2, fusion 3-5, decoder 0-5.
    config.json's width, heads, FFN width and vocabulary must match `model.config.text_config`;
    pooler and NSP head are ignored with reasons; momentum copies are re-synced."""
    folder = os.fspath(folder_uri)
    cfg = model.config
    bert_config, weights = _read_bert_folder(folder)
    for name in _BERT_CHECKED:
        theirs, ours = bert_config.get(name), getattr(cfg.text_config, name)
        if theirs is not None and theirs != ours:
            raise ValueError(
                f"{folder}/config.json: {name}={theirs}, but the model's text_config.{name}={ours}"
            )
    source = _normalised(weights, _bert_rename, folder)
    depth = 1 + max(
        (int(m.group(1)) for k in source if (m := re.match(r"encoder\.layer\.(\d+)\.", k))), default=-1
    )
    if cfg.text_layers + cfg.fusion_layers > depth or cfg.decoder_layers > depth:
        raise ValueError(
            f"{folder}: the BERT checkpoint has {depth} layers; text_layers + fusion_layers = "
            f"{cfg.text_layers + cfg.fusion_layers} and decoder_layers = {cfg.decoder_layers} must both be "
            f"<= {depth}"
        )
    return _filter_and_load(model, source, _bert_key_map(cfg), folder, _BERT_LAYOUT)


# ---- official mPLUG ---------------------------------------------------------------------------
OFFICIAL_IGNORED: tuple[tuple[str, str], ...] = (
    (r"\.position_ids$", "position-id buffer"),
    (r"\.cls\.predictions\.decoder\.weight$", "LM decoder matrix (tied to the word embeddings)"),
    (r"\.cls\.predictions\.decoder\.bias$", "LM decoder bias (the same tensor as cls.predictions.bias)"),
    (r"^fusion_encoder(_m)?\.embeddings\.", "fusion embeddings (never run)"),
    (r"\.pooler\.", "BERT pooler (never run)"),
    (
        r"^(prefix_ids|target_ids|bbox_prob_mask)$",
        "grounding start/bin token ids and logit mask (derived here)",
    ),
)
_OFFICIAL_LAYOUT = (
    "official mPLUG keys: visual_encoder[_m].visual.* (CLIP ViT) and its text tower, visn_fc / "
    "visn_layer_norm[_m], text_encoder[_m][.bert].{embeddings, encoder.layer.N, cls.predictions}.*, "
    "fusion_encoder[_m][.fusion|.bert].{embeddings, encoder.layer.N, cls.predictions}.*, "
    "text_decoder[_m].{bert.embeddings, bert.encoder.layer.N, cls.predictions}.*, vision_proj / text_proj / "
    "itm_head[_m], temp, image_queue, text_queue, queue_ptr, idx_queue, prefix_ids / target_ids / "
    "bbox_prob_mask (grounding); optionally under `module.`"
)
_QUEUES = ("image_queue", "text_queue", "queue_ptr", "idx_queue")


def _official_rename(key: str) -> str:
    """Drop the pretraining wrappers: `text_encoder.bert.` -> `text_encoder.`,
    `fusion_encoder.fusion.` / `fusion_encoder.bert.` -> `fusion_encoder.` (as the task scripts do)."""
    key = re.sub(r"^(text_encoder(_m)?)\.bert\.", r"\1.", key)
    return re.sub(r"^(fusion_encoder(_m)?)\.(fusion|bert)\.", r"\1.", key)


def _official_key_map(model: nn.Module, source: Mapping[str, tuple[str, torch.Tensor]], where: str) -> KeyMap:
    cfg = model.config
    ours = model.state_dict()
    fusion_depth = 1 + max(
        (
            int(m.group(2))
            for k in source
            if (m := re.match(r"^fusion_encoder(_m)?\.encoder\.layer\.(\d+)\.", k))
        ),
        default=-1,
    )
    start = fusion_depth - cfg.fusion_layers  # the official fusion runs its last `fusion_layers` layers
    if fusion_depth > 0 and start < 0:
        raise ValueError(
            f"{where}: the fusion encoder has {fusion_depth} layers, fewer than "
            f"fusion_layers={cfg.fusion_layers}"
        )
    connected = set(cfg.connected_layer_indices())
    # The fusion encoder's MLM head is the one mPLUG's MLM trains; a text-encoder head beside it is not.
    fusion_mlm = {m for m in ("", "_m") if any(k.startswith(f"fusion_encoder{m}.cls.") for k in source)}
    queue_reason = None
    if (
        "image_queue" in source
        and "image_queue" in ours
        and source["image_queue"][1].shape != ours["image_queue"].shape
    ):
        queue_reason = (
            f"feature queues of another size (checkpoint {tuple(source['image_queue'][1].shape)}, model "
            f"{tuple(ours['image_queue'].shape)}): the model's queues keep their init"
        )

    def key_map(key: str) -> tuple[str, ...] | Ignore | None:
        reason = next((why for pattern, why in OFFICIAL_IGNORED if re.search(pattern, key)), None)
        if reason is not None:
            return Ignore(reason)
        if key in ("temp", *_QUEUES):
            return Ignore(queue_reason) if queue_reason and key in _QUEUES else (key,)
        top = re.match(r"^(\w+?)(_m)?\.(.+)$", key)
        if top is None:
            return None
        head, m, rest = top.group(1), top.group(2) or "", top.group(3)
        if head == "visual_encoder":
            if not rest.startswith("visual."):
                return Ignore(_CLIP_TEXT_REASON) if rest.split(".", 1)[0] in _CLIP_TEXT_TOWER else None
            if rest == "visual.proj":
                return Ignore(_CLIP_PROJ_REASON)
            name = _clip_visual_name(rest.removeprefix("visual."))
            return None if name is None else (f"visual_encoder{m}.{name}",)
        if head in ("visn_fc", "visn_layer_norm"):
            return (f"visual_adapter{m}.{'fc' if head == 'visn_fc' else 'norm'}.{rest}",)
        if head in ("text_encoder", "fusion_encoder") and rest.startswith("cls.predictions."):
            if head == "text_encoder" and m in fusion_mlm:
                return Ignore(
                    "text encoder's MLM head (MLM runs the fusion encoder's head, also in the file)"
                )
            return (f"mlm_head{m}.{rest.removeprefix('cls.predictions.')}",)
        if head == "text_encoder":
            if rest.startswith("embeddings."):
                return (f"text_encoder{m}.{rest}",)
            layer = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", rest)
            return None if layer is None else (f"text_encoder{m}.layer.{layer.group(1)}.{layer.group(2)}",)
        if head == "fusion_encoder":
            layer = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", rest)
            if layer is None:
                return None
            i = int(layer.group(1)) - start
            if i < 0:
                return Ignore(
                    f"fusion layers the official model never runs (it runs the last {cfg.fusion_layers})"
                )
            if layer.group(2).startswith("crossattention.") and i in connected:
                return Ignore("cross-attention of a connected fusion layer (never run)")
            return (f"fusion_encoder{m}.layer.{i}.{layer.group(2)}",)
        if head == "text_decoder":
            if rest.startswith("bert.embeddings."):
                return (f"text_decoder{m}.{rest.removeprefix('bert.')}",)
            layer = re.match(r"^bert\.encoder\.layer\.(\d+)\.(.+)$", rest)
            if layer is not None:
                return (f"text_decoder{m}.layer.{layer.group(1)}.{layer.group(2)}",)
            if rest.startswith("cls.predictions."):
                return (f"text_decoder{m}.head.{rest.removeprefix('cls.predictions.')}",)
            return None
        if head in ("vision_proj", "text_proj", "itm_head"):
            return (f"{head}{m}.{rest}",)
        return None

    return key_map


def load_official_checkpoint(model: nn.Module, uri: Source) -> LoadReport:
    """Load an official mPLUG checkpoint into `model`: the pretraining `mplug_base.pth` /
    `mplug_large.pth` or a task model's (VQA, captioning, retrieval, grounding; DeepSpeed
    `module` or `model` wrappers, `module.` key prefixes), at any fsspec URI, or a state dict.

    Position tables are resampled to the model's grid; momentum weights go to the model's
    momentum copies or are ignored (a model without them), never onto the online modules; a
    tower or head the model does not have is ignored ("not used by this task's model"); an
    unknown key, a shape or a depth mismatch is an error naming the key."""
    where = _describe(uri)
    source = _normalised(read_state_dict(uri), _official_rename, where)
    return _filter_and_load(model, source, _official_key_map(model, source, where), where, _OFFICIAL_LAYOUT)


# ---- our own runs ---------------------------------------------------------------------------
_QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def load_mplug_checkpoint(model: nn.Module, uri: Source) -> LoadReport:
    """Load a state dict in this library's own layout (a run's `final/model.safetensors` or a
    `checkpoint_*`) into a model of any task: keys the model has load (a position table of
    another grid is resampled: finetuning at a new resolution); towers and heads it does not
    have are ignored ("not used by this task's model"); the ITC queues of another length (a
    retrieval model's queue after pretraining without one) are ignored with that reason, the
    model keeping its own fresh queue; anything else that does not fit is an error naming it."""
    where = _describe(uri)
    raw = read_state_dict(uri)
    source = {k: (k, v) for k, v in raw.items()}
    ours = model.state_dict()
    queue_sizes_differ = any(
        k in ours and k in ("image_queue", "text_queue", "idx_queue") and ours[k].shape != v.shape
        for k, v in raw.items()
    )

    def key_map(key: str) -> tuple[str, ...] | Ignore:
        if key.endswith("position_ids"):
            return Ignore("position-id buffer")
        if queue_sizes_differ and key in _QUEUES:
            return Ignore("ITC queue of another length than this model's (it keeps its own)")
        return (key,)

    return _filter_and_load(
        model, source, key_map, where, "mplug's own layout (save_pretrained / checkpoints)"
    )
