"""Per-step throughput and data-wait accounting, the log line, MFU, and the curves plot."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import torch

# Dense bf16 tensor-core peak FLOP/s per GPU (vendor datasheets, no sparsity). MFU is only
# reported for devices listed here; an unknown GPU reports none rather than a wrong number.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16; V100 has no bf16 tensor cores
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # Longest key first so "A10G" is not taken for "A10".
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


@dataclass
class StepMeter:
    """Splits wall time into waiting for the next batch vs computing, over a logging window."""

    wait_s: float = 0.0
    compute_s: float = 0.0
    samples: int = 0
    steps: int = 0
    _mark: float = field(default_factory=lambda: time.perf_counter())

    def restart(self) -> None:
        """Start the clock now: what happened since the last mark (an evaluation, a checkpoint
        upload) is neither waiting nor computing."""
        self._mark = time.perf_counter()

    def batch_arrived(self) -> None:
        now = time.perf_counter()
        self.wait_s += now - self._mark
        self._mark = now

    def step_done(self, samples: int) -> None:
        now = time.perf_counter()
        self.compute_s += now - self._mark
        self._mark = now
        self.samples += samples
        self.steps += 1

    def window(self) -> dict[str, float]:
        """Throughput over the window since the last call, then start a new window."""
        total = max(self.wait_s + self.compute_s, 1e-9)
        out = {
            "samples_per_s": self.samples / total,
            "data_wait_frac": self.wait_s / total,
            "step_time_s": total / max(self.steps, 1),
        }
        self.wait_s = self.compute_s = 0.0
        self.samples = self.steps = 0
        return out


def format_step_line(row: dict[str, float], max_steps: int) -> str:
    """`step 20/300 loss 3.1 (itc 1.2 itm 0.6 ...) lr ... samples/s ... data-wait ...`, then any
    evaluation metrics of the row."""
    parts = " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_"))
    line = (
        f"step {int(row['step'])}/{max_steps} loss {row['loss']:.4f}{f' ({parts})' if parts else ''} "
        f"lr {row['lr']:.2e} samples/s {row['samples_per_s']:.1f} data-wait {100 * row['data_wait_frac']:.0f}%"
    )
    if "mfu" in row:
        line += f" MFU {100 * row['mfu']:.1f}%"
    evals = " ".join(
        f"{k[5:]} {v:.2f}"
        for k, v in row.items()
        if k.startswith("eval_") and not k.startswith(("eval_chance_", "eval_num_"))
    )
    return line + (f" | eval {evals}" if evals else "")


def plot_curves_png(history: list[dict[str, float]], title: str) -> bytes:
    """Loss per objective, lr and throughput against step, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_prefix"):
        ys = [r.get(key) for r in history]
        if any(y is not None for y in ys):
            axes[0].plot(steps, ys, label=key, linewidth=2 if key == "loss" else 1)
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(steps, [r.get("lr") for r in history])
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r.get("samples_per_s") for r in history])
    axes[2].set_title("samples/s (global)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
