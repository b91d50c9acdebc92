"""Fusion cost at base width: skip-connected vs all-connected (merged) vs two-stream co-attention.

For each fusion mode and visual sequence length, builds `mplug.fusion.FusionEncoder` at mPLUG-base
width (D = 768, 12 heads, FFN 3072, 6 layers, S = 3 for skip) and reports, in one run:

* analytic forward FLOPs (`mplug.flops.fusion_flops`, checked against torch's FLOP counter) and the
  training FLOPs of one forward + backward (3x);
* measured CPU forward + backward time, on two clocks: wall time, and the process's CPU time
  (`time.process_time`). On a shared machine the wall time of a step includes every moment the OS
  gave the cores to someone else; with `--threads 1` the CPU time counts only the work the step did
  itself, so `--clock cpu` (the default) is the one to trust when other processes compete. (With
  several threads CPU time also counts OpenMP spin-waiting: use `--clock wall` on a quiet machine.)
  The configurations are timed round-robin, one step each per round, so a burst of load hits every
  configuration alike; the table gives the median over rounds and the spread (min-max);
* FLOP and time ratios against the merged (all-connected) fusion. The time ratio is the median of the
  per-round ratios (paired, so drift between rounds cancels), with its spread, and "time/FLOP" is the
  agreement time ratio / FLOP ratio (1.00 = time follows FLOPs exactly).

`--profile` adds a torch.profiler breakdown per configuration (self CPU time in matrix products, the
fused attention kernel, softmax, dropout masks and the element-wise rest), which shows where time and
FLOPs part ways.

Run from the repo root:  .venv/bin/python benchmarks/fusion_cost.py --help
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from mplug.config import FUSION_MODES, MPlugConfig
from mplug.flops import fusion_flops, measured_flops
from mplug.fusion import FusionEncoder

# Operator groups for --profile, by self CPU time: matrix products (what the FLOP count sees), the fused
# CPU attention kernel, softmax and dropout's random masks (which run over the whole (B, heads, Lq, Lk)
# score tensor when SDPA falls back to its unfused path, as it does on CPU with attention dropout), and
# the remaining element-wise work (LayerNorm, GELU, adds, copies: memory-bound, not in the FLOP count).
OP_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "flash": ("flash_attention",),
    "softmax": ("softmax",),
    "bernoulli": ("bernoulli",),
}


@dataclass
class Case:
    mode: str
    visual_tokens: int
    encoder: FusionEncoder
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    forward_flops: float  # analytic, whole batch
    wall: list[float]  # seconds per forward + backward, one per round
    cpu: list[float]  # process CPU seconds per forward + backward, one per round


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(FUSION_MODES), choices=FUSION_MODES)
    p.add_argument(
        "--visual-tokens", nargs="+", type=int, default=[257, 577], help="Lv values (CLS included)"
    )
    p.add_argument("--text-len", type=int, default=30, help="Lt, text tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--stride", type=int, default=3, help="S of the skip mode")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of every case per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time = work done)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="which time the ratios use")
    p.add_argument(
        "--dropout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train-mode dropout (0.1) as in training; --no-dropout runs eval mode with gradients",
    )
    p.add_argument("--profile", action="store_true", help="also print a per-operator-group time breakdown")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if "merged" not in args.modes:
        p.error("--modes must include 'merged': every ratio is taken against it")
    return args


def build_case(mode: str, visual_tokens: int, args: argparse.Namespace) -> Case:
    config = MPlugConfig.preset("base", fusion_mode=mode, fusion_stride=args.stride)
    encoder = FusionEncoder(config).train(args.dropout)
    b, lt, d = args.batch_size, args.text_len, config.text_config.hidden_size
    inputs = (
        torch.randn(b, lt, d, requires_grad=True),  # text (B, Lt, D)
        torch.ones(b, lt),
        torch.randn(b, visual_tokens, d, requires_grad=True),  # visual (B, Lv, D), as the ViT would give
        torch.ones(b, visual_tokens),
    )
    analytic = b * fusion_flops(config, visual_tokens, lt)
    with torch.no_grad():
        counted = measured_flops(lambda: encoder(*inputs))
    if counted != analytic:
        raise RuntimeError(f"{mode} Lv={visual_tokens}: torch counts {counted} FLOPs, analytic {analytic}")
    return Case(mode, visual_tokens, encoder, inputs, analytic, [], [])


def step(case: Case) -> tuple[float, float]:
    """One forward + backward; returns its (wall, process CPU) time in seconds."""
    case.encoder.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    text, visual = case.encoder(*case.inputs)
    (text.sum() + visual.sum()).backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def profile(case: Case) -> dict[str, float]:
    """Self CPU milliseconds of one forward + backward, by `OP_GROUPS` (the rest under "other")."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(case)
    groups = dict.fromkeys([*OP_GROUPS, "other"], 0.0)
    for event in prof.key_averages():
        group = next((g for g, keys in OP_GROUPS.items() if any(k in event.key for k in keys)), "other")
        groups[group] += event.self_cpu_time_total / 1e3
    return groups


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cases = [build_case(m, lv, args) for lv in args.visual_tokens for m in args.modes]
    for _ in range(args.warmup):
        for case in cases:
            step(case)
    for _ in range(args.rounds):
        for case in cases:
            wall, cpu = step(case)
            case.wall.append(wall)
            case.cpu.append(cpu)

    def times(case: Case) -> list[float]:
        return case.cpu if args.clock == "cpu" else case.wall

    def ratios(case: Case, reference: Case, clock: str = args.clock) -> list[float]:
        a, b = (case.cpu, reference.cpu) if clock == "cpu" else (case.wall, reference.wall)
        return [x / y for x, y in zip(a, b)]

    print(
        f"fusion cost, base width (D=768, 12 heads, FFN 3072, 6 layers, skip S={args.stride}), "
        f"Lt={args.text_len}, batch {args.batch_size}, {args.threads} thread(s), "
        f"dropout {'on' if args.dropout else 'off'}, {args.rounds} rounds after {args.warmup} warm-up, "
        f"ratios on {args.clock} time"
    )
    print("analytic FLOPs match torch.utils.flop_counter for every case (checked before timing)")
    header = (
        f"{'mode':<12}{'Lv':>5} {'connected':<12}{'fwd GFLOP':>10}{'f+b GFLOP':>10}{f'{args.clock} ms':>9}"
        f"{'spread ms':>14}{'wall ms':>9}{'GFLOP/s':>8}{'FLOP ratio':>11}{'time ratio':>11}{'spread':>13}"
        f"{'time/FLOP':>10}{'wall ratio':>11}"
    )
    print(header)
    print("-" * len(header))
    for lv in args.visual_tokens:
        merged = next(c for c in cases if c.visual_tokens == lv and c.mode == "merged")
        for case in (c for c in cases if c.visual_tokens == lv):
            median = statistics.median(times(case))
            flop_ratio = case.forward_flops / merged.forward_flops
            paired = ratios(case, merged)
            time_ratio = statistics.median(paired)
            connected = ",".join(map(str, case.encoder.connected_layer_indices)) or "-"
            spread = f"{min(times(case)) * 1e3:.0f}-{max(times(case)) * 1e3:.0f}"
            print(
                f"{case.mode:<12}{lv:>5} {connected:<12}{case.forward_flops / 1e9:>10.1f}"
                f"{3 * case.forward_flops / 1e9:>10.1f}{median * 1e3:>9.0f}{spread:>14}"
                f"{statistics.median(case.wall) * 1e3:>9.0f}{3 * case.forward_flops / median / 1e9:>8.0f}"
                f"{flop_ratio:>11.3f}{time_ratio:>11.3f}{f'{min(paired):.3f}-{max(paired):.3f}':>13}"
                f"{time_ratio / flop_ratio:>10.2f}{statistics.median(ratios(case, merged, 'wall')):>11.3f}"
            )
    if "skip" in args.modes:
        print()
        for lv in args.visual_tokens:
            skip = next(c for c in cases if c.visual_tokens == lv and c.mode == "skip")
            merged = next(c for c in cases if c.visual_tokens == lv and c.mode == "merged")
            flop_ratio = skip.forward_flops / merged.forward_flops
            time_ratio = statistics.median(ratios(skip, merged))
            gap = time_ratio / flop_ratio - 1
            verdict = "within" if abs(gap) <= 0.15 else "OUTSIDE"
            print(
                f"skip/merged at Lv={lv}: {args.clock} time ratio {time_ratio:.3f} vs FLOP ratio "
                f"{flop_ratio:.3f} -> {gap:+.1%} ({verdict} 15%)"
            )
    if args.profile:
        print("\nself CPU ms of one forward + backward by operator group (torch.profiler, single run)")
        names = [*OP_GROUPS, "other"]
        print(f"{'mode':<12}{'Lv':>5}" + "".join(f"{n:>11}" for n in names) + f"{'non-matmul':>12}")
        for case in cases:
            g = profile(case)
            share = 1 - g["matmul"] / sum(g.values())
            print(
                f"{case.mode:<12}{case.visual_tokens:>5}"
                + "".join(f"{g[n]:>11.0f}" for n in names)
                + f"{share:>12.0%}"
            )


if __name__ == "__main__":
    main()
