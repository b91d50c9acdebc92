"""`mplug demo`: the main job end to end on the embedded default, on a local Ray instance.

synthetic corpus → Ray Data ingest → 2-worker Ray Train pretraining of the tiny model →
zero-shot image↔text retrieval on the held-out split, printed beside chance.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="render the synthetic corpus, ingest it, pretrain the tiny model, evaluate retrieval (local)",
    )
    p.add_argument(
        "--output", default="demo_out", help="folder or URI used as object storage for every artefact"
    )
    p.add_argument("--num-images", type=int, default=3000, help="synthetic scenes (80/10/10 train/val/test)")
    p.add_argument("--max-steps", type=int, default=300, help="pretraining steps")
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    import ray

    from jobs.env_cmd import collect
    from pipelines import storage
    from pipelines.cluster import init_ray
    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.data.synth import render_corpus
    from pipelines.eval.retrieval import evaluate_retrieval, format_retrieval
    from pipelines.train.config import load_config
    from pipelines.train.launch import run_pretraining

    out = args.output if "://" in args.output else str(Path(args.output).resolve())
    started = time.perf_counter()
    env = collect(None)
    print("== mplug demo: " + ", ".join(f"{k} {env[k].split()[0]}" for k in ("torch", "ray", "transformers")))

    t = _stage("starting a local Ray instance")
    info = init_ray("local")
    print(f"  ready in {time.perf_counter() - t:.1f}s: {info.cpus:g} logical CPUs, {info.gpus:g} GPUs")
    try:
        t = _stage(f"rendering the synthetic shapes-world corpus ({args.num_images} scenes)")
        raw = render_corpus(
            storage.join(out, "raw"), num=args.num_images, fmt="parquet", seed=args.seed, image_size=96
        )
        print(f"  {', '.join(f'{s}: {u}' for s, u in raw.items())}  ({time.perf_counter() - t:.1f}s)")

        processed = {}
        for split in ("train", "test"):
            t = _stage(f"ingesting the {split} split with Ray Data")
            processed[split] = storage.join(out, "processed", split)
            stats = run_ingest(
                IngestConfig(
                    input=raw[split], format="parquet", output=processed[split], image_size=args.image_size
                )
            )
            print(
                f"  read {stats['read']}, written {stats['written']}, rejected {stats['rejected']} "
                f"{ {k: v for k, v in stats.get('rejected_by_reason', {}).items() if v} or '' } ({time.perf_counter() - t:.1f}s) → {processed[split]}"
            )

        t = _stage(
            f"pretraining mPLUG-tiny with {args.num_workers} Ray Train workers ({args.max_steps} steps)"
        )
        job = load_config(
            str(Path(__file__).parent / "configs" / "pretrain_tiny.yaml"),
            {
                "data.uris": [processed["train"]],
                "data.batch_size": args.batch_size,
                "data.image_size": args.image_size,
                "run.storage": storage.join(out, "runs"),
                "run.name": "demo-tiny",
                "run.max_steps": args.max_steps,
                "run.seed": args.seed,
                "scaling.num_workers": args.num_workers,
            },
        )
        result = run_pretraining(job)
        if result.error is not None:
            print(f"pretraining failed: {result.error}")
            return 1
        run_uri = storage.join(out, "runs", "demo-tiny")
        print(f"  ({time.perf_counter() - t:.0f}s)")

        t = _stage("zero-shot image↔text retrieval on the held-out test split (ITC similarity)")
        metrics = evaluate_retrieval(storage.join(run_uri, "final"), [processed["test"]])
        print(format_retrieval(metrics))
        storage.write_text(storage.join(run_uri, "retrieval_test.json"), json.dumps(metrics, indent=1))
    finally:
        ray.shutdown()

    print(f"\n== demo finished in {(time.perf_counter() - started) / 60:.1f} min. Artefacts:")
    for label, where in (
        ("raw corpus", storage.join(out, "raw")),
        ("processed shards", storage.join(out, "processed")),
        ("ingest stats/rejects", storage.join(out, "processed", "train", "stats.json")),
        ("checkpoints", run_uri),
        ("final model", storage.join(run_uri, "final")),
        ("curves", storage.join(run_uri, "curves.png")),
        ("retrieval", storage.join(run_uri, "retrieval_test.json")),
    ):
        print(f"  {label:<20} {where}")
    return 0
