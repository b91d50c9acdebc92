"""Typed training job config (pretraining and every finetuning task), validated once at the
edge (YAML + CLI overrides).

An unknown key or a wrong type fails with the key's dotted path, before any Ray worker starts.
Sections: `model` (preset, overrides, weight sources), `data`, `optim`, `scaling`, `run`, and
one section per task for what only that task reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS = ("tiny", "mini", "base", "large")
TASK_NAMES = (
    "pretrain", "vqa", "caption", "retrieval", "grounding", "nlvr2", "snli_ve",
    "video_retrieval", "video_qa", "video_caption",
)  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    preset: Literal["tiny", "mini", "base", "large"] = "tiny"
    # MPlugConfig fields to override on the preset, e.g. {"fusion_mode": "merged", "queue_size": 4096}.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Weights to start from (any URI). `init`: a whole model — a run of ours (STORAGE/RUN/final,
    # or one STORAGE/RUN/checkpoint_*) or an official mPLUG checkpoint (.pth: pretraining or a
    # task's). Required by finetuning tasks. `init_vision` / `init_text`: the towers, as the
    # official pretraining starts: an OpenAI CLIP checkpoint (ViT-B/16 or ViT-L/14; TorchScript
    # or a state dict) and a Hugging Face BERT folder (config.json + weights). `init` is loaded
    # last, so it wins where both give a weight.
    init: str | None = None
    init_vision: str | None = None
    init_text: str | None = None
    # `init_vision` may be a TorchScript file (OpenAI's released CLIP .pt): loading one runs the
    # code it holds, so it is refused unless you trust its source (docs/faults-and-trust.md).
    trust_torchscript: bool = False
    # Initialise text encoder/fusion/decoder from the packaged MiniLM ("mini") as the official
    # code initialises from bert-base (an `init_text` that needs no download).
    init_text_from_packaged_bert: bool = False
    gradient_checkpointing: bool = False


class DataSection(_Strict):
    # Output URIs of `mplug ingest`; several mix corpora.
    uris: list[str] = Field(default_factory=list)
    # Held-out ingest outputs scored with the task's metric every `run.eval_every_epochs` and at
    # the end (the primary metric Tune optimises); empty: no evaluation during training.
    eval_uris: list[str] = Field(default_factory=list)
    batch_size: int = Field(32, gt=0, description="per worker, per micro-step")
    eval_batch_size: int | None = Field(None, gt=0, description="None: data.batch_size")
    image_size: int | None = Field(None, gt=0, description="None: the model config's")
    max_text_len: int | None = Field(None, gt=2, description="None: the model config's")
    # Rows shuffled together: each rank reads its chunks (parquet row groups) in a seeded order
    # and permutes the rows of this many rows' worth of chunks at a time (`pipelines/data/order.py`).
    local_shuffle_buffer: int = Field(256, ge=0)
    # RandomResizedCrop's smallest area fraction; None: the task's official value (pretraining
    # 0.2, finetuning 0.5). A corpus whose captions name positions and counts (the synthetic
    # one) wants milder crops.
    crop_min_scale: float | None = Field(None, gt=0, le=1)
    # Concurrent Ray Data transform tasks; None: every cluster CPU the training workers leave.
    transform_tasks: int | None = Field(None, gt=0)


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
    # An elastic group looks for room to grow this often (Ray's elastic_resize_monitor_interval_s);
    # each resize is a restart from the latest checkpoint.
    elastic_resize_interval_s: float = Field(60.0, gt=0)

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
    eval_every_epochs: int = Field(1, gt=0, description="with data.eval_uris; the last step always evaluates")
    # Also evaluate before the first step (and after a resume), so every report carries the
    # latest value of the metric: what Tune's schedulers and searchers read (`mplug tune` sets it).
    eval_at_start: bool = False
    # Write the keys of the rows each rank trained on with every checkpoint (RUN/samples/).
    log_sample_keys: bool = False
    seed: int = 0
    # Experiment trackers world rank 0 logs to (docs/tracking.md). `tracking_experiment`: the
    # MLflow experiment / W&B project (default: the run name; `mplug tune`: the search name).
    # `tracking_parent`: set by `mplug tune` for its trials (the search's MLflow run they nest under).
    tracking: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(default_factory=list)
    tracking_experiment: str | None = None
    tracking_parent: str | None = None

    @field_validator("name")
    @classmethod
    def _stable_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError(f"run.name={v!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
        return v

    @field_validator("tracking")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))  # `--tracking mlflow` given twice logs once

    @model_validator(mode="after")
    def _length_given(self) -> RunSection:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("run: set max_steps or epochs")
        return self


class VQASection(_Strict):
    """`task: vqa` (official `vqa_mplug_*.yaml` values as defaults)."""

    answer_len: int = Field(10, gt=2, description="answer tokens incl. [CLS]/[SEP] (targets are cut there)")
    max_answers: int = Field(10, gt=0, description="distinct answers kept per question (by weight)")
    # Rows whose `dataset` is one of these sources (Visual Genome: one answer per question) weigh
    # their answer `single_answer_weight` (official 0.5); every other row weighs its answers by
    # their share of the human answers, however many humans agreed.
    single_answer_sources: list[str] = Field(default_factory=lambda: ["vg"])
    single_answer_weight: float = Field(0.5, gt=0, le=1)
    num_beams: int = Field(5, gt=0)
    max_length: int = Field(10, gt=0, description="generated answer tokens, [SEP] included")
    min_length: int = Field(1, gt=0)
    # Rank a fixed answer list (a JSON list of strings, any URI) instead of generating freely,
    # as the official `rank_answer`; `k_test` candidates re-scored per question.
    answer_list: str | None = None
    k_test: int = Field(128, gt=0)


class CaptionSection(_Strict):
    """`task: caption` (official `caption_mplug_*.yaml` / `caption_mplug_scst.py` values)."""

    prompt: str = Field(
        "", description='text every caption starts with (official: none for COCO, "a picture of " for video)'
    )
    caption_len: int = Field(25, gt=2, description="target tokens incl. [CLS]/[SEP]")
    num_beams: int = Field(5, gt=0)
    min_length: int = Field(8, gt=0, description="generated tokens, [SEP] included")
    max_length: int = Field(25, gt=0)
    # Second stage of the same task: self-critical training with CIDEr-D rewards (start it from
    # the cross-entropy run: --init STORAGE/CE_RUN).
    scst: bool = False
    scst_beams: int = Field(5, gt=1, description="captions sampled per image by beam search")
    # METEOR starts a JVM (a minute on a loaded machine): off for the per-epoch evaluation,
    # on in `mplug evaluate`.
    meteor_during_training: bool = False


class RetrievalSection(_Strict):
    """`task: retrieval` (official `retrieval_*_mplug_large.yaml`)."""

    k_test: int = Field(256, gt=0, description="ITC candidates per query re-scored by ITM")


class GroundingSection(_Strict):
    """`task: grounding` (official `grounding_mplug_large.yaml`)."""

    crop_probability: float = Field(0.5, ge=0, le=1, description="training crops that keep the box")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="a prediction is correct at IoU ≥ this")
    bin_init: Literal["keep", "ordinal"] = Field(
        "keep",
        description="the coordinate tokens' start: keep = as loaded (official: BERT's [unused] rows); "
        "ordinal = a code in which neighbouring bins start alike, written when the run starts unless "
        "model.init is a grounding model",
    )
    loss: Literal["weighted", "cross_entropy"] = Field(
        "weighted",
        description="weighted = the official loss (each coordinate token's cross-entropy times its "
        "L1 error and 1 - GIoU of the decoded box); cross_entropy = the plain token cross-entropy",
    )


class VideoSection(_Strict):
    """`task: video_retrieval | video_qa | video_caption`: how many of a clip's stored frames
    (`mplug ingest --format video --num-frames`) the model reads (official: retrieval 12, QA 16,
    captioning 8). Evaluation picks them uniformly; training by `frame_sampling`."""

    num_frames: int = Field(8, gt=0, description="frames per clip, each through the vision tower")
    frame_sampling: Literal["uniform", "rand", "headtail"] = Field(
        "rand", description="which stored frames a training row reads (official: rand)"
    )


class TrainConfig(_Strict):
    # Which task of the registry (`pipelines/tasks`) this job trains.
    task: Literal[
        "pretrain", "vqa", "caption", "retrieval", "grounding", "nlvr2", "snli_ve",
        "video_retrieval", "video_qa", "video_caption",
    ] = "pretrain"  # fmt: skip
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=lambda: RunSection(max_steps=1000))
    vqa: VQASection = Field(default_factory=VQASection)
    caption: CaptionSection = Field(default_factory=CaptionSection)
    retrieval: RetrievalSection = Field(default_factory=RetrievalSection)
    grounding: GroundingSection = Field(default_factory=GroundingSection)
    video: VideoSection = Field(default_factory=VideoSection)


PretrainConfig = TrainConfig  # the name of the pretraining-only config this grew from


class ConfigError(ValueError):
    """A job config that does not validate; the message names every bad key."""


# Shipped configs for real clusters mark what only their user knows (a bucket, the weights to
# start from) with this; a job still holding it is refused before anything is read or started.
PLACEHOLDER = "CHANGE-ME"
# What sets each key a shipped config leaves as a placeholder (other keys: --set KEY=VALUE).
PLACEHOLDER_FLAGS = {
    "model.init": "--init STORAGE/RUN or an official checkpoint (mplug_base.pth, mplug_large.pth)",
    "model.init_vision": "--init-vision URI",
    "model.init_text": "--init-text URI",
    "run.storage": "--storage URI",
    "data.uris": "--data URI",
    "data.eval_uris": "--eval-data URI",
}


def check_placeholders(values: dict[str, Any], flags: dict[str, str] | None = None) -> None:
    """Refuse config values (a nested dict, e.g. `job.model_dump()`) that still hold PLACEHOLDER:
    one line naming each such key, its value and the flag that sets it (`flags`: key → flag,
    default PLACEHOLDER_FLAGS)."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list | tuple):
            for item in node:
                walk(item, key)
        elif isinstance(node, str) and PLACEHOLDER in node:
            found.append((key, node))

    walk(values, "")
    hints = PLACEHOLDER_FLAGS if flags is None else flags
    if found:
        raise ConfigError(
            "; ".join(
                f"{key} is a placeholder ({value}): pass {hints.get(key, f'--set {key}=VALUE')}"
                for key, value in found
            )
        )


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


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (or defaults) + dotted-key overrides → a validated TrainConfig."""
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        from pipelines import storage

        if not storage.exists(str(path)):
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = storage.read_text(str(path))
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"invalid config {source}: top level must be a mapping, got {type(loaded).__name__}"
            )
        raw = loaded
    raw = apply_overrides(raw, overrides or {})
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
