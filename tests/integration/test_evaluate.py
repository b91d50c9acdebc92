"""`mplug evaluate` for every task and `mplug infer`, S3 to S3 (moto), on the shared Ray.

Each task's model (a fixed random init: these tests check the pipeline, the learning tests check
the models) is saved to S3, its held-out split ingested to S3, and `mplug evaluate` must write the
same metrics an in-process evaluation of the same model on the same rows computes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq
import pytest
import torch

from pipelines import storage
from pipelines.tasks import task_class
from pipelines.train.config import load_config
from tests import finetune

pytestmark = pytest.mark.integration

TASKS = ("vqa", "caption", "retrieval", "grounding", "nlvr2", "snli_ve")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> tuple[str, dict]:
    from pipelines.synth.tasks import render_task_annotations

    root = str(tmp_path_factory.mktemp("tasks"))
    return root, render_task_annotations(root, num=30, seed=5, image_size=64, split_fractions=(0.0, 0.0, 1.0))


def _upload_dir(local: str, uri: str) -> str:
    import os

    for name in os.listdir(local):
        with open(os.path.join(local, name), "rb") as f:
            storage.write_bytes(storage.join(uri, name), f.read())
    return uri


def _task(name: str, overrides: dict | None = None):
    job = load_config(None, {"task": name, "run.max_steps": 1, **(overrides or {})})
    from pipelines.eval.evaluate import model_config_of  # noqa: F401  (same config path as evaluate)
    from pipelines.train.launch import build_model_config

    return task_class(name)(
        job, build_model_config(load_config(f"jobs/configs/finetune_{name}_tiny.yaml", {}))
    )


@pytest.mark.parametrize("name", TASKS)
def test_evaluate_from_s3_to_s3_matches_in_process(name, task_files, ray_session, s3_bucket, s3_faults):
    """Ingest and `mplug evaluate` S3 -> S3 while 1 storage request in 20 fails (503, 500, reset):
    the same metrics as evaluating the local rows in one process."""
    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.eval.evaluate import evaluate_task

    root, files = task_files
    overrides = {"caption.num_beams": 1, "vqa.num_beams": 1, "retrieval.k_test": 8}
    task = _task(name, overrides)
    torch.manual_seed(0)
    model = task.build_model().eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model_uri = _upload_dir(tmp, s3_bucket.uri("model"))
    data = s3_bucket.uri("data")
    s3_faults.every(20)
    stats = run_ingest(IngestConfig(input=files[name]["test"], format="json", image_root=root, output=data,
                                    image_size=64, min_image_size=16, dedupe=False))  # fmt: skip
    out = s3_bucket.uri("eval")
    result = evaluate_task(name, model_uri, [data], out, overrides=overrides, batch_size=8, num_actors=1)
    assert s3_faults.off().injected["total"] > 0

    written = json.loads(storage.read_text(storage.join(out, "metrics.json")))
    assert (
        written["metrics"] == pytest.approx(result["metrics"])
        and written["primary_metric"] == task.primary_metric
    )
    predictions = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, "predictions.parquet"))))
    rows = finetune.processed_rows(files[name]["test"], root, dedupe=False)
    assert stats["written"] == len(rows)
    setup = task.eval_setup([data])
    expected, _, local = finetune.evaluate(task, model, rows, setup, batch_size=8)
    assert predictions.num_rows == len(local)
    primary = task.primary_metric
    assert result["metrics"][primary] == pytest.approx(expected[primary], abs=1e-6)
    if name in ("vqa", "caption"):
        submission = json.loads(storage.read_text(storage.join(out, "submission.json")))
        assert len(submission) == len(local)
        assert set(submission[0]) == ({"question_id", "answer"} if name == "vqa" else {"image_id", "caption"})


def test_infer_counts_a_corrupt_image_and_answers_the_rest(task_files, ray_session, s3_bucket, tmp_path):
    """`mplug infer` over a folder of images on S3 with one corrupt file: the file is a counted
    reject with its reason, every other image gets a caption / an answer."""
    root, files = task_files
    with open(files["caption"]["test"]) as f:
        images = [e["image"] for e in json.load(f)][:5]
    folder = s3_bucket.uri("photos")
    for path in images:
        with open(f"{root}/{path}", "rb") as f:
            storage.write_bytes(storage.join(folder, path.rsplit("/", 1)[-1]), f.read())
    storage.write_bytes(storage.join(folder, "broken.jpg"), b"\xff\xd8\xff not a jpeg")
    for name in ("caption", "vqa"):
        task = _task(name)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            task.build_model().save_pretrained(tmp)
            model_uri = _upload_dir(tmp, s3_bucket.uri(f"model-{name}"))
        out = s3_bucket.uri(f"infer-{name}")
        cmd = [sys.executable, "-m", "jobs.cli", "infer", "--task", name, "--model", model_uri, "--input", folder,
               "--output", out, "--num-actors", "1", "--set", f"{name}.num_beams=1"]  # fmt: skip
        if name == "vqa":
            cmd += ["--question", "what color is the shape?"]
        proc = subprocess.run(cmd + ["--address", _address()], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        stats = json.loads(storage.read_text(storage.join(out, "stats.json")))
        assert (
            stats["read"] == 6
            and stats["predicted"] == 5
            and stats["rejected_by_reason"] == {"decode_error": 1}
        )
        parts = storage.list_files(storage.join(out, "predictions"), ".parquet")
        table = pq.read_table(io.BytesIO(storage.read_bytes(parts[0])))
        assert {"key", "prediction"} <= set(table.column_names) and table.num_rows == 5
        rejects = storage.list_files(storage.join(out, "rejects"), ".parquet")
        assert pq.read_table(io.BytesIO(storage.read_bytes(rejects[0]))).column("key").to_pylist() == [
            "broken.jpg"
        ]


def _address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address
