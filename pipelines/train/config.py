"""Typed pretraining job config, validated once at the edge (YAML + CLI overrides).

An unknown key or a wrong type fails with the key's dotted path, before any Ray worker starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS = ("tiny", "mini", "base", "large")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    preset: Literal["tiny", "mini", "base", "large"] = "tiny"
    # MPlugConfig fields to override on the preset, e.g. {"fusion_mode": "merged", "queue_size": 4096}.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Initialise text encoder/fusion/decoder from the packaged MiniLM ("mini") as the official
    # code initialises from bert-base; ignored for presets whose width does not match.
    init_text_from_packaged_bert: bool = False
    gradient_checkpointing: bool = False


class DataSection(_Strict):
    # Output URIs of `mplug ingest`; several mix corpora.
    uris: list[str] = Field(default_factory=list)
    batch_size: int = Field(32, gt=0, description="per worker, per micro-step")
    image_size: int | None = Field(None, gt=0, description="None: the model config's")
    max_text_len: int | None = Field(None, gt=2, description="None: the model config's")
    local_shuffle_buffer: int = Field(256, ge=0)
    # RandomResizedCrop's smallest area fraction: 0.2 is the official pretraining value; a
    # corpus whose captions name positions and counts (the synthetic one) wants milder crops.
    crop_min_scale: float = Field(0.2, gt=0, le=1)


class OptimSection(_Strict):
    lr: float = Field(1e-4, gt=0)
    visual_lr: float = Field(1e-5, gt=0, description="learning rate of the vision tower")
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.02, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(1000, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="max global grad norm; None: no clipping")
    grad_accum_steps: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _min_below_lr(self) -> OptimSection:
        if self.min_lr > min(self.lr, self.visual_lr):
            raise ValueError(f"optim.min_lr={self.min_lr} must not exceed lr/visual_lr")
        return self


class ScalingSection(_Strict):
    # An int, or [min, max] for an elastic worker group.
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU")

    @field_validator("num_workers")
    @classmethod
    def _positive(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"num_workers={v!r}: need an int ≥ 1 or [min, max] with 1 ≤ min ≤ max")
        return v


class RunSection(_Strict):
    name: str = "mplug-pretrain"
    storage: str = "runs"
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    num_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(2, ge=-1)
    log_every: int = Field(10, gt=0)
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _stable_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError(f"run.name={v!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
        return v

    @model_validator(mode="after")
    def _length_given(self) -> RunSection:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("run: set max_steps or epochs")
        return self


class PretrainConfig(_Strict):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=lambda: RunSection(max_steps=1000))


class ConfigError(ValueError):
    """A job config that does not validate; the message names every bad key."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"  {key}: {e['msg']}{got}")
    return "\n".join(lines)


def _parse_scalar(text: str) -> Any:
    """A `--set` value: YAML scalar/list syntax, so 1e-4, true, [1, 2] and strings all work."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (e.g. "optim.lr") in a nested dict, creating sections as needed."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[leaf] = value
    return out


def parse_set_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. optim.lr=3e-5")
        out[key.strip()] = _parse_scalar(value)
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """YAML file (or defaults) + dotted-key overrides → a validated PretrainConfig."""
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        from pipelines import storage

        text = storage.read_text(str(path))
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"invalid config {source}: top level must be a mapping, got {type(loaded).__name__}"
            )
        raw = loaded
    raw = apply_overrides(raw, overrides or {})
    try:
        return PretrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
