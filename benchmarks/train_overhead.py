"""Ray Train overhead: samples/s of the same tiny model in a plain PyTorch loop vs 1 and 2 Ray
Train workers, with the data-wait fraction, in one run on one machine.

The plain loop trains on batches prepared in memory beforehand (the stream's own transform,
run in-process), so it is the ceiling: no data loading at all during the timed steps. The Ray
runs stream the same processed shards through Ray Data while they train, as the real job does.

    .venv/bin/python benchmarks/train_overhead.py --steps 40 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def make_corpus(root: str, num: int, image_size: int) -> str:
    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.data.synth import render_corpus

    raw = render_corpus(os.path.join(root, "raw"), num=num, fmt="parquet", seed=0, image_size=96)
    out = os.path.join(root, "processed")
    run_ingest(IngestConfig(input=raw["train"], format="parquet", output=out, image_size=image_size))
    return out


def plain_pytorch(corpus: str, steps: int, warmup: int, batch_size: int, threads: int) -> dict:
    import glob

    import pyarrow.parquet as pq

    from mplug import MPlugConfig, MPlugForPretraining
    from pipelines.data.stream import ImageTextTransform
    from pipelines.train.optim import build_optimizer

    torch.set_num_threads(threads)
    cfg = MPlugConfig.preset("tiny")
    table = pq.read_table(sorted(glob.glob(os.path.join(corpus, "data", "*.parquet"))))
    transform = ImageTextTransform(
        image_size=cfg.image_size, max_text_len=cfg.max_text_len, train=True, seed=0
    )
    batches = []
    for start in range(0, table.num_rows - batch_size + 1, batch_size):
        part = table.slice(start, batch_size)
        out = transform({c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names})
        batches.append({k: torch.as_tensor(out[k]) for k in ("image", "input_ids", "attention_mask")})
    model = MPlugForPretraining(cfg).train()
    opt, sched = build_optimizer(
        model,
        lr=5e-4,
        visual_lr=5e-4,
        weight_decay=0.02,
        betas=(0.9, 0.999),
        warmup_steps=20,
        total_steps=warmup + steps,
        min_lr=1e-5,
    )
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        b = batches[i % len(batches)]
        out = model(
            images=b["image"], input_ids=b["input_ids"], attention_mask=b["attention_mask"], alpha=0.4
        )
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.momentum_update(out)
    elapsed = time.perf_counter() - t0
    return {"samples_per_s": steps * batch_size / elapsed, "data_wait_frac": 0.0}


def ray_train(
    corpus: str, storage_dir: str, workers: int, steps: int, warmup: int, batch_size: int, threads: int
) -> dict:
    from pipelines.train.config import load_config
    from pipelines.train.launch import run_pretraining

    # Same global batch as the plain loop; the last logging window excludes start-up.
    job = load_config(
        "jobs/configs/pretrain_tiny.yaml",
        {
            "data.uris": [corpus],
            "data.batch_size": batch_size // workers,
            "scaling.num_workers": workers,
            "scaling.cpus_per_worker": threads / workers,
            "run.storage": storage_dir,
            "run.name": f"overhead-{workers}w",
            "run.max_steps": warmup + steps,
            "run.log_every": steps,
            "run.checkpoint_every": 10 * (warmup + steps),
        },
    )
    result = run_pretraining(job)
    return {
        "samples_per_s": result.metrics["samples_per_s"],
        "data_wait_frac": result.metrics["data_wait_frac"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1500)
    p.add_argument("--steps", type=int, default=40, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="cores given to training in every setting"
    )
    args = p.parse_args()

    from pipelines.cluster import init_ray

    with tempfile.TemporaryDirectory() as root:
        init_ray("local", quiet=True)
        corpus = make_corpus(root, args.num_images, 64)
        rows = {
            "plain PyTorch": plain_pytorch(corpus, args.steps, args.warmup, args.batch_size, args.threads)
        }
        for w in (1, 2):
            rows[f"Ray Train, {w} worker{'s' if w > 1 else ''}"] = ray_train(
                corpus, os.path.join(root, "runs"), w, args.steps, args.warmup, args.batch_size, args.threads
            )
    base = rows["plain PyTorch"]["samples_per_s"]
    print(f"\ntiny model, global batch {args.batch_size}, {args.steps} timed steps, {args.threads} cores")
    print(f"{'setting':<24} {'samples/s':>10} {'vs plain':>9} {'data wait':>10}")
    for name, r in rows.items():
        print(
            f"{name:<24} {r['samples_per_s']:>10.1f} {r['samples_per_s'] / base:>9.2f} {100 * r['data_wait_frac']:>9.0f}%"
        )


if __name__ == "__main__":
    main()
