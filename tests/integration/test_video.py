"""Video (issue #28) on the shared Ray and the moto S3 server: `mplug ingest --format video` S3 → S3
counts broken clips as rejects and writes the rest; `mplug evaluate` of each video task S3 → S3
equals an in-process evaluation of the same model on the same rows; `mplug infer` answers a
question about each clip of a folder. One module, one small shapes-world-in-motion corpus
(32 px, 4 frames), ingested once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest
import torch

from pipelines import storage
from tests import finetune

pytestmark = pytest.mark.integration

FRAMES = 3  # stored per clip; the tasks read 2 of them
TASKS = {"video_retrieval": "msrvtt", "video_qa": "videoqa", "video_caption": "vatex"}
OPTIONS = {"video.num_frames": 2, "retrieval.k_test": 4, "vqa.num_beams": 1, "caption.num_beams": 1,
           "caption.max_length": 8, "caption.min_length": 2}  # fmt: skip


@dataclass(frozen=True)
class World:
    bucket: str  # s3://bucket
    files: dict  # render_video_tasks's, as S3 URIs
    data: dict  # task -> its test split ingested to S3

    def uri(self, *parts: str) -> str:
        return storage.join(self.bucket, *parts)


def _address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_endpoint, ray_session) -> World:
    import boto3

    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.synth.video import render_video_tasks

    local = str(tmp_path_factory.mktemp("clips"))
    files = render_video_tasks(local, num=8, seed=4, image_size=32, num_frames=4, corrupt=True,
                               split_fractions=(0.5, 0.0, 0.5))  # fmt: skip
    name = f"video-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    bucket = f"s3://{name}"
    for folder, _, names in os.walk(local):
        for n in names:
            path = os.path.join(folder, n)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(bucket, os.path.relpath(path, local)), f.read())
    remote = {
        kind: {s: u.replace(local, bucket) for s, u in splits.items()} for kind, splits in files.items()
    }
    data = {}
    for task, kind in TASKS.items():
        data[task] = storage.join(bucket, "processed", task)
        run_ingest(IngestConfig(input=remote[kind]["test"], format="video", video_root=remote["video_root"]["all"],
                                output=data[task], image_size=32, min_image_size=16, num_frames=FRAMES))  # fmt: skip
    return World(bucket, remote, data)


def test_ingest_counts_a_corrupt_and_an_empty_clip_and_writes_the_rest(world: World) -> None:
    out = world.uri("processed", "train")
    cmd = [sys.executable, "-m", "jobs.cli", "ingest", "--format", "video", "--input", world.files["msrvtt"]["train"],
           "--video-root", world.files["video_root"]["all"], "--output", out, "--num-frames", str(FRAMES),
           "--min-video-frames", "2", "--image-size", "32", "--min-image-size", "16", "--address", _address(),
           "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    stats = json.loads(storage.read_text(storage.join(out, "stats.json")))
    reasons = {k: v for k, v in stats["rejected_by_reason"].items() if v}
    # 4 good clips of 2 captions; random bytes and a half mp4 (decode_error), a zero-length
    # file (empty_image), a one-frame clip (too_short).
    assert reasons == {"decode_error": 2, "empty_image": 1, "too_short": 1}, stats
    assert stats["read"] == stats["written"] + stats["rejected"] and stats["written"] == 8
    rejects = [
        pq.read_table(io.BytesIO(storage.read_bytes(f)))
        for f in storage.list_files(storage.join(out, "rejects"))
    ]
    details = [d for t in rejects for d in t.column("detail").to_pylist()]
    assert any("train-corrupt-empty.mp4" in d for d in details), details
    table = _table(out)
    assert table.num_rows == 8 and {len(f) for f in table.column("frames").to_pylist()} == {FRAMES}


def _table(processed: str):
    import pyarrow as pa

    shards = storage.list_files(storage.join(processed, "data"), ".parquet")
    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f))) for f in shards])


def _task(name: str, world: World):
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config
    from pipelines.train.launch import build_model_config

    overrides = dict(OPTIONS)
    if name == "video_qa":
        overrides["vqa.answer_list"] = world.files["answer_list"]["all"]
    job = load_config(None, {"task": name, "run.max_steps": 1, "data.image_size": 32, **overrides})
    return task_class(name)(job, build_model_config(job)), overrides


def _save(model, uri: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for n in os.listdir(tmp):
            with open(os.path.join(tmp, n), "rb") as f:
                storage.write_bytes(storage.join(uri, n), f.read())
    return uri


@pytest.mark.parametrize("name", list(TASKS))
def test_evaluate_a_video_task_from_s3_to_s3_matches_in_process(name: str, world: World) -> None:
    from pipelines.eval.evaluate import evaluate_task

    task, overrides = _task(name, world)
    torch.manual_seed(0)
    model = task.build_model().eval()
    model_uri = _save(model, world.uri("models", name))
    out = world.uri("eval", name)
    result = evaluate_task(name, model_uri, [world.data[name]], out, overrides=overrides, batch_size=4,
                           num_actors=1)  # fmt: skip
    written = json.loads(storage.read_text(storage.join(out, "metrics.json")))
    assert (
        written["metrics"] == pytest.approx(result["metrics"])
        and written["primary_metric"] == task.primary_metric
    )

    rows = _table(world.data[name]).to_pylist()
    expected, baseline, local = finetune.evaluate(
        task, model, rows, task.eval_setup([world.data[name]]), batch_size=4
    )
    primary = task.primary_metric
    assert result["metrics"][primary] == pytest.approx(expected[primary], abs=1e-6)
    assert result["rows"] == len(local) and result["baseline"].get(primary) == pytest.approx(
        baseline.get(primary)
    )
    if name == "video_retrieval":  # ITM re-ranked both ways, beside ITC alone and chance
        assert {"itc_t2i_r1", "itm_t2i_r1", "chance_t2i_r1", "r_mean"} <= set(result["metrics"])


def test_infer_answers_a_question_about_each_clip_and_counts_a_broken_one(world: World) -> None:
    from pipelines.eval.infer import run_infer

    task, overrides = _task("video_qa", world)
    torch.manual_seed(0)
    model_uri = _save(task.build_model(), world.uri("models", "vqa-for-infer"))
    folder = world.uri("inbox")
    clips = json.loads(storage.read_text(world.files["clips"]["test"]))
    for key in list(clips)[:3]:
        storage.write_bytes(
            storage.join(folder, f"{key}.mp4"), storage.read_bytes(world.uri("videos", f"{key}.mp4"))
        )
    storage.write_bytes(storage.join(folder, "broken.mp4"), b"\x00\x00\x00\x18ftypisom not a movie")
    out = world.uri("answers")
    stats = run_infer("vqa", model_uri, folder, out, question="which way does it move?",
                      overrides={k: v for k, v in overrides.items() if k.startswith(("vqa.", "video."))},
                      batch_size=2, num_actors=1)  # fmt: skip
    assert (stats["task"], stats["read"], stats["predicted"]) == ("video_qa", 4, 3)
    assert stats["rejected_by_reason"] == {"decode_error": 1}
    table = _table_of(storage.list_files(storage.join(out, "predictions"), ".parquet"))
    assert sorted(table.column("key").to_pylist()) == sorted(f"{k}.mp4" for k in list(clips)[:3])
    assert all(p for p in table.column("prediction").to_pylist())


def _table_of(files: list[str]):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f))) for f in files])
