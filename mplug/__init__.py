"""mPLUG: vision-language model with cross-modal skip-connections (Li et al., EMNLP 2022).

Pure PyTorch + transformers + timm; imports neither Ray nor the pipelines.
"""
