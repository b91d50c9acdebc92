"""In-process training and evaluation for the learning tests: the same ingest processing, row
transforms, `train_step`, `predict` and `score` the Ray jobs run, without Ray's start-up cost.

The Ray paths are covered separately (the demo, the Tune tests, `mplug evaluate` S3 to S3); these
tests check that each task *learns* on held-out data, which needs hundreds of steps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipelines.data.ingest import IngestConfig, UnitCounts, list_units, process_unit_records
from pipelines.data.stream import collate_rows
from pipelines.data.transforms import objects
from pipelines.tasks.base import EvalSetup, StepContext, Task
from pipelines.train.step import train_step


def processed_rows(annotations: str, image_root: str, image_size: int = 64, **options: Any) -> list[dict]:
    """Rows of an annotation file as `mplug ingest` writes them (same reader and processing)."""
    cfg = IngestConfig(input=annotations, format="json", output="/nonexistent", image_root=image_root,
                       image_size=image_size, min_image_size=16, **options)  # fmt: skip
    units, cols = list_units(cfg)
    rows = []
    for unit in units:
        for clean, reject in process_unit_records(unit, cfg, cols, UnitCounts()):
            if reject is not None:
                raise AssertionError(f"synthetic row rejected: {reject}")
            rows.append({k: v for k, v in clean.items() if not k.startswith("_")})
    return rows


def numpy_batch(rows: list[dict], columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Rows as the stream hands them to a transform (object columns; missing ones as None)."""
    return {c: objects([r.get(c) for r in rows]) for c in columns}


def batches(
    task: Task, rows: list[dict], batch_size: int, train: bool, seed: int = 0, drop_last: bool = True
):
    """Transformed, collated batches of `rows` (shuffled per call when training)."""
    transform = task.transform(train=train).build()
    order = np.random.default_rng(seed).permutation(len(rows)) if train else np.arange(len(rows))
    stop = len(rows) - (len(rows) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        part = [rows[i] for i in order[start : start + batch_size]]
        yield collate_rows(transform(numpy_batch(part, task.columns)))


def finetune(
    task: Task,
    model,
    rows: list[dict],
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    max_steps: int | None = None,
    after_step: Callable[[int, Any], None] | None = None,
) -> list[float]:
    """Train `model` on `rows` with the task's step and the job's optimizer; the mean loss per
    epoch. `max_steps` ends the run early (the schedule spans it); `after_step(step, result)` is
    called after every step, `step` counted from 1."""
    from pipelines.train.optim import build_job_optimizer

    steps_per_epoch = len(rows) // batch_size
    total_steps = min(steps_per_epoch * epochs, max_steps or steps_per_epoch * epochs)
    optimizer, scheduler = build_job_optimizer(model, task.job.optim, total_steps)
    model.train()
    losses, step = [], 0
    for epoch in range(epochs):
        total, done = 0.0, 0
        for batch in batches(task, rows, batch_size, train=True, seed=seed * 1000 + epoch):
            ctx = StepContext(step, epoch, steps_per_epoch)
            result = train_step(
                model, task, [batch], optimizer, scheduler, ctx, grad_clip=task.job.optim.grad_clip
            )
            total, done, step = total + float(result.values["loss"]), done + 1, step + 1
            if after_step is not None:
                after_step(step, result)
            if step >= total_steps:
                break
        losses.append(total / done)
        if step >= total_steps:
            break
    return losses


@torch.no_grad()
def evaluate(task: Task, model, rows: list[dict], setup: EvalSetup | None = None, batch_size: int = 32):
    """(metrics, baseline, predictions) of `model` on `rows`, evaluated as the training loop
    evaluates (`evaluate_batches`: predictions, the task's second pass, score), in one process."""
    from pipelines.distributed import Collective
    from pipelines.eval.passes import evaluate_batches

    model.eval()
    keep = setup.keys if setup is not None and setup.keys is not None else None
    rows = [r for r in rows if keep is None or r["key"] in keep]
    result = evaluate_batches(
        task,
        model,
        lambda: batches(task, rows, batch_size, train=False, drop_last=False),
        Collective(),
        setup,
    )
    return result.metrics, task.baseline(result.predictions, setup), result.predictions


def save_run(model, folder: str) -> str:
    """`model` as a run of ours keeps it (`final/`), for `--init` and `mplug evaluate`."""
    final = os.path.join(folder, "final")
    model.save_pretrained(final)
    return final


def references_of(rows: list[dict]) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for r in rows:
        refs.setdefault(str(r["image_id"] or r["key"]), []).append(r["caption"])
    return refs


def first_keys(rows: list[dict]) -> frozenset[str]:
    first: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: r["key"]):
        first.setdefault(str(r["image_id"] or r["key"]), r["key"])
    return frozenset(first.values())


def task_from_config(name: str, config: str, overrides: dict | None = None) -> Task:
    """Task `name` from a job config file with dotted overrides, as `mplug train` builds it."""
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config
    from pipelines.train.launch import build_model_config

    job = load_config(config, overrides or {})
    return task_class(name)(job, build_model_config(job))


def finetuned(
    name: str, init: str, rows: list[dict], epochs: int, overrides: dict | None = None
) -> tuple[Task, Any, list[float]]:
    """Task `name` (its `finetune_{name}_tiny.yaml`) started from the run at `init` and trained
    on `rows`: (task, model, mean loss per epoch)."""
    from pipelines.train.init import load_run_weights

    task = task_from_config(
        name, f"jobs/configs/finetune_{name}_tiny.yaml", {"model.init": init, **(overrides or {})}
    )
    torch.manual_seed(0)
    model = task.build_model()
    load_run_weights(model, init)
    task.after_initial_weights(model)
    losses = finetune(task, model, rows, epochs=epochs, batch_size=task.job.data.batch_size)
    return task, model, losses


def caption_references(rows: list[dict], folder: str) -> str:
    """`rows`' captions as a processed shard under `folder` (text columns only): the training
    references SCST's CIDEr-D takes its document frequencies and rewards from (`data.uris`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    text = [{k: r[k] for k in ("key", "image_id", "caption")} for r in rows]
    pq.write_table(pa.Table.from_pylist(text), os.path.join(folder, "data", "part-0.parquet"))
    return folder


def write_json(path: str, value: Any) -> str:
    with open(path, "w") as f:
        json.dump(value, f)
    return path
