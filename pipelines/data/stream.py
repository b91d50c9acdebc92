"""Processed shards → what each Ray Train worker (or evaluation actor) iterates.

Ingest did the expensive deterministic work once (decode, validate, resize to the train
resolution); here only the random work runs, streamed by CPU tasks: a task's row transform
(`pipelines/data/transforms.py`: augmentation, normalisation, tokenisation).

Training: each rank builds its own stream every epoch, `rank_epoch_dataset`, from its windows of
the fixed training order (`pipelines/data/order.py`: which rows, in which order, with which
augmentation seeds — a function of seed, epoch and worker count), read and transformed by tasks
and handed over in order; the training loop iterates it with `iter_torch_batches(collate_fn=
collate_rows)`. A resumed run skips the rows it has trained on.

Evaluation and inference: `task_dataset` reads whole shards (optionally only the rows whose key
is kept) through the task's evaluation transform; Ray Train splits it between the workers
(`get_dataset_shard("eval")`), `mplug evaluate` feeds it to actors holding the model. Rows keep
their ids: iterate them with `collate_fn=collate_rows` and move tensors to the device yourself.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.batches import collate_rows  # noqa: F401  (the stream's collate_fn, for its users)
from pipelines.data.shards import STREAM_COLUMNS, read_shard_rows
from pipelines.data.transforms import ImageTextTransform, Transform


@lru_cache(maxsize=4)
def _built(transform: Transform) -> Any:
    return transform.build()


def transform_batch(
    batch: dict[str, np.ndarray], transform: Transform, keep_key: bool = False
) -> dict[str, np.ndarray]:
    """A row transform as a task function, built once per worker process and kept. With
    `keep_key` rows keep their `key` (the training loop logs which rows it trained on).

    Tasks, not an actor pool: the stream re-executes every epoch, and a fresh actor pool pays
    process start, imports and tokenizer load each time (seconds per epoch, all data wait),
    while Ray reuses its warm task workers and this cache across epochs.
    """
    out = _built(transform)(batch)
    if keep_key and "key" in batch and "key" not in out:
        out["key"] = np.asarray([str(k) for k in batch["key"]], dtype=object)
    return out


def processed_files(data_uris: list[str]) -> list[str]:
    """Every `data/*.parquet` shard of the given ingest outputs, in a stable order."""
    if not data_uris:
        raise ValueError("data_uris is empty: pass at least one ingest OUTPUT URI")
    files: list[str] = []
    for uri in data_uris:
        found = storage.list_files(storage.join(uri, "data"), ".parquet")
        if not found:
            raise FileNotFoundError(
                f"no processed shards under {storage.join(uri, 'data')!r}: run `mplug ingest` first"
            )
        files.extend(found)
    schemes = {f.split("://", 1)[0] if "://" in f else "" for f in files}
    if len(schemes) > 1:
        raise ValueError(f"data_uris mix storage schemes {sorted(schemes)}; copy them to one store first")
    return files


def default_transform_tasks(reserved_cpus: float = 0.0) -> int:
    """Concurrent transform tasks: the cluster's CPUs beside those the training workers hold.

    The transform (RandAugment + bicubic resize) costs tens of ms of CPU per row, so a GPU
    worker wants several CPUs of transform; on an autoscaling cluster whose CPU nodes come up
    later, set `data.transform_tasks` instead."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(1, int(cpus - reserved_cpus))


