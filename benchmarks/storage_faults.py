"""Ingest rows/s, and a pretraining's samples/s, with 0% and 5% of S3 requests failing, in one
run, on one machine.

An S3 endpoint of its own (moto behind the fault injector of `tests/faults.py`), a local Ray
instance, and img2dataset-style parquet shards of photo-like JPEGs (as benchmarks/ingest_throughput
writes them). The same input is ingested s3:// → s3:// with faults off and with every 20th request
failing (503 SlowDown, 500 InternalError and reset connections in turn), alternating which goes
first from run to run so machine load falls on both alike. Each pair must give the same counts;
the faults injected and the requests seen are reported with the rates.

    .venv/bin/python -m benchmarks.storage_faults --rows 2000 --shards 16 --runs 2
    .venv/bin/python -m benchmarks.storage_faults --rows 1000 --runs 1 --pretrain-steps 30

With `--pretrain-steps N`, mPLUG-tiny then pretrains N steps on 2 workers from the ingested
shards on S3, a checkpoint to S3 every `--checkpoint-every` steps, fault-free and faulty in turn:
samples/s over the whole run (start, steps, checkpoints, export) and the loop's own median
samples/s of its logged windows; the final weights of the pair must be equal (same seed, CPU).

Run it under the shared Ray lock on a shared machine (`flock /tmp/mplug-ray.lock ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COUNTS = ("read", "written", "rejected", "rejected_by_reason")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--every", type=int, default=20, help="every n-th request fails (20: 5%%)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="concurrent ingest tasks")
    parser.add_argument("--runs", type=int, default=2, help="pairs of (fault-free, faulty) ingests")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="then pretrain this many steps (0: no)")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    args = parser.parse_args(argv)

    import boto3

    from benchmarks.ingest_throughput import write_corpus
    from pipelines import storage
    from tests import faults
    from tests.gloo import free_port

    port = free_port()
    server = faults.spawn(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        # Before Ray starts: its workers inherit the endpoint and the fake credentials.
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})  # fmt: skip
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            write_corpus(tmp, args.rows, args.shards, seed=0)
            for name in sorted(os.listdir(tmp)):
                storage.write_bytes(f"s3://bench/raw/{name}", Path(tmp, name).read_bytes())
        results = measure(args, faults.S3Faults(endpoint))
        trained = pretrain(args, faults.S3Faults(endpoint)) if args.pretrain_steps else None
    finally:
        faults.stop(server)
    report(args, results)
    if trained:
        print(json.dumps({"pretraining": trained}))


def measure(args: argparse.Namespace, switch) -> dict[str, list[dict]]:
    from pipelines.cluster import init_ray, quiet_ray_data
    from pipelines.data.ingest import IngestConfig, run_ingest

    init_ray("local", quiet=True)
    quiet_ray_data()
    results: dict[str, list[dict]] = {"0%": [], f"{100 / args.every:g}%": []}
    faulty_name = list(results)[1]
    for run in range(args.runs):
        pair = {}
        order = ["0%", faulty_name] if run % 2 == 0 else [faulty_name, "0%"]
        for name in order:
            cfg = IngestConfig(input="s3://bench/raw", format="parquet", output=f"s3://bench/out-{run}-{name}",
                               image_size=args.image_size, num_workers=args.workers)  # fmt: skip
            switch.off().reset()
            if name != "0%":
                switch.every(args.every)
            stats = run_ingest(cfg)
            state = switch.off().state()
            stats |= {"faults": state["injected"], "requests": state["requests"]}
            pair[name] = stats
            results[name].append(stats)
            print(f"run {run} {name:>3}: {stats['rows_per_s']:8.1f} rows/s whole job, "
                  f"{stats['decode_rows_per_s']:8.1f} decode stage; {state['requests']} requests, "
                  f"faults {state['injected']}", flush=True)  # fmt: skip
        counts = [{k: s[k] for k in COUNTS} for s in pair.values()]
        if counts[0] != counts[1]:
            raise SystemExit(
                f"run {run}: the faulty ingest's counts differ from the fault-free one: {counts}"
            )
    return results


def pretrain(args: argparse.Namespace, switch) -> dict[str, dict]:
    """The tiny pretraining from the first fault-free ingest's output, fault-free then faulty."""
    import time

    import torch

    from pipelines import storage
    from pipelines.eval.retrieval import load_pretrained
    from pipelines.train.checkpoint import history_from_csv
    from pipelines.train.config import load_config
    from pipelines.train.launch import run_pretraining

    out: dict[str, dict] = {}
    weights = {}
    for name, every in (("0%", None), (f"{100 / args.every:g}%", args.every)):
        job = load_config(str(REPO / "jobs/configs/pretrain_tiny.yaml"), {
            "data.uris": ["s3://bench/out-0-0%"], "run.storage": "s3://bench/runs", "run.name": f"pre-{every}",
            "run.max_steps": args.pretrain_steps, "run.checkpoint_every": args.checkpoint_every,
            "run.log_every": 1, "scaling.num_workers": 2, "scaling.cpus_per_worker": 1})  # fmt: skip
        switch.off().reset()
        if every:
            switch.every(every)
        started = time.perf_counter()
        result = run_pretraining(job)
        seconds = time.perf_counter() - started
        state = switch.off().state()
        if result.error is not None:
            raise SystemExit(f"pretraining with {name} faults failed: {result.error}")
        run = f"s3://bench/runs/pre-{every}"
        rows = history_from_csv(storage.read_text(storage.join(run, "metrics.csv")))
        loop_rates = [r["samples_per_s"] for r in rows[1:] if "samples_per_s" in r]
        samples = args.pretrain_steps * job.data.batch_size * 2
        out[name] = {"samples_per_s_whole_run": round(samples / seconds, 2),
                     "samples_per_s_loop_median": round(statistics.median(loop_rates), 2) if loop_rates else None,
                     "seconds": round(seconds, 1), "requests": state["requests"], "faults": state["injected"]}  # fmt: skip
        weights[name] = load_pretrained(storage.join(run, "final")).state_dict()
        print(f"pretraining {name:>3}: {out[name]}", flush=True)
    first, second = weights.values()
    out["final_weights_equal"] = all(torch.equal(first[k], second[k]) for k in first)
    return out


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    print(f"\ningest of {args.rows} rows ({args.shards} parquet shards, {args.image_size} px), "
          f"{args.workers} workers, {args.runs} run(s) each; counts equal in every pair")  # fmt: skip
    print(
        f"{'faults':>7} {'rows/s (job)':>13} {'rows/s (decode)':>16} {'requests':>9} {'faults injected':>16}"
    )
    summary = {}
    for name, runs in results.items():
        job = statistics.median(r["rows_per_s"] for r in runs)
        decode = statistics.median(r["decode_rows_per_s"] for r in runs)
        requests = statistics.median(r["requests"] for r in runs)
        injected = statistics.median(r["faults"]["total"] for r in runs)
        print(f"{name:>7} {job:13.1f} {decode:16.1f} {requests:9.0f} {injected:16.0f}")
        summary[name] = {
            "rows_per_s": job,
            "decode_rows_per_s": decode,
            "requests": requests,
            "faults": injected,
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
