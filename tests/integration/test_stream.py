"""The training stream on the shared Ray instance: 2 Ray Train workers get disjoint, complete shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.ingest import IngestConfig, run_ingest
from pipelines.data.stream import collate_rows, training_dataset
from pipelines.synth.world import render_corpus
from pipelines.train.data_config import train_data_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_corpora(ray_session, s3_endpoint) -> list[str]:
    """Two ingest outputs on S3 (the train and val splits of one synthetic corpus)."""
    import uuid

    import boto3

    bucket = f"stream-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    raw = render_corpus(
        f"s3://{bucket}/raw", 45, fmt="parquet", seed=7, image_size=48, split_fractions=(0.6, 0.4, 0.0)
    )
    outs = []
    for split in ("train", "val"):
        out = f"s3://{bucket}/processed/{split}"
        run_ingest(
            IngestConfig(input=raw[split], format="parquet", output=out, image_size=40, rows_per_shard=4)
        )
        outs.append(out)
    return outs


def test_two_workers_get_disjoint_complete_shards(two_corpora: list[str], tmp_path: Path) -> None:
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ds = training_dataset(
        two_corpora, image_size=32, max_text_len=16, train=True, include_key=True, batch_size=4, max_actors=2
    )

    def loop(config: dict) -> None:
        shard = ray.train.get_dataset_shard("train")
        keys, shapes = [], set()
        for batch in shard.iter_torch_batches(batch_size=5, collate_fn=collate_rows):
            keys += batch["key"]
            shapes.add((tuple(batch["image"].shape[1:]), tuple(batch["input_ids"].shape[1:])))
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(
            json.dumps({"keys": keys, "shapes": sorted(shapes)})
        )

    TorchTrainer(
        loop,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="stream-split", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
        dataset_config=train_data_config(),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    k0, k1 = ranks[0]["keys"], ranks[1]["keys"]
    expected = {f"train-{i:06d}" for i in range(27)} | {f"val-{i:06d}" for i in range(18)}
    assert len(k0) + len(k1) == 45  # 45 rows: equal=True would have dropped one
    assert not set(k0) & set(k1) and set(k0) | set(k1) == expected
    assert k0 and k1  # both workers were fed
    assert {tuple(map(tuple, s)) for r in ranks for s in r["shapes"]} == {((3, 32, 32), (16,))}


def test_eval_stream_is_deterministic_and_training_rows_feed_torch(two_corpora: list[str]) -> None:
    eval_ds = training_dataset(two_corpora[1:], image_size=32, max_text_len=16, train=False, max_actors=1)
    first = {r["key"]: r for r in eval_ds.take_all()}
    second = {r["key"]: r for r in eval_ds.take_all()}
    assert len(first) == 18 and set(first) == set(second)
    for key, row in first.items():
        np.testing.assert_array_equal(row["image"], second[key]["image"])
        assert row["image"].dtype == np.float32 and row["input_ids"].dtype == np.int64
    train_ds = training_dataset(two_corpora, image_size=32, max_text_len=16, train=True, max_actors=1)
    batch = next(iter(train_ds.iter_torch_batches(batch_size=8, drop_last=True)))
    assert set(batch) == {"image", "input_ids", "attention_mask"} and batch["image"].shape == (8, 3, 32, 32)
