"""mPLUG: vision-language model with cross-modal skip-connections (Li et al., EMNLP 2022).

Pure PyTorch + transformers + timm; imports neither Ray nor the pipelines.

The public names load on first use (PEP 562): `import mplug.tokenizer` in a Ray Data worker
then costs the tokenizer's imports, not the whole model stack's.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mplug.config import MPlugConfig, MPlugVisionConfig
    from mplug.fusion import FusionEncoder
    from mplug.modeling import MPlugForPretraining, MPlugPreTrainedModel, MPlugPretrainingOutput
    from mplug.official import (
        LoadReport,
        init_text_from_bert,
        init_vision_from_clip,
        load_official_checkpoint,
    )

_EXPORTS = {
    "FusionEncoder": "mplug.fusion",
    "MPlugConfig": "mplug.config",
    "MPlugForPretraining": "mplug.modeling",
    "MPlugPreTrainedModel": "mplug.modeling",
    "MPlugPretrainingOutput": "mplug.modeling",
    "MPlugVisionConfig": "mplug.config",
    "LoadReport": "mplug.official",
    "init_text_from_bert": "mplug.official",
    "init_vision_from_clip": "mplug.official",
    "load_official_checkpoint": "mplug.official",
}

__all__ = [
    "FusionEncoder",
    "MPlugConfig",
    "MPlugForPretraining",
    "MPlugPreTrainedModel",
    "MPlugPretrainingOutput",
    "MPlugVisionConfig",
    "LoadReport",
    "init_text_from_bert",
    "init_vision_from_clip",
    "load_official_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mplug' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
