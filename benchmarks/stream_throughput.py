"""Training-stream throughput (rows/s) against the number of transform tasks it is given.

Reference: a single-process loop calling the same UDF the Ray tasks run
(`pipelines.data.transforms.ImageTextTransform`: JPEG decode, RandomResizedCrop + flip +
RandAugment, CLIP normalisation, tokenisation) on the same rows: one core's rate. Ray: one rank's
epoch stream (`rank_epoch_dataset`, as the training loop reads it) with 1, 2, 4, … concurrent
transform tasks, consumed by the driver as a trainer consumes its rows. The stream should scale
with the tasks up to the cores, then flatten (logical CPUs beyond the cores add no compute).

    .venv/bin/python -m benchmarks.stream_throughput --rows 512 --cores 2 --tasks 1 2 4 6
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
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 6], help="transform tasks to try")
    parser.add_argument("--logical-cpus", type=int, default=8, help="CPUs the local Ray advertises")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from benchmarks.ingest_throughput import photo_like_jpeg
    from pipelines.cluster import init_ray, quiet_ray_data
    from pipelines.data.image import ImageLimits, process_image
    from pipelines.data.records import DATA_SCHEMA
    from pipelines.data.transforms import ImageTextTransform

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

        # The training stream as a rank reads it (`rank_epoch_dataset`: fixed order, per-row
        # augmentation seeds), with 1, 2, ... concurrent transform tasks on a local Ray that
        # advertises `--logical-cpus` (more than the cores, as the launcher's local instances).
        from pipelines.data.order import plan_chunks, rank_windows
        from pipelines.data.stream import collate_rows, processed_files, rank_epoch_dataset
        from pipelines.data.transforms import Transform

        init_ray("local", num_cpus=args.logical_cpus)
        quiet_ray_data()
        chunks = plan_chunks(processed_files([os.path.join(work, "out")]))
        transform = Transform.of(ImageTextTransform, image_size=args.image_size, max_text_len=args.max_text_len,
                                 train=True, include_key=False)  # fmt: skip
        rates, consumer_cores = {}, {}
        for tasks in args.tasks:
            # Epoch 0 warms the task workers (imports, tokenizer load, cached transform); epoch 1 is measured.
            for epoch in range(2):
                windows = rank_windows(chunks, seed=0, epoch=epoch, rank=0, world=1, window=4)
                ds = rank_epoch_dataset(windows, transform, columns=("key", "image", "caption"), seed=0,
                                        epoch=epoch, batch_size=args.batch_size, transform_tasks=tasks)  # fmt: skip
                t0, c0, n = time.perf_counter(), time.process_time(), 0
                # As the training loop reads it: rows mix tensors and string ids (collate_rows).
                for batch in ds.iter_torch_batches(
                    batch_size=args.batch_size, drop_last=True, collate_fn=collate_rows
                ):
                    assert batch["image"].shape == (args.batch_size, 3, args.image_size, args.image_size)
                    n += 1
                wall = time.perf_counter() - t0
                rate = n * args.batch_size / wall
                consumer = (time.process_time() - c0) / wall  # the reading process's share of a core
            rates[tasks], consumer_cores[tasks] = rate, consumer
            print(
                f"{tasks} transform task(s): {rate:.1f} rows/s (consumer uses {consumer:.2f} of a core)",
                flush=True,
            )
        single_after = single_process_rate()
        single = (single_before + single_after) / 2
        single_rows = single * args.batch_size
        print(
            f"single-process UDF: {single_before * args.batch_size:.1f} / {single_after * args.batch_size:.1f} rows/s "
            f"(before/after): one core's limit {single_rows:.1f} rows/s; {args.cores} cores: {single_rows * args.cores:.1f}"
        )
        result = {
            "rows": args.rows,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "cores": args.cores,
            "logical_cpus": args.logical_cpus,
            "single_process_rows_per_s": round(single_rows, 1),
            "stream_rows_per_s_by_transform_tasks": {k: round(v, 1) for k, v in rates.items()},
            "consumer_cores_by_transform_tasks": {k: round(v, 2) for k, v in consumer_cores.items()},
            "stream_vs_one_core": {k: round(v / single_rows, 2) for k, v in rates.items()},
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
