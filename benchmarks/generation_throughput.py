"""Beam-search generation: mPLUG (`mplug.generation.generate`) vs transformers' BLIP, same sizes.

Two tasks, each timed side by side in one run:

* caption: ViT-B/16 at 384 px (577 visual tokens) + a 12-layer BERT-base decoder that cross-attends
  to the visual tokens only (224M parameters), against `BlipForConditionalGeneration.generate` with
  matching sizes. Beam 5, exactly `--caption-tokens` new tokens on both sides (min = max), batch 4.
* vqa: ours = ViT + 6-layer text encoder over the question + 6-layer skip fusion, then the decoder
  cross-attends to the fused [visual; question] tokens; BLIP = `BlipForQuestionAnswering.generate`
  (its decoder cross-attends to the question encoding only, so its decoding is cheaper by design).
  Beam 5, exactly `--vqa-tokens` new tokens (the official VQA setting is at most 10).

Random weights everywhere (nothing is downloaded); both sides run in eval mode under no_grad.

Timing, as `benchmarks/fusion_cost.py` does it on this shared machine: process CPU time
(`time.process_time`) with one torch thread, so time other processes take from the cores is not
counted; the contenders of a task run back to back in each round (order alternating between rounds),
and the speed ratio BLIP time / our time is the median of the per-round ratios (paired, so drift in
machine load cancels), with its spread. Our time is also split into encoding (ViT, plus text encoder
and fusion for VQA) and decoding (`generate` alone).

Run from the repo root:  .venv/bin/python benchmarks/generation_throughput.py --help
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

from mplug.config import MPlugConfig
from mplug.fusion import FusionEncoder
from mplug.generation import generate
from mplug.text import TextDecoder, TextEncoder
from mplug.vision import CLIPVisionTransformer

BOS, EOS, PAD = 101, 102, 0  # BERT [CLS], [SEP], [PAD]


@dataclass
class Contender:
    """One model's generate call on the batch; `step` returns its CPU seconds by phase."""

    name: str
    params: int
    step: Callable[[], dict[str, float]]
    cpu: list[float] = field(default_factory=list)  # total process CPU seconds, one per round
    wall: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def run(self, record: bool) -> None:
        wall = time.perf_counter()
        phases = self.step()
        wall = time.perf_counter() - wall
        if record:
            self.cpu.append(sum(phases.values()))
            self.wall.append(wall)
            for name, seconds in phases.items():
                self.phases.setdefault(name, []).append(seconds)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["caption", "vqa"], choices=["caption", "vqa"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--caption-tokens", type=int, default=20, help="new tokens per caption (min = max)")
    p.add_argument("--vqa-tokens", type=int, default=10, help="new tokens per answer (min = max)")
    p.add_argument("--question-len", type=int, default=12, help="question tokens (VQA), [CLS] included")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (every contender once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time = work done)")
    p.add_argument("--no-blip", action="store_true", help="time ours only (no ratio)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def cpu_phase(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def n_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def blip_config(cfg: MPlugConfig) -> BlipConfig:
    """BLIP at mPLUG-base sizes: ViT-B/16 at the same resolution, 12-layer BERT-base text side."""
    v, t = cfg.vision_config, cfg.text_config
    return BlipConfig(
        vision_config=dict(
            image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            intermediate_size=v.intermediate_size,
        ),
        text_config=dict(
            hidden_size=t.hidden_size, num_hidden_layers=12,  # vocabulary: BLIP's own 30,524
            num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
            encoder_hidden_size=v.hidden_size,
        ),
    )  # fmt: skip


def caption_contenders(cfg: MPlugConfig, args: argparse.Namespace, images: torch.Tensor) -> list[Contender]:
    vit = CLIPVisionTransformer(cfg.vision_config).eval()
    decoder = TextDecoder(cfg.text_config, 12).eval()
    n = args.caption_tokens

    def ours() -> dict[str, float]:
        visual, encode = cpu_phase(lambda: vit.forward_features(images))  # (B, 577, D)
        mask = torch.ones(visual.shape[:2], dtype=torch.long)
        _, decode = cpu_phase(
            lambda: generate(decoder, visual, mask, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                             num_beams=args.beams, max_length=n, min_length=n)
        )  # fmt: skip
        return {"encode": encode, "decode": decode}

    contenders = [Contender("mplug", n_params(vit, decoder), ours)]
    if not args.no_blip:
        blip = BlipForConditionalGeneration(blip_config(cfg)).eval()

        def theirs() -> dict[str, float]:
            _, total = cpu_phase(
                lambda: blip.generate(
                    pixel_values=images, num_beams=args.beams, min_new_tokens=n, max_new_tokens=n
                )
            )
            return {"total": total}

        contenders.append(Contender("blip", n_params(blip), theirs))
    return contenders


def vqa_contenders(cfg: MPlugConfig, args: argparse.Namespace, images: torch.Tensor) -> list[Contender]:
    vit = CLIPVisionTransformer(cfg.vision_config).eval()
    text_encoder = TextEncoder(cfg.text_config, cfg.text_layers).eval()
    fusion = FusionEncoder(cfg).eval()
    decoder = TextDecoder(cfg.text_config, cfg.decoder_layers).eval()
    b, lq, n = images.shape[0], args.question_len, args.vqa_tokens
    question = torch.randint(1000, cfg.text_config.vocab_size, (b, lq))
    question[:, 0] = BOS
    question_mask = torch.ones(b, lq, dtype=torch.long)
    question_mask[: b // 2, lq // 2 :] = 0  # half the questions are shorter: padded memory

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        visual = vit.forward_features(images)  # (B, Lv, D)
        visual_mask = torch.ones(visual.shape[:2], dtype=torch.long)
        text, visual = fusion(text_encoder(question, question_mask), question_mask, visual, visual_mask)
        return torch.cat([visual, text], 1), torch.cat([visual_mask, question_mask], 1)  # (B, Lv + Lq, ...)

    def ours() -> dict[str, float]:
        (memory, memory_mask), enc = cpu_phase(encode)
        _, dec = cpu_phase(
            lambda: generate(decoder, memory, memory_mask, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                             num_beams=args.beams, max_length=n, min_length=n)
        )  # fmt: skip
        return {"encode": enc, "decode": dec}

    contenders = [Contender("mplug", n_params(vit, text_encoder, fusion, decoder), ours)]
    if not args.no_blip:
        blip = BlipForQuestionAnswering(blip_config(cfg)).eval()

        def theirs() -> dict[str, float]:
            _, total = cpu_phase(
                lambda: blip.generate(input_ids=question, attention_mask=question_mask, pixel_values=images,
                                      num_beams=args.beams, min_new_tokens=n, max_new_tokens=n)
            )  # fmt: skip
            return {"total": total}

        contenders.append(Contender("blip", n_params(blip), theirs))
    return contenders


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def report(task: str, contenders: list[Contender]) -> None:
    print(f"\n[{task}]")
    print(f"{'model':<8}{'params':>9}{'cpu s':>8}{'spread':>13}{'wall s':>8}   phases (median cpu s)")
    for c in contenders:
        phases = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in c.phases.items())
        print(
            f"{c.name:<8}{c.params / 1e6:>8.1f}M{statistics.median(c.cpu):>8.2f}{spread(c.cpu):>13}"
            f"{statistics.median(c.wall):>8.2f}   {phases}"
        )
    if len(contenders) == 2:
        ours, blip = contenders
        ratios = [b / o for o, b in zip(ours.cpu, blip.cpu)]
        print(
            f"speed vs BLIP (BLIP cpu time / ours, paired median): {statistics.median(ratios):.2f}x "
            f"(spread {spread(ratios)})"
        )


@torch.no_grad()
def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = MPlugConfig.preset("base", image_size=args.image_size)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    builders = {"caption": caption_contenders, "vqa": vqa_contenders}
    tasks = {task: builders[task](cfg, args, images) for task in args.tasks}
    print(
        f"beam {args.beams}, batch {args.batch_size}, {args.image_size} px, caption {args.caption_tokens} "
        f"new tokens, vqa {args.vqa_tokens} new tokens (question {args.question_len}), {args.threads} "
        f"thread(s), {args.rounds} rounds after {args.warmup} warm-up, process CPU time"
    )
    for r in range(args.warmup + args.rounds):
        for contenders in tasks.values():
            for c in contenders if r % 2 == 0 else contenders[::-1]:
                c.run(record=r >= args.warmup)
    for task, contenders in tasks.items():
        report(task, contenders)


if __name__ == "__main__":
    main()