def task_dataset(
    data_uris: list[str],
    transform: Transform,
    *,
    columns: tuple[str, ...] = STREAM_COLUMNS,
    train: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    transform_tasks: int | None = None,
    row_bytes: int | None = None,
    keep_keys: frozenset[str] | None = None,
):
    """A Ray Dataset of `transform`ed rows from ingest outputs (only the rows whose key is in
    `keep_keys`, when given).

    `data_uris` are ingest OUTPUT URIs (their `data/*.parquet` are read; a list mixes corpora,
    which must share one storage scheme); `columns` the processed columns the transform reads.
    `batch_size` is the transform's batch, not the trainer's; `transform_tasks` caps the
    concurrent CPU transform tasks (the launcher passes `default_transform_tasks`; alone, half
    the cluster's CPUs, at most 8). `row_bytes` (size of one output row) sizes the blocks.
    """
    import ray

    files = processed_files(data_uris)
    # One item per shard file, read by tasks through the storage helper: Ray Data's
    # `read_parquet` plans anew at every execution (seconds, every epoch, as the stream
    # re-executes; BENCHMARKS.md), a file list costs next to nothing.
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    if train:
        # The file order changes every epoch (seeded); the trainer's local shuffle buffer
        # mixes rows across files.
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    # Blocks of one transform batch: Ray splits the stream between Train workers only at
    # block boundaries, so whole-file blocks would hand a small corpus to a single worker.
    ds = ds.map_batches(
        read_shard_rows,
        fn_kwargs={"rows_per_block": batch_size, "columns": tuple(columns), "keep_keys": keep_keys},
        batch_size=1,
        num_cpus=0.5,
    )
    if row_bytes:
        # Ray otherwise coalesces a task's output batches into blocks of up to 128 MiB.
        ds.context.target_max_block_size = row_bytes * batch_size
    return ds.map_batches(
        transform_batch,
        fn_kwargs={"transform": transform},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(
            size=transform_tasks or max(1, min(8, int(ray.cluster_resources().get("CPU", 1)) // 2))
        ),
        num_cpus=1,
    )


def rank_epoch_dataset(
    windows: list,
    transform: Transform,
    *,
    columns: tuple[str, ...],
    seed: int,
    epoch: int,
    batch_size: int = 32,
    transform_tasks: int = 1,
    row_bytes: int | None = None,
):
    """One rank's training rows for one epoch, in the fixed order of `pipelines/data/order.py`:
    its windows read by tasks, transformed by `transform_tasks` concurrent tasks, handed over in
    order (`preserve_order`), so the rank's sequence of rows and augmentations is the same in
    every run."""
    import json
    from dataclasses import asdict

    import ray

    from pipelines.data.shards import read_window_rows

    items = [{"window": json.dumps(asdict(w))} for w in windows]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        read_window_rows,
        fn_kwargs={"rows_per_block": batch_size, "columns": tuple(dict.fromkeys([*columns, "key"])), "seed": seed,
                   "epoch": epoch},
        batch_size=1,
        num_cpus=0.5,
    )  # fmt: skip
    ds.context.execution_options.preserve_order = True
    if row_bytes:
        ds.context.target_max_block_size = row_bytes * batch_size
    return ds.map_batches(
        transform_batch,
        fn_kwargs={"transform": transform, "keep_key": True},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=max(1, transform_tasks)),
        num_cpus=1,
    )


def image_row_bytes(image_size: int, text_len: int, images: int = 1) -> int:
    """Bytes of a transformed row holding `images` float32 images and two int64 token rows."""
    return images * 3 * image_size * image_size * 4 + 2 * text_len * 8


def training_dataset(
    data_uris: list[str],
    *,
    image_size: int,
    max_text_len: int,
    train: bool = True,
    seed: int = 0,
    tokenizer_path: str | None = None,
    batch_size: int = 32,
    max_actors: int | None = None,
    include_key: bool | None = None,
    crop_min_scale: float = 0.2,
):
    """Image-caption rows (`ImageTextTransform`: the pretraining stream and zero-shot retrieval).

    `include_key` (default: only for eval) keeps the string `key` column; iterate keyed rows
    with `collate_fn=collate_rows`. `max_actors` caps the concurrent transform tasks.
    """
    keep_key = (not train) if include_key is None else include_key
    transform = Transform.of(
        ImageTextTransform, image_size=image_size, max_text_len=max_text_len, train=train, seed=seed,
        tokenizer_path=tokenizer_path, include_key=keep_key, crop_min_scale=crop_min_scale,
    )  # fmt: skip
    return task_dataset(
        data_uris,
        transform,
        train=train,
        seed=seed,
        batch_size=batch_size,
        transform_tasks=max_actors,
        row_bytes=image_row_bytes(image_size, max_text_len),
    )
