"""Foreign checkpoints, in one place: the official mPLUG state dict and plain BERT weights.

Official naming (X-PLUG/mPLUG, as `mplug_base.pth` / `mplug_large.pth` and the finetuning
models use it), mapped key by key onto ours:

    visual_encoder.visual.class_embedding            -> visual_encoder.cls_token        (D) -> (1, 1, D)
    visual_encoder.visual.positional_embedding       -> visual_encoder.pos_embed        resized to our grid
    visual_encoder.visual.conv1.weight               -> visual_encoder.patch_embed.proj.weight
    visual_encoder.visual.ln_pre / ln_post           -> visual_encoder.norm_pre / norm
    ...transformer.resblocks.i.attn.in_proj_*        -> visual_encoder.blocks.i.attn.qkv.*
    ...transformer.resblocks.i.attn.out_proj.*       -> visual_encoder.blocks.i.attn.proj.*
    ...transformer.resblocks.i.ln_1 / ln_2           -> visual_encoder.blocks.i.norm1 / norm2
    ...transformer.resblocks.i.mlp.c_fc / c_proj     -> visual_encoder.blocks.i.mlp.fc1 / fc2
    visn_fc / visn_layer_norm                        -> visual_adapter.fc / visual_adapter.norm
    text_encoder.embeddings.*                        -> text_encoder.embeddings.*
    text_encoder.encoder.layer.i.*                   -> text_encoder.layer.i.*
    fusion_encoder.encoder.layer.(start + i).*       -> fusion_encoder.layer.i.*
    text_decoder.bert.embeddings.*                   -> text_decoder.embeddings.*
    text_decoder.bert.encoder.layer.i.*              -> text_decoder.layer.i.*
    text_decoder.cls.predictions.transform.* / bias  -> text_decoder.head.transform.* / bias
    {text,fusion}_encoder.cls.predictions.*          -> mlm_head.*
    vision_proj, text_proj, itm_head, temp, image_queue, text_queue, queue_ptr: same names
    and each `*_m` momentum copy of the above the same way (visn_fc_m -> visual_adapter_m).

The pretraining checkpoints wrap towers as `text_encoder.bert.` / `fusion_encoder.fusion.`;
those infixes are dropped first (as the official finetuning scripts do). Parameters the
official model holds but never runs are dropped on purpose (`IGNORED`, logged, not reported
as unexpected): CLIP's text tower and output projection, the first `12 - fusion_layers` fusion
layers and the fusion embeddings, cross-attention inside connected fusion layers, the LM
decoder matrix (tied to the word embeddings), and momentum fusion/decoder copies.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import fsspec
import torch

from mplug.modeling import MPlugForPretraining
from mplug.vision import resize_pos_embed

log = logging.getLogger(__name__)

IGNORED: tuple[tuple[str, str], ...] = (
    (r"^visual_encoder(_m)?\.(transformer|token_embedding|positional_embedding|ln_final|text_projection|logit_scale)",
     "CLIP text tower"),
    (r"^visual_encoder(_m)?\.visual\.proj$", "CLIP output projection (mPLUG uses all tokens before it)"),
    (r"^fusion_encoder(_m)?\.embeddings\.", "fusion embeddings (never run)"),
    (r"^(fusion_encoder|text_decoder)_m\.", "momentum fusion/decoder (not kept here)"),
    (r"\.cls\.predictions\.decoder\.(weight|bias)$", "LM decoder tied to word embeddings / bias"),
    (r"\.position_ids$", "position-id buffer"),
    (r"^idx_queue$", "retrieval index queue"),
)  # fmt: skip


class LoadResult(NamedTuple):
    """Keys of the model left unset, and keys of the checkpoint nothing could take."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
    else:
        # A URI or path, through fsspec (s3://, gs://, file://, plain paths); tensors only, no pickled code.
        with fsspec.open(str(path_or_state_dict), "rb") as f:
            sd = torch.load(f, map_location="cpu", weights_only=True)
    for wrapper in ("model", "module", "state_dict"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = dict(sd[wrapper])
    return sd


def _normalise_official(key: str) -> str:
    """Drop the pretraining wrappers: `text_encoder.bert.` -> `text_encoder.`, `fusion_encoder.fusion.` -> ..."""
    key = re.sub(r"^(text_encoder(_m)?)\.bert\.", r"\1.", key)
    return re.sub(r"^(fusion_encoder(_m)?)\.(fusion|bert)\.", r"\1.", key)


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


def _unused_official(model: MPlugForPretraining, key: str) -> str | None:
    """Why an official (normalised) key is dropped on purpose, or None when it should be used."""
    reason = next((why for pattern, why in IGNORED if re.search(pattern, key)), None)
    if reason is not None:
        return reason
    cfg = model.config
    layer = re.match(r"^fusion_encoder\.encoder\.layer\.(\d+)\.(.*)$", key)
    if layer is not None:
        i = int(layer.group(1)) - _fusion_start(cfg)
        if not 0 <= i < cfg.fusion_layers:
            return "fusion layer the official model never runs"
        if layer.group(2).startswith("crossattention.") and i in cfg.connected_layer_indices():
            return "cross-attention of a connected fusion layer (never run)"
    return None


def _fusion_start(cfg: Any) -> int:
    """The official fusion model holds the full BERT depth and runs its last `fusion_layers`."""
    return cfg.text_config.num_hidden_layers - cfg.fusion_layers


def official_key_map(model: MPlugForPretraining, key: str) -> str | None:
    """Our name for an official (normalised) key, or None when we have no such parameter."""
    m = re.match(r"^(\w+?)(_m)?\.(.*)$", key)
    if m is None:  # top-level tensors: temp, queues
        return key if key in ("temp", "image_queue", "text_queue", "queue_ptr") else None
    head, mom, rest = m.group(1), m.group(2) or "", m.group(3)
    if head == "visual_encoder":
        rest = rest.removeprefix("visual.")
        if rest in _CLIP_TOP:
            return f"visual_encoder{mom}.{_CLIP_TOP[rest]}"
        b = re.match(r"^transformer\.resblocks\.(\d+)\.(.*)$", rest)
        if b and b.group(2) in _CLIP_BLOCK:
            return f"visual_encoder{mom}.blocks.{b.group(1)}.{_CLIP_BLOCK[b.group(2)]}"
        return None
    if head in ("visn_fc", "visn_layer_norm"):
        return f"visual_adapter{mom}.{'fc' if head == 'visn_fc' else 'norm'}.{rest}"
    if head in ("text_encoder", "fusion_encoder") and rest.startswith("cls.predictions."):
        return "mlm_head." + rest.removeprefix("cls.predictions.")
    if head == "text_encoder":
        return f"text_encoder{mom}.{rest.replace('encoder.layer.', 'layer.', 1)}"
    if head == "fusion_encoder" and not mom:
        layer = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", rest)
        if layer is None:
            return None
        return f"fusion_encoder.layer.{int(layer.group(1)) - _fusion_start(model.config)}.{layer.group(2)}"
    if head == "text_decoder" and not mom:
        rest = rest.removeprefix("bert.").replace("encoder.layer.", "layer.", 1)
        return f"text_decoder.{rest.replace('cls.predictions.', 'head.', 1)}"
    if head in ("vision_proj", "text_proj", "itm_head"):
        return f"{head}{mom}.{rest}"
    return None


def _convert(
    model: MPlugForPretraining,
    source: Mapping[str, torch.Tensor],
    key_map: Callable[[str], str | None],
    unused: Callable[[str], str | None],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map every source key; shape-check against the model; return (our state dict, unexpected)."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in source.items():
        reason = unused(key)
        if reason is not None:
            log.info("ignoring %s (%s)", key, reason)
            continue
        name = key_map(key)
        if name is None or name not in ours:
            unexpected.append(key)
            continue
        target = ours[name]
        if name.endswith("cls_token"):
            value = value.reshape(1, 1, -1)
        elif name.endswith("pos_embed"):
            grid = model.config.image_size // model.config.vision_config.patch_size
            value = resize_pos_embed(value.reshape(1, -1, value.shape[-1]).float(), (grid, grid))
        elif name in ("image_queue", "text_queue") and value.shape != target.shape:
            log.info(
                "ignoring %s: queue %s does not fit ours %s", key, tuple(value.shape), tuple(target.shape)
            )
            continue
        elif name in ("queue_ptr", "temp") and value.numel() == target.numel():
            value = value.reshape(target.shape)
        if value.shape != target.shape:
            raise ValueError(
                f"{key} -> {name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(target.shape)}"
            )
        out[name] = value.to(target.dtype)
    return out, unexpected


def _load(
    model: MPlugForPretraining, converted: dict[str, torch.Tensor], unexpected: list[str]
) -> LoadResult:
    has_momentum = any(re.match(r"^\w+_m\.", k) for k in converted)
    if model.config.use_itc and not has_momentum:
        # No momentum weights in the file: start the EMA copies from the loaded online weights.
        model.load_state_dict(converted, strict=False)
        model._sync_momentum()
        ignore_missing = re.compile(r"^\w+_m\.")
    else:
        model.load_state_dict(converted, strict=False)
        ignore_missing = None
    missing = [
        k for k in model.state_dict()
        if k not in converted and not (ignore_missing and ignore_missing.match(k))
    ]  # fmt: skip
    return LoadResult(missing, unexpected)


def load_official_checkpoint(
    model: MPlugForPretraining, path_or_state_dict: str | os.PathLike | Mapping[str, Any]
) -> LoadResult:
    """Load an official mPLUG state dict (a `.pth` path/URI or a dict) into `model`.

    Position embeddings are resampled to `model.config.image_size`; a shape mismatch anywhere
    else is an error naming the key. Returns (missing_keys, unexpected_keys).
    """
    source = {_normalise_official(k): v for k, v in _read_state_dict(path_or_state_dict).items()}
    converted, unexpected = _convert(
        model, source, lambda k: official_key_map(model, k), lambda k: _unused_official(model, k)
    )
    return _load(model, converted, unexpected)


# ---- BERT ---------------------------------------------------------------------------------
def _read_bert(state_dict_or_dir: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BERT state dict, or a folder (path or URI) holding model.safetensors or pytorch_model.bin."""
    if isinstance(state_dict_or_dir, Mapping):
        return dict(state_dict_or_dir)
    from safetensors.torch import load as load_safetensors

    folder = str(state_dict_or_dir).rstrip("/")
    fs, root = fsspec.core.url_to_fs(folder)
    if fs.exists(f"{root}/model.safetensors"):
        with fs.open(f"{root}/model.safetensors", "rb") as f:
            return load_safetensors(f.read())
    if fs.exists(f"{root}/pytorch_model.bin"):
        with fs.open(f"{root}/pytorch_model.bin", "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder!r}")


def bert_key_map(model: MPlugForPretraining, key: str) -> list[str]:
    """Our names for one BERT key (a BERT layer can feed the text encoder or fusion and the decoder)."""
    cfg = model.config
    key = key.removeprefix("bert.")
    if key.startswith("embeddings."):
        return [f"text_encoder.{key}", f"text_decoder.{key}"]
    if key.startswith("cls.predictions."):
        rest = key.removeprefix("cls.predictions.")
        names = [f"text_decoder.head.{rest}"]
        if cfg.use_mlm:
            names.append(f"mlm_head.{rest}")
        return names
    m = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", key)
    if m is None:
        return []
    n, rest = int(m.group(1)), m.group(2)
    names = []
    if n < cfg.text_layers:
        names.append(f"text_encoder.layer.{n}.{rest}")
    elif n < cfg.text_layers + cfg.fusion_layers:
        names.append(f"fusion_encoder.layer.{n - cfg.text_layers}.{rest}")
    if n < cfg.decoder_layers:
        names.append(f"text_decoder.layer.{n}.{rest}")
    return names


def init_text_from_bert(
    model: MPlugForPretraining, state_dict_or_dir: str | os.PathLike | Mapping[str, torch.Tensor]
) -> LoadResult:
    """Initialise the text side from a BERT checkpoint, as the official code does.

    text encoder = embeddings + BERT layers 0..text_layers-1; fusion layer i = BERT layer
    text_layers + i (self-attention and FFN; cross-attention stays freshly initialised);
    decoder = embeddings + BERT layers 0..decoder_layers-1 (+ the MLM prediction head when the
    checkpoint has one). For BERT-base (12 layers) that is text 0-5, fusion 6-11, decoder 0-11;
    for the packaged MiniLM-L6-H384 with the `mini` preset: text 0-2, fusion 3-5, decoder 0-5.
    Accepts a state dict or a folder (path/URI) with model.safetensors or pytorch_model.bin.
    Returns (our keys not set, BERT keys not used); momentum copies are re-synced.
    """
    cfg = model.config
    source = _read_bert(state_dict_or_dir)
    depth = 1 + max(
        (int(m.group(1)) for k in source if (m := re.search(r"encoder\.layer\.(\d+)\.", k))), default=-1
    )
    if cfg.text_layers + cfg.fusion_layers > depth or cfg.decoder_layers > depth:
        raise ValueError(
            f"BERT checkpoint has {depth} layers; text_layers + fusion_layers = {cfg.text_layers + cfg.fusion_layers}"
            f" and decoder_layers = {cfg.decoder_layers} must both be <= {depth}"
        )
    ours = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in source.items():
        if re.search(
            r"(position_ids|cls\.predictions\.decoder\.(weight|bias))$|(^|\.)pooler\.|seq_relationship", key
        ):
            continue  # buffer / tied to the word embeddings / pooler and NSP head mPLUG never runs
        names = [n for n in bert_key_map(model, key) if n in ours]
        if not names:
            unexpected.append(key)
        for name in names:
            if value.shape != ours[name].shape:
                raise ValueError(
                    f"{key} -> {name}: BERT shape {tuple(value.shape)} != model shape {tuple(ours[name].shape)}"
                )
            converted[name] = value.to(ours[name].dtype)
    model.load_state_dict(converted, strict=False)
    model._sync_momentum()
    missing = [
        k
        for k in ours
        if k not in converted and k.startswith(("text_encoder.", "fusion_encoder.", "text_decoder."))
    ]
    return LoadResult(missing, unexpected)
