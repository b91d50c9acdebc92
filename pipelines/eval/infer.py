"""`mplug infer`: batch captioning or question answering over images in object storage, on
Ray Data (the model held in actors, GPUs when present).

Inputs: a folder of image files, parquet file(s) with encoded image bytes (the ingest column
conventions: `image`/`jpg`/`png`/`webp`, optional `key`, `question`), or an output of `mplug
ingest`; or a folder of video files (mp4, webm, avi, ...), answered by the task's video task
(`pipelines.tasks.video.video_task_for`: the same model reading `video.num_frames` frames of each
clip, sampled uniformly and guarded as ingest guards videos). The input is split into units (an input file, or a chunk of image files); actors read
their units themselves, so only unit descriptors and counts pass through the driver.

Every image goes through ingest's guards (`pipelines/data/image.process_image`): one that cannot
be used is counted and written to OUTPUT/rejects/ with its reason, never fatal. OUTPUT gets
`predictions/*.parquet` (`Task.inference_rows`: `key`, `prediction`, and `question` where the task answers one) and `stats.json` with
read == predicted + rejected.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class InferUnit:
    unit_id: str
    kind: str  # "files" (a chunk of image files), "videos" (of video files) or "parquet" (one file)
    sources: tuple[str, ...]


def list_units(input_uri: str, files_per_unit: int = 256) -> list[InferUnit]:
    """Split the input into units; an error names what was expected."""
    if storage.exists(storage.join(input_uri, "stats.json")) and storage.exists(
        storage.join(input_uri, "data")
    ):
        input_uri = storage.join(input_uri, "data")  # an ingest output: its processed shards
    files = [input_uri] if input_uri.endswith(".parquet") else storage.list_files(input_uri)
    from pipelines.data.video import VIDEO_SUFFIXES

    parquet = [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    videos = [f for f in files if f.lower().endswith(VIDEO_SUFFIXES)]
    if parquet:
        return [InferUnit(f"p{n:06d}", "parquet", (f,)) for n, f in enumerate(parquet)]
    if videos and not images:
        per_unit = max(1, files_per_unit // 16)  # a clip is many images' work
        return [
            InferUnit(f"v{n:06d}", "videos", tuple(videos[s : s + per_unit]))
            for n, s in enumerate(range(0, len(videos), per_unit))
        ]
    if images:
        return [
            InferUnit(f"f{n:06d}", "files", tuple(images[s : s + files_per_unit]))
            for n, s in enumerate(range(0, len(images), files_per_unit))
        ]
    raise FileNotFoundError(
        f"--input {input_uri!r}: no parquet files, no images ({', '.join(IMAGE_SUFFIXES)}) and no videos "
        f"({', '.join(VIDEO_SUFFIXES)}) found there"
    )


def read_unit(unit: InferUnit) -> list[dict[str, Any]]:
    """Raw records `key`, `image` (bytes or None), `question` (or None) of one unit (a video's
    bytes in `image` too)."""
    if unit.kind in ("files", "videos"):
        out = []
        for uri in unit.sources:
            try:
                data = storage.read_bytes(uri)
            except OSError:
                data = None
            out.append({"key": posixpath.basename(uri), "image": data, "question": None})
        return out
    fs, path = storage.pyarrow_fs(unit.sources[0])
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read()
    image_col = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if image_col is None:
        raise ValueError(
            f"{unit.sources[0]}: no image column among {table.column_names} (looked for {IMAGE_COLUMNS})"
        )
    n = table.num_rows
    keys = (
        table.column("key").to_pylist()
        if "key" in table.column_names
        else [f"{unit.unit_id}-{i:07d}" for i in range(n)]
    )
    questions = table.column("question").to_pylist() if "question" in table.column_names else [None] * n
    images = [v.get("bytes") if isinstance(v, dict) else v for v in table.column(image_col).to_pylist()]
    return [{"key": str(k), "image": im, "question": q} for k, im, q in zip(keys, images, questions)]


class InferWorker:
    """Ray Data actor: model loaded once; each unit -> predictions and rejects written by the
    actor itself, counts returned."""

    def __init__(self, task_name: str, model_uri: str, output_uri: str, question: str | None,
                 overrides: dict, batch_size: int) -> None:  # fmt: skip
        from pipelines.batches import default_device
        from pipelines.data.image import ImageLimits
        from pipelines.eval.evaluate import build_eval_task, load_model

        self.device = default_device()
        self.task = build_eval_task(task_name, model_uri, overrides)
        self.model = load_model(self.task, model_uri, self.device)
        self.transform = self.task.transform(train=False).build()
        self.output_uri, self.question, self.batch_size = output_uri, question, batch_size
        self.limits = ImageLimits(resolution=self.task.model_config.image_size, min_size=8)
        self.video_limits = None
        if "frames" in self.task.columns:  # a video task: clips sampled as its evaluation reads them
            from pipelines.data.video import VideoLimits

            self.video_limits = VideoLimits(self.limits, num_frames=self.task.job.video.num_frames)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "summary": np.asarray(
                [json.dumps(self.run_unit(InferUnit(**json.loads(u)))) for u in batch["item"]]
            )
        }

    def run_unit(self, unit: InferUnit) -> dict:
        from pipelines.data.image import ImageRejected, process_image
        from pipelines.data.records import rejects_table

        records, good, rejects = read_unit(unit), [], []
        for rec in records:
            try:
                if unit.kind == "videos" and self.video_limits is not None:
                    from pipelines.data.video import process_video

                    clip = process_video(rec["image"], self.video_limits)
                    rec["image"], rec["frames"] = clip.poster, list(clip.frames)
                else:
                    rec["image"] = process_image(rec["image"], self.limits).jpeg
            except ImageRejected as err:
                rejects.append({"key": rec["key"], "reason": err.reason, "detail": err.detail})
                continue
            if "question" in self.task.columns:  # the task answers a question about the image
                rec["question"] = self.question or rec["question"]
                if not rec["question"]:
                    rejects.append(
                        {"key": rec["key"], "reason": "bad_record", "detail": "no question (--question)"}
                    )
                    continue
            good.append(rec)
        predictions = []
        for s in range(0, len(good), self.batch_size):
            predictions.extend(self._predict(good[s : s + self.batch_size]))
        if predictions:
            _write(
                storage.join(self.output_uri, "predictions", f"{unit.unit_id}.parquet"),
                pa.Table.from_pylist(predictions),
            )
        if rejects:
            _write(
                storage.join(self.output_uri, "rejects", f"{unit.unit_id}.parquet"), rejects_table(rejects)
            )
        return {"unit": unit.unit_id, "read": len(records), "predicted": len(predictions),
                "rejected_by_reason": dict(Counter(r["reason"] for r in rejects))}  # fmt: skip

    def _predict(self, rows: list[dict]) -> list[dict]:
        import torch

        from pipelines.batches import collate_rows, to_device
        from pipelines.data.transforms import objects

        batch = {"key": objects([r["key"] for r in rows]), "image": objects([r["image"] for r in rows]),
                 "question": objects([r["question"] for r in rows])}  # fmt: skip
        if "frames" in rows[0]:
            batch["frames"] = objects([r["frames"] for r in rows])
        with torch.no_grad():
            out = self.task.predict(self.model, to_device(collate_rows(self.transform(batch)), self.device))
        return self.task.inference_rows(out)


def _write(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def run_infer(
    task_name: str,
    model_uri: str,
    input_uri: str,
    output_uri: str,
    *,
    question: str | None = None,
    overrides: dict | None = None,
    batch_size: int = 16,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    address: str | None = None,
) -> dict:
    """Predict for every usable image of the input; returns the stats also in OUTPUT/stats.json."""
    import ray

    from pipelines.cluster import init_ray
    from pipelines.eval.evaluate import build_eval_task, eval_resources
    from pipelines.tasks import TASKS, task_class

    served = [name for name in TASKS if task_class(name).batch_inference]
    if task_name not in served:
        raise ValueError(f"--task {task_name!r}: batch inference serves {served}")
    build_eval_task(task_name, model_uri, overrides)  # the model folder and options are valid
    started = time.perf_counter()
    init_ray(address)
    units = list_units(input_uri)
    if units and units[0].kind == "videos":
        from pipelines.tasks.video import video_task_for

        video_task = video_task_for(task_name)
        if video_task is None:
            raise ValueError(f"--input {input_uri!r} holds videos, and task {task_name!r} has no video task")
        task_name = video_task
        build_eval_task(task_name, model_uri, overrides)
    resources = eval_resources(num_actors, use_gpu)
    items = [{"item": json.dumps(asdict(u))} for u in units]
    summaries = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            InferWorker,
            fn_constructor_kwargs={"task_name": task_name, "model_uri": model_uri, "output_uri": output_uri,
                                   "question": question, "overrides": dict(overrides or {}), "batch_size": batch_size},
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(resources.actors, len(units))),
            num_gpus=resources.gpus_per_actor, num_cpus=1,
        )
        .take_all()
    )  # fmt: skip
    by_reason: Counter = Counter()
    read = predicted = 0
    for s in (json.loads(r["summary"]) for r in summaries):
        read += s["read"]
        predicted += s["predicted"]
        by_reason.update(s["rejected_by_reason"])
    rejected = sum(by_reason.values())
    if read != predicted + rejected:
        raise RuntimeError(
            f"inference books do not balance: read={read} != predicted={predicted} + rejected={rejected}"
        )
    stats = {"task": task_name, "model": model_uri, "input": input_uri, "read": read, "predicted": predicted,
             "rejected": rejected, "rejected_by_reason": dict(by_reason), "units": len(units),
             "elapsed_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    storage.write_text(storage.join(output_uri, "stats.json"), json.dumps(stats, indent=1))
    return stats
