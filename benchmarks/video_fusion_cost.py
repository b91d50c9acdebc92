"""Long visual sequences: the fusion's cost on a video's concatenated frame tokens, skip-connected
against the merged all-layer alternative (the paper's efficiency argument, where it is largest).

A clip of T frames gives the fusion T × 577 visual tokens at base size (ViT-B/16 at 384 px: 24 × 24
patches and the CLS token; `--tokens-per-frame`), 9,232 at 16 frames. For T in `--frames`, both fusion modes at mPLUG-base width (D = 768, 12 heads,
FFN 3072, 6 layers, skip S = 3: one connected layer) over one clip and a `--text-len` question:

* forward FLOPs, analytic (`mplug.flops.fusion_flops`), checked against torch's FLOP counter for
  the cases up to `--check-flops-up-to` visual tokens (counting runs a forward);
* time of one forward in evaluation mode (what zero-shot video runs), and with `--backward` of a
  training forward + backward; median of `--rounds` after one untimed run, on the process's CPU
  time (`--clock cpu`, honest on a loaded machine with `--threads 1`) or wall time, or CUDA time
  with `--device cuda`;
* peak memory of that step above what the built encoder and inputs hold: the process's peak
  resident set (each case runs in a fresh process, so the peak is its own) on CPU,
  `torch.cuda.max_memory_allocated` on CUDA.

Run from the repo root:  .venv/bin/python benchmarks/video_fusion_cost.py --help
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from mplug.config import MPlugConfig
from mplug.flops import fusion_flops, measured_flops
from mplug.fusion import FusionEncoder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", nargs="+", type=int, default=[1, 4, 8, 16], help="T, frames per clip")
    p.add_argument(
        "--tokens-per-frame", type=int, default=577, help="visual tokens of one frame, CLS included"
    )
    p.add_argument(
        "--modes", nargs="+", default=["skip", "merged"], choices=["skip", "merged", "coattention"]
    )
    p.add_argument("--text-len", type=int, default=30, help="Lt, question tokens")
    p.add_argument("--stride", type=int, default=3, help="S of the skip mode")
    p.add_argument("--rounds", type=int, default=2, help="timed steps per case, after one untimed")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time = work done)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="CPU: which time the table uses")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backward", action="store_true", help="time a training forward + backward instead")
    p.add_argument("--check-flops-up-to", type=int, default=2308, help="count FLOPs with torch up to this Lv")
    p.add_argument("--case", help=argparse.SUPPRESS)  # MODE:LV, run by the parent in a fresh process
    return p.parse_args(argv)


def run_case(mode: str, lv: int, args: argparse.Namespace) -> dict:
    """One configuration in this process: FLOPs, peak memory of a step, step times."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = MPlugConfig.preset("base", fusion_mode=mode, fusion_stride=args.stride)
    encoder = FusionEncoder(config).to(device).train(args.backward)  # dropout as in training
    d, lt = config.text_config.hidden_size, args.text_len
    text = torch.randn(1, lt, d, device=device, requires_grad=args.backward)
    visual = torch.randn(1, lv, d, device=device, requires_grad=args.backward)
    masks = (torch.ones(1, lt, device=device), torch.ones(1, lv, device=device))

    def step() -> None:
        if args.backward:
            encoder.zero_grad(set_to_none=True)
            t, v = encoder(text, masks[0], visual, masks[1])
            (t.sum() + v.sum()).backward()
        else:
            with torch.no_grad():
                encoder(text, masks[0], visual, masks[1])
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
        step()
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    analytic = fusion_flops(config, lv, lt)
    if lv <= args.check_flops_up_to:  # after the memory step: counting runs a forward of its own
        with torch.no_grad():
            counted = measured_flops(lambda: encoder(text, masks[0], visual, masks[1]))
        if counted != analytic:
            raise RuntimeError(f"{mode} Lv={lv}: torch counts {counted} FLOPs, analytic {analytic}")
    times = []
    for _ in range(args.rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        times.append(cpu if args.clock == "cpu" and device.type == "cpu" else wall)
    return {"mode": mode, "lv": lv, "gflop": analytic / 1e9, "peak_mib": peak / 2**20,
            "ms": 1e3 * statistics.median(times), "spread_ms": [1e3 * min(times), 1e3 * max(times)],
            "flops_checked": lv <= args.check_flops_up_to}  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.case:
        mode, lv = args.case.split(":")
        print(json.dumps(run_case(mode, int(lv), args)))
        return
    forwarded = sys.argv[1:]
    results = {}
    for frames in args.frames:
        for mode in args.modes:
            lv = frames * args.tokens_per_frame
            proc = subprocess.run([sys.executable, __file__, *forwarded, "--case", f"{mode}:{lv}"],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"case {mode} Lv={lv} failed:\n{proc.stderr[-3000:]}")
            results[(frames, mode)] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[(frames, mode)]
            print(f"  measured {mode:<7} T={frames:<3} Lv={lv:<6} {r['ms']:9.0f} ms  {r['peak_mib']:8.0f} MiB",
                  file=sys.stderr, flush=True)  # fmt: skip
    what = "forward + backward (training)" if args.backward else "forward (evaluation, no grad)"
    clock = "CUDA wall" if args.device == "cuda" else f"{args.clock}, {args.threads} thread(s)"
    print(f"fusion of one clip at base width (D=768, 12 heads, FFN 3072, 6 layers, skip S={args.stride}), "
          f"{args.tokens_per_frame} tokens per frame, Lt={args.text_len}; {what}; time: {clock}, median of "
          f"{args.rounds}; memory: peak above the built encoder and inputs ({args.device})")  # fmt: skip
    print()
    print(
        "| frames | visual tokens | mode | fwd GFLOP | FLOP vs merged | time ms | time vs merged | peak MiB | memory vs merged |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for frames in args.frames:
        merged = results.get((frames, "merged"))
        for mode in args.modes:
            r = results[(frames, mode)]

            def ratio(key: str, r=r, merged=merged) -> str:
                return f"{r[key] / merged[key]:.2f}" if merged and merged[key] > 0 else "-"

            print(f"| {frames} | {r['lv']:,} | {mode} | {r['gflop']:,.1f} | {ratio('gflop')} | {r['ms']:,.0f} | "
                  f"{ratio('ms')} | {r['peak_mib']:,.0f} | {ratio('peak_mib')} |")  # fmt: skip
    checked = sorted({r["lv"] for r in results.values() if r["flops_checked"]})
    print(f"\nanalytic FLOPs equal torch.utils.flop_counter's for Lv in {checked}")


if __name__ == "__main__":
    main()
