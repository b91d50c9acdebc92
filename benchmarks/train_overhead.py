"""Ray Train overhead: samples/s of the same tiny model in plain PyTorch loops vs 1 and 2 Ray
Train workers, with the data-wait fraction, in one run on one machine.

Every setting trains the same model, global batch and cores, for `--warmup` steps that are not
timed, then `--steps` timed steps. The warm-up lets Ray Data's transform processes start (their
one-off torch/torchvision/transformers imports cost seconds of CPU each on a small machine; the
warm-up rate and the whole run time are printed apart). Size the corpus so the timed steps stay
inside one epoch: each epoch start re-executes the stream (a second or two here), which a
web-scale epoch amortises; the script prints how many epoch starts the timed part crossed.

Settings:
  plain, in memory   batches transformed before timing: a ceiling with no data work at all
  plain, DataLoader  a torch DataLoader (1 worker process) reads the same shards and runs the
                     same transform while training: the same work as the Ray runs
  Ray Train, N       the real job: Ray Data streams and transforms the shards, N workers train

    .venv/bin/python benchmarks/train_overhead.py --num-images 6000 --warmup 40 --steps 80
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from collections.abc import Iterator

import torch

LR = {"lr": 5e-4, "visual_lr": 5e-4, "weight_decay": 0.02, "betas": (0.9, 0.999), "min_lr": 1e-5}


def make_corpus(root: str, num: int, image_size: int) -> str:
    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.synth.world import render_corpus

    raw = render_corpus(os.path.join(root, "raw"), num=num, fmt="parquet", seed=0, image_size=96)
    out = os.path.join(root, "processed")
    run_ingest(IngestConfig(input=raw["train"], format="parquet", output=out, image_size=image_size))
    return out


JOB = "jobs/configs/pretrain_tiny.yaml"


def _model_config():
    """The model the tiny job trains (its preset plus the job's overrides)."""
    from pipelines.train.config import load_config
    from pipelines.train.launch import build_model_config

    return build_model_config(load_config(JOB))


def _transform():
    from pipelines.data.stream import ImageTextTransform

    cfg = _model_config()
    return ImageTextTransform(image_size=cfg.image_size, max_text_len=cfg.max_text_len, train=True, seed=0)


def _tensors(out: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(out[k]) for k in ("image", "input_ids", "attention_mask")}


class ShardBatches(torch.utils.data.IterableDataset):
    """Endless transformed batches from the corpus shards, as a plain PyTorch job reads them."""

    def __init__(self, corpus: str, batch_size: int) -> None:
        self.files = sorted(glob.glob(os.path.join(corpus, "data", "*.parquet")))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import numpy as np
        import pyarrow.parquet as pq

        transform, rng = _transform(), np.random.default_rng(0)
        while True:
            for i in rng.permutation(len(self.files)):
                table = pq.read_table(self.files[i])
                table = table.take(rng.permutation(table.num_rows))
                for start in range(0, table.num_rows - self.batch_size + 1, self.batch_size):
                    part = table.slice(start, self.batch_size)
                    yield _tensors(
                        transform({c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names})
                    )


def plain_pytorch(
    corpus: str, steps: int, warmup: int, batch_size: int, threads: int, loader: bool
) -> dict[str, float]:
    import pyarrow.parquet as pq

    from pipelines.tasks.base import StepContext
    from pipelines.tasks.pretrain import PretrainTask
    from pipelines.train.config import load_config
    from pipelines.train.optim import build_optimizer
    from pipelines.train.step import train_step

    torch.set_num_threads(threads)
    if loader:
        batches = iter(
            torch.utils.data.DataLoader(ShardBatches(corpus, batch_size), batch_size=None, num_workers=1)
        )
    else:
        table = pq.read_table(sorted(glob.glob(os.path.join(corpus, "data", "*.parquet"))))
        transform = _transform()
        ready = [
            _tensors(transform({c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names}))
            for part in (
                table.slice(s, batch_size) for s in range(0, table.num_rows - batch_size + 1, batch_size)
            )
        ]
        batches = (ready[i % len(ready)] for i in range(10**9))
    torch.manual_seed(0)
    task = PretrainTask(load_config(JOB), _model_config())
    model = task.build_model().train()
    opt, sched = build_optimizer(model, warmup_steps=20, total_steps=warmup + steps, **LR)
    wait = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0, wait = time.perf_counter(), 0.0
        w = time.perf_counter()
        b = next(batches)
        wait += time.perf_counter() - w
        # The loop's own step (loss, backward, optimizer, schedule, momentum update).
        train_step(model, task, [b], opt, sched, StepContext(i, 0, warmup + steps))
    elapsed = time.perf_counter() - t0
    return {"samples_per_s": steps * batch_size / elapsed, "data_wait_frac": wait / elapsed}


def ray_train(
    corpus: str, storage_dir: str, workers: int, steps: int, warmup: int, batch_size: int, threads: int
) -> dict[str, float]:
    """One run logging every `warmup` steps; the windows after the first are the timed part."""
    from pipelines.train.checkpoint import history_from_csv
    from pipelines.train.config import load_config
    from pipelines.train.launch import run_pretraining

    name = f"overhead-{workers}w"
    job = load_config(
        JOB,
        {
            "data.uris": [corpus],
            "data.batch_size": batch_size // workers,
            "scaling.num_workers": workers,
            "scaling.cpus_per_worker": threads / workers,
            "run.storage": storage_dir,
            "run.name": name,
            "run.max_steps": warmup + steps,
            "run.log_every": warmup,
            "run.checkpoint_every": 10 * (warmup + steps),
        },
    )
    started = time.perf_counter()
    run_pretraining(job)
    total_s = time.perf_counter() - started
    with open(os.path.join(storage_dir, name, "metrics.csv")) as f:
        rows = history_from_csv(f.read())
    first, timed = rows[0], rows[1:]
    # Each window: (steps in it) × batch / samples_per_s seconds; data_wait_frac of that waited.
    spans = [(r["step"] - p["step"]) * batch_size / r["samples_per_s"] for p, r in zip(rows, timed)]
    waits = [s * r["data_wait_frac"] for s, r in zip(spans, timed)]
    return {
        "samples_per_s": steps * batch_size / sum(spans),
        "data_wait_frac": sum(waits) / sum(spans),
        "warmup_samples_per_s": first["samples_per_s"],
        "run_s": total_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=6000, help="scenes rendered (80%% train rows)")
    p.add_argument("--steps", type=int, default=80, help="timed steps (a multiple of --warmup)")
    p.add_argument("--warmup", type=int, default=40, help="untimed steps; cover at least one epoch")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="cores given to training in every setting"
    )
    args = p.parse_args()
    if args.steps % args.warmup:
        p.error("--steps must be a multiple of --warmup (the Ray runs log every --warmup steps)")

    import pyarrow.parquet as pq

    from pipelines.cluster import init_ray

    with tempfile.TemporaryDirectory() as root:
        init_ray("local", quiet=True)
        corpus = make_corpus(root, args.num_images, 64)
        train_rows = sum(
            pq.read_metadata(f).num_rows for f in glob.glob(os.path.join(corpus, "data", "*.parquet"))
        )
        epochs_at = [(n * args.batch_size) // train_rows for n in (args.warmup, args.warmup + args.steps)]
        epoch_starts = epochs_at[1] - epochs_at[0]
        common = (corpus, args.steps, args.warmup, args.batch_size, args.threads)
        rows = {
            "plain, in memory": plain_pytorch(*common, loader=False),
            "plain, DataLoader": plain_pytorch(*common, loader=True),
        }
        for w in (1, 2):
            rows[f"Ray Train, {w} worker{'s' if w > 1 else ''}"] = ray_train(
                corpus, os.path.join(root, "runs"), w, args.steps, args.warmup, args.batch_size, args.threads
            )
    ceiling, same_work = rows["plain, in memory"]["samples_per_s"], rows["plain, DataLoader"]["samples_per_s"]
    print(
        f"\ntiny model, global batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, "
        f"{args.threads} cores, {train_rows} rows per epoch ({epoch_starts} epoch starts in the timed part)"
    )
    print(
        f"{'setting':<22} {'samples/s':>9} {'vs DataLoader':>13} {'vs memory':>9} {'data wait':>9}  warm-up, whole run"
    )
    for name, r in rows.items():
        extra = f"  {r['warmup_samples_per_s']:.1f} samples/s, {r['run_s']:.0f} s" if "run_s" in r else ""
        print(
            f"{name:<22} {r['samples_per_s']:>9.1f} {r['samples_per_s'] / same_work:>13.2f} "
            f"{r['samples_per_s'] / ceiling:>9.2f} {100 * r['data_wait_frac']:>8.0f}%{extra}"
        )


if __name__ == "__main__":
    main()
