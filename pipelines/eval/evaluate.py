"""`mplug evaluate`: a trained model of any task on held-out processed shards, distributed over
Ray Data (the model held in actors, one GPU each when the cluster has GPUs).

Writes OUTPUT/metrics.json (the task's metrics and its baseline), OUTPUT/predictions.parquet and,
where the task has one (`Task.submission`: VQA's `[{question_id, answer}]`, COCO captions'
`[{image_id, caption}]`), the official submission JSON as OUTPUT/submission.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from pipelines import storage


def model_config_of(model_uri: str):
    """The MPlugConfig saved with a model folder (`save_pretrained`'s config.json)."""
    from mplug import MPlugConfig

    uri = storage.join(model_uri, "config.json")
    if not storage.exists(uri):
        raise FileNotFoundError(f"--model {model_uri!r}: no config.json (pass a run's final/ folder)")
    return MPlugConfig.from_dict(json.loads(storage.read_text(uri)))


def build_eval_task(task_name: str, model_uri: str, overrides: dict[str, Any] | None = None):
    """The task (its options from `overrides`, dotted keys such as `vqa.num_beams`) around the
    model's own config."""
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config

    job = load_config(None, {"task": task_name, "run.max_steps": 1, **(overrides or {})})
    return task_class(task_name)(job, model_config_of(model_uri))


def load_model(task, model_uri: str, device: torch.device):
    local = storage.download_dir(model_uri, tempfile.mkdtemp(prefix="mplug-model-"))
    return task.model_class().from_pretrained(local).to(device).eval()


def columns_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per-row dicts -> a numpy batch (object columns where values are not plain numbers)."""
    from pipelines.data.transforms import objects

    return {name: objects([r[name] for r in rows]) for name in rows[0]} if rows else {}


class TaskPredictor:
    """Ray Data actor: the task's model loaded once; each batch -> the task's predictions, or
    with `payload` its second-pass results (`Task.predict_again`)."""

    def __init__(
        self, task_name: str, model_uri: str, overrides: dict[str, Any], payload: Any = None
    ) -> None:
        import ray

        from pipelines.batches import default_device

        self.device = default_device()
        self.task = build_eval_task(task_name, model_uri, overrides)
        self.model = load_model(self.task, model_uri, self.device)
        self.payload = ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.batches import collate_rows, to_device

        batch = to_device(collate_rows(batch), self.device)
        if self.payload is None:
            return columns_of(self.task.predict(self.model, batch))
        return columns_of(self.task.predict_again(self.model, batch, self.payload))


@dataclass
class EvalResources:
    actors: int
    gpus_per_actor: float


def eval_resources(num_actors: int | None, use_gpu: bool | None) -> EvalResources:
    """One actor per GPU when the cluster has GPUs (unless told otherwise), else two CPU actors."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    gpu = bool(gpus) if use_gpu is None else use_gpu
    if gpu and not gpus:
        raise ValueError("--use-gpu, but the cluster has no GPU")
    actors = num_actors or (int(gpus) if gpu else 2)
    return EvalResources(max(1, actors), 1.0 if gpu else 0.0)


def predict_rows(task, task_name: str, model_uri: str, data_uris: list[str], overrides: dict,
                 keys: frozenset[str] | None, batch_size: int, resources: EvalResources,
                 payload: Any = None) -> list[dict]:  # fmt: skip
    """The task's predictions on `data_uris` (the rows whose key is in `keys`, when given), or its
    second-pass results with `payload`, computed by actors holding the model."""
    import ray

    from pipelines.data.stream import image_row_bytes, task_dataset

    cfg = task.model_config
    ds = task_dataset(
        data_uris, task.transform(train=False), columns=task.columns, train=False, batch_size=batch_size,
        row_bytes=image_row_bytes(cfg.image_size, cfg.max_text_len, getattr(task, "images_per_row", 1)),
        keep_keys=keys,
    )  # fmt: skip
    kwargs = {"task_name": task_name, "model_uri": model_uri, "overrides": overrides}
    if payload is not None:
        kwargs["payload"] = ray.put(payload)  # once in the object store, not once per actor
    return ds.map_batches(
        TaskPredictor,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_gpus=resources.gpus_per_actor,
        num_cpus=1,
    ).take_all()


def evaluate_task(
    task_name: str,
    model_uri: str,
    data_uris: list[str],
    output_uri: str,
    *,
    overrides: dict[str, Any] | None = None,
    batch_size: int = 32,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Predict, let the task ask for a second pass (`Task.second_pass`), score, write the
    outputs; returns what metrics.json holds. The same steps as the training loop's evaluation
    (`pipelines/eval/passes.py`), with actors in place of ranks."""
    from pipelines.cluster import init_ray

    started = time.perf_counter()
    overrides = dict(overrides or {})
    task = build_eval_task(task_name, model_uri, overrides)
    init_ray(address)
    resources = eval_resources(num_actors, use_gpu)
    setup = replace(task.eval_setup(data_uris), thorough=True)
    args = (task, task_name, model_uri, data_uris, overrides)
    rows = predict_rows(*args, setup.keys, batch_size, resources)
    if not rows:
        raise ValueError(f"no rows to evaluate in {data_uris}")
    second = task.second_pass(rows, setup)
    rescored = None
    if second is not None:
        rescored = predict_rows(*args, second.keys, batch_size, resources, payload=second.payload)
    metrics = task.score(rows, setup, rescored)
    baseline = task.baseline(rows, setup)
    result = {
        "task": task_name,
        "model": model_uri,
        "data": data_uris,
        "primary_metric": task.primary_metric,
        "metrics": metrics,
        "baseline": baseline,
        "rows": len(rows),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    _write_outputs(output_uri, task, rows, result)
    return result


def _write_outputs(output_uri: str, task, rows: list[dict], result: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage.write_text(storage.join(output_uri, "metrics.json"), json.dumps(result, indent=1, default=str))
    plain = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in rows]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(plain), sink)
    storage.write_bytes(storage.join(output_uri, "predictions.parquet"), sink.getvalue().to_pybytes())
    submission = task.submission(rows)
    if submission is not None:
        storage.write_text(storage.join(output_uri, "submission.json"), json.dumps(submission))


def format_result(result: dict) -> str:
    """The one-screen summary: each metric beside its baseline where there is one."""
    primary, metrics, base = result["primary_metric"], result["metrics"], result["baseline"]
    lines = [
        f"== evaluate {result['task']}: {result['rows']} rows of {', '.join(result['data'])} "
        f"({result['elapsed_s']:.0f}s)",
        f"  model   {result['model']}",
    ]
    for name, value in metrics.items():
        if name.startswith(("chance_", "num_")) or not isinstance(value, int | float):
            continue
        beside = base.get(name, metrics.get(f"chance_{name}"))
        mark = " ←" if name == primary else ""
        extra = f"   (baseline {beside:.2f})" if isinstance(beside, int | float) else ""
        lines.append(f"  {name:<16} {value:8.2f}{extra}{mark}")
    return "\n".join(lines)
