"""Training-stream throughput (batches/s) against the limit measured in the same run.

Limit: a single-process loop calling the same UDF the Ray tasks run
(`pipelines.data.stream.ImageTextTransform`: JPEG decode, RandomResizedCrop + flip +
RandAugment, CLIP normalisation, tokenisation) on the same rows, times the cores used. Ray:
`training_dataset(...).iter_torch_batches(...)` with that many concurrent transform tasks, consumed
by the driver as a trainer would consume its shard.

    .venv/bin/python -m benchmarks.stream_throughput --rows 512 --cores 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--image-size", type=int, default=224, help="training crop size")
    parser.add_argument("--stored-size", type=int, default=256, help="shorter side of the ingested JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-text-len", type=int, default=30)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from benchmarks.ingest_throughput import photo_like_jpeg
    from pipelines.cluster import init_ray, quiet_ray_data
    from pipelines.data.image import ImageLimits, process_image
    from pipelines.data.records import DATA_SCHEMA
    from pipelines.data.stream import ImageTextTransform, training_dataset

    work = tempfile.mkdtemp(prefix="stream_bench_")
    try:
        # Processed shards as ingest writes them: JPEG at the stored size + cleaned captions.
        rng = np.random.default_rng(0)
        limits = ImageLimits(resolution=args.stored_size)
        rows = []
        for i in range(args.rows):
            img = process_image(photo_like_jpeg(rng), limits)
            rows.append({"key": f"{i:08d}", "image": img.jpeg, "caption": f"a photo number {i} with four shapes",
                         "width": img.width, "height": img.height})  # fmt: skip
        os.makedirs(os.path.join(work, "out", "data"))
        per = 64
        for s in range(0, args.rows, per):
            pq.write_table(
                pa_table(rows[s : s + per], DATA_SCHEMA),
                os.path.join(work, "out", "data", f"u-{s // per:05d}.parquet"),
            )

        udf = ImageTextTransform(args.image_size, args.max_text_len, train=True)
        batches = [
            {
                "key": np.array([r["key"] for r in rows[s : s + args.batch_size]], dtype=object),
                "image": np.array([r["image"] for r in rows[s : s + args.batch_size]], dtype=object),
                "caption": np.array([r["caption"] for r in rows[s : s + args.batch_size]], dtype=object),
            }
            for s in range(0, args.rows - args.batch_size + 1, args.batch_size)
        ]
        udf(batches[0])  # warm-up
        load_before = os.getloadavg()[0]

        def single_process_rate() -> float:
            t0 = time.perf_counter()
            for b in batches:
                udf(b)
            return len(batches) / (time.perf_counter() - t0)

        # The machine is shared: the limit is the mean of runs before and after the Ray run.
        single_before = single_process_rate()

        # One more CPU than the transform tasks for the driver consuming the stream (the trainer's role).
        init_ray("local", num_cpus=args.cores + 1)
        quiet_ray_data()
        ds = training_dataset(
            [os.path.join(work, "out")],
            image_size=args.image_size,
            max_text_len=args.max_text_len,
            train=True,
            batch_size=args.batch_size,
            max_actors=args.cores,
        )
        # Epoch 1 warms the task workers (imports, tokenizer load, cached transform); epoch 2 is measured.
        for epoch in range(2):
            t0 = time.perf_counter()
            n = 0
            for batch in ds.iter_torch_batches(batch_size=args.batch_size, drop_last=True):
                assert batch["image"].shape == (args.batch_size, 3, args.image_size, args.image_size)
                n += 1
            rate = n / (time.perf_counter() - t0)
            print(f"epoch {epoch}: {n} batches, {rate:.2f} batches/s")
        single_after = single_process_rate()
        single = (single_before + single_after) / 2
        limit = single * args.cores
        print(
            f"single-process UDF: {single_before:.2f} / {single_after:.2f} batches/s of {args.batch_size} "
            f"(before/after) → limit {limit:.2f} on {args.cores} cores"
        )
        result = {
            "rows": args.rows,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "cores": args.cores,
            "single_process_batches_per_s_before_after": [round(single_before, 3), round(single_after, 3)],
            "limit_batches_per_s": round(limit, 3),
            "ray_stream_batches_per_s": round(rate, 3),
            "stream_vs_limit": round(rate / limit, 3),
            "loadavg_1m_before": round(load_before, 1),
            "loadavg_1m_after": round(os.getloadavg()[0], 1),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pa_table(rows: list[dict], schema):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema)


if __name__ == "__main__":
    main()
