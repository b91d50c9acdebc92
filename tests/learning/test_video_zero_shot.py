"""Zero-shot video (issue #28): mPLUG-tiny trained on shapes-world *images* only, evaluated
unchanged on held-out shapes-world *clips* (`pipelines/synth/video.py`), beats chance on
text-to-video retrieval and the question-type prior on video QA by the margins stated here.

A short image pretraining (the same stages as tests/learning/test_finetune_learning.py) gives the
retrieval model; a VQA finetuning of it on image questions gives the QA model. The clips are
read as the video tasks read them: every frame through the vision tower on its own, the frames'
tokens concatenated for the fusion and the decoder, ITC on the mean of the frames' CLS
embeddings. In-process (`tests/finetune.py`: the ingest processing, row transforms,
`train_step`, `predict` and `score` of the Ray jobs); about 10 minutes on 2 cores: `make
test-learning`.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from pipelines.data.ingest import IngestConfig, UnitCounts, list_units, process_unit_records
from pipelines.synth.video import question_kind, render_video_tasks, video_baselines
from tests import finetune as ft

pytestmark = pytest.mark.learning

NUM_IMAGES = 1000  # image pools, 80/10/10: 800 training images
PRETRAIN_EPOCHS = 2  # of the 4,000 caption pairs at batch 32: 250 steps
VQA_EPOCHS = 3
NUM_CLIPS = 250  # 80/10/10: the 25 test clips are scored; train only fits the prior
FRAMES = 4


def video_rows(annotations: str, video_root: str, num_frames: int = FRAMES) -> list[dict]:
    """Rows of a video annotation file as `mplug ingest --format video` writes them."""
    cfg = IngestConfig(input=annotations, format="video", output="/nonexistent", video_root=video_root,
                       image_size=64, min_image_size=16, num_frames=num_frames)  # fmt: skip
    units, cols = list_units(cfg)
    rows = []
    for unit in units:
        for clean, reject in process_unit_records(unit, cfg, cols, UnitCounts()):
            if reject is not None:
                raise AssertionError(f"synthetic clip rejected: {reject}")
            rows.append({k: v for k, v in clean.items() if not k.startswith("_")})
    return rows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pipelines.synth.tasks import render_task_annotations

    work = str(tmp_path_factory.mktemp("video-zero-shot"))
    root = os.path.join(work, "images")
    files = render_task_annotations(root, num=NUM_IMAGES, seed=1, image_size=64, tasks=("vqa", "caption"))
    pretrain = ft.task_from_config("pretrain", "jobs/configs/pretrain_tiny.yaml")
    torch.manual_seed(0)
    model = pretrain.build_model()
    captions = ft.processed_rows(files["caption"]["train"], root)
    ft.finetune(pretrain, model, captions, epochs=PRETRAIN_EPOCHS, batch_size=pretrain.job.data.batch_size)
    pretrained = ft.save_run(model, os.path.join(work, "pretrain"))
    _, vqa_model, _ = ft.finetuned(
        "vqa", pretrained, ft.processed_rows(files["vqa"]["train"], root), VQA_EPOCHS
    )
    clips = os.path.join(work, "clips")
    video = render_video_tasks(clips, num=NUM_CLIPS, seed=3, image_size=64, num_frames=8)
    return pretrained, vqa_model, video


@pytest.mark.timeout(2400)  # its setup pretrains and finetunes the shared models
def test_zero_shot_text_to_video_retrieval_beats_chance(models) -> None:
    pretrained, _, video = models
    task = ft.task_from_config("video_retrieval", "jobs/configs/finetune_retrieval_tiny.yaml",
                               {"task": "video_retrieval", "model.init": pretrained,
                                "video.num_frames": FRAMES, "retrieval.k_test": 8})  # fmt: skip
    from pipelines.train.init import load_run_weights

    model = task.build_model()
    load_run_weights(model, pretrained)
    rows = video_rows(video["msrvtt"]["test"], video["video_root"]["all"])
    m = ft.evaluate(task, model, rows)[0]
    print("RETRIEVAL", {k: round(v, 1) for k, v in m.items() if isinstance(v, float)})  # MEASURE
    # 25 held-out clips, 50 captions: chance R@1 4.0.
    for prefix in ("itc_", ""):
        got, chance = m[f"{prefix}t2i_r1"], m["chance_t2i_r1"]
        assert got > chance + 8.0, f"{prefix or 'ITM+ITC '}text-to-video R@1 {got:.1f} vs chance {chance:.1f}"
    assert m["r_mean"] > m["chance_r_mean"] + 10.0, (m["r_mean"], m["chance_r_mean"])


@pytest.mark.timeout(2400)
def test_zero_shot_video_qa_beats_the_question_type_prior(models) -> None:
    _, vqa_model, video = models
    task = ft.task_from_config("video_qa", "jobs/configs/finetune_vqa_tiny.yaml",
                               {"task": "video_qa", "model.init": "unused", "video.num_frames": FRAMES,
                                "vqa.answer_list": video["answer_list"]["all"]})  # fmt: skip
    rows = video_rows(video["videoqa"]["test"], video["video_root"]["all"])
    metrics, baseline, predictions = ft.evaluate(task, vqa_model, rows)
    prior = video_baselines(os.path.dirname(video["video_root"]["all"]))["videoqa_prior_by_question_type"]
    by_kind: dict[str, Counter] = {}
    for p in predictions:
        by_kind.setdefault(question_kind(p["question"]), Counter())[p["answer"] == p["answers"][0]] += 1
    kinds = {k: round(100 * c[True] / sum(c.values()), 1) for k, c in by_kind.items()}
    print(
        "QA", metrics, baseline, kinds, video_baselines(os.path.dirname(video["video_root"]["all"]))
    )  # MEASURE
    # The bar is the question-type prior fitted on the training clips (held out from the test).
    # Not asserted: the task's own baseline, a prior fitted on the test answers themselves, which
    # zero-shot only equals (measured 36.1 vs 36.1; direction 0%, turn 33%: a model that saw single
    # images answers motion questions from its per-type priors; BENCHMARKS.md has the row).
    assert metrics["accuracy"] > prior + 10.0, (
        f"video QA {metrics['accuracy']:.1f} vs prior {prior:.1f}; {kinds}"
    )
    assert metrics["accuracy"] >= baseline["accuracy"] - 5.0, (metrics, baseline, kinds)
