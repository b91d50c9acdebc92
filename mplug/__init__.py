"""mPLUG: vision-language model with cross-modal skip-connections (Li et al., EMNLP 2022).

Pure PyTorch + transformers + timm; imports neither Ray nor the pipelines.
"""

from mplug.config import MPlugConfig, MPlugVisionConfig
from mplug.fusion import FusionEncoder
from mplug.modeling import MPlugForPretraining, MPlugPreTrainedModel, MPlugPretrainingOutput
from mplug.official import init_text_from_bert, load_official_checkpoint

__all__ = [
    "FusionEncoder",
    "MPlugConfig",
    "MPlugForPretraining",
    "MPlugPreTrainedModel",
    "MPlugPretrainingOutput",
    "MPlugVisionConfig",
    "init_text_from_bert",
    "load_official_checkpoint",
]
