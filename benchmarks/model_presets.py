"""The model presets at a glance: parameters, resolution, GFLOP per sample, what each is for.

    .venv/bin/python -m benchmarks.model_presets            # the README's table (markdown)

Parameters are counted on a model built on the meta device (no memory, no init): the online
towers and the pretraining heads (ITC projections, ITM head, MLM transform), without the momentum
copies and with the LM matrices tied to the word embeddings, as the paper counts them. FLOPs are
analytic (`mplug.flops`, checked against torch's FLOP counter by tests/unit/test_flops.py): one
forward of every part for an image-text pair, and one pretraining step (forward + backward of
ITC, ITM, MLM and PrefixLM, momentum forwards included) per sample at the preset's own queue.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from mplug import MPlugConfig, MPlugForPretraining, flops
from mplug.config import PRESETS

# What each preset is for; the resolutions after `+` are the official finetuning recipes'
# (jobs/configs/finetune_*_{base,large}.yaml), where the FLOPs grow with the visual tokens.
PURPOSE = {
    "tiny": "CPU tests and the demo: trains from scratch in minutes",
    "mini": "a small real-text model: its text side starts from the packaged MiniLM-L6 "
    "(`model.init_text_from_packaged_bert: true`)",
    "base": "mPLUG-base: CLIP ViT-B/16 + BERT-base; starts from the official `mplug_base.pth`",
    "large": "mPLUG-large: CLIP ViT-L/14 + BERT-base; starts from the official `mplug_large.pth` or "
    "`mplug_large_v2.pth`",
}
FINETUNE_SIZES = {"base": 384, "large": 336}


@dataclass(frozen=True)
class PresetRow:
    preset: str
    image_size: int
    patch_size: int
    visual_tokens: int
    parameters: int
    forward_gflop: float
    pretrain_step_gflop: float
    purpose: str


def parameter_count(cfg: MPlugConfig) -> int:
    with torch.device("meta"):
        model = MPlugForPretraining(cfg)
    return model.num_parameters_without_momentum()


def preset_rows(text_len: int = 30, finetune_sizes: bool = True) -> list[PresetRow]:
    """One row per preset at its pretraining resolution, then base and large at the official
    finetuning resolution (`finetune_sizes`)."""
    rows = []
    sizes = [(name, None) for name in PRESETS]
    if finetune_sizes:
        sizes += list(FINETUNE_SIZES.items())
    for name, image_size in sizes:
        cfg = (
            MPlugConfig.preset(name)
            if image_size is None
            else MPlugConfig.preset(name, image_size=image_size)
        )
        rows.append(
            PresetRow(
                preset=name,
                image_size=cfg.image_size,
                patch_size=cfg.vision_config.patch_size,
                visual_tokens=flops.visual_token_count(cfg),
                parameters=parameter_count(cfg),  # the position table grows with the grid
                forward_gflop=flops.forward_flops(cfg, text_len=text_len)["total"] / 1e9,
                pretrain_step_gflop=flops.pretraining_step_flops(cfg, text_len=text_len) / 1e9,
                purpose=PURPOSE[name] if image_size is None else "the official VQA / captioning resolution",
            )
        )
    return rows


def _gflop(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def markdown_table(rows: list[PresetRow]) -> str:
    lines = [
        "| preset | parameters | image px (patch, visual tokens) | GFLOP forward | GFLOP pretraining step "
        "| for |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.preset}` | {r.parameters / 1e6:,.1f}M | {r.image_size} ({r.patch_size}, {r.visual_tokens}) "
            f"| {_gflop(r.forward_gflop)} | {_gflop(r.pretrain_step_gflop)} | {r.purpose} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-len", type=int, default=30, help="text tokens per sample (default 30)")
    args = parser.parse_args()
    print(markdown_table(preset_rows(args.text_len)))
    print(
        f"\nGFLOP per sample (one image-text pair, {args.text_len} text tokens): forward of every part; "
        "pretraining step = forward + backward of ITC, ITM, MLM, PrefixLM with momentum forwards, "
        "batch 256, the preset's queue. Parameters without momentum copies."
    )


if __name__ == "__main__":
    main()
