"""After a short pretraining, finetuned mPLUG-tiny beats each model-free baseline on held-out
shapes-world data by the margin stated here; SCST keeps the captioner over its baseline.

In-process (`tests/finetune.py`: the ingest processing, row transforms, `train_step`, `predict`
and `score` of the Ray jobs), about 50 minutes on 2 cores (grounding alone ~23): `make test-learning`, not part of
`make test`. The margins are set below the measured ones (BENCHMARKS.md, 2026-12-04 and 2026-12-06 rows:
`benchmarks/finetune_learning.py --num 1000` runs the same stages).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from pipelines.tasks.base import EvalSetup
from tests import finetune as ft

pytestmark = pytest.mark.learning

NUM_IMAGES = 1000  # per task pool, split 80/10/10: 800 training images, 100 held out
PRETRAIN_EPOCHS = 2  # of the 4,000 caption pairs at batch 32: 250 steps
GROUNDING_IMAGES = 5000  # grounding's pool: 4,000 training images, ~12,000 expressions
GROUNDING_EPOCHS = 8  # as finetune_grounding_tiny.yaml: ~6,000 steps at batch 16


@dataclass(frozen=True)
class World:
    root: str
    files: dict
    baselines: dict
    pretrained: str  # the pretraining's final/ folder

    def rows(self, task: str, split: str) -> list[dict]:
        return ft.processed_rows(self.files[task][split], self.root)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from pipelines.synth.tasks import render_task_annotations, task_baselines

    work = str(tmp_path_factory.mktemp("learning"))
    root = os.path.join(work, "data")
    files = render_task_annotations(root, num=NUM_IMAGES, seed=1, image_size=64)
    baselines = task_baselines(root, tasks=("vqa", "caption", "nlvr2", "snli_ve"))
    pretrain = ft.task_from_config("pretrain", "jobs/configs/pretrain_tiny.yaml")
    torch.manual_seed(0)
    model = pretrain.build_model()
    rows = ft.processed_rows(files["caption"]["train"], root)
    ft.finetune(pretrain, model, rows, epochs=PRETRAIN_EPOCHS, batch_size=pretrain.job.data.batch_size)
    return World(root, files, baselines, ft.save_run(model, os.path.join(work, "pretrain")))


@pytest.mark.timeout(1800)  # its setup pretrains the shared model (~200 s); CE + 500 SCST steps ~11 min
def test_captioning_beats_the_constant_caption_and_scst_keeps_it_reading_the_image(
    world: World, tmp_path
) -> None:
    train, test = world.rows("caption", "train"), world.rows("caption", "test")
    task, model, _ = ft.finetuned("caption", world.pretrained, train, epochs=3)
    setup = EvalSetup(keys=ft.first_keys(test), references=ft.references_of(test))
    ce = ft.evaluate(task, model, test, setup)[0]["CIDEr"]
    constant = world.baselines["caption"]["consensus_caption_cider"]
    # Measured: CE 0.88-0.98 (three runs of one pretrained model) against the best constant's 0.58.
    assert ce > constant + 0.12, f"CE CIDEr {ce:.3f} vs constant caption {constant:.3f}"

    scst = ft.task_from_config(
        "caption",
        "jobs/configs/finetune_caption_scst_tiny.yaml",
        {"data.uris": [ft.caption_references(train, str(tmp_path / "refs"))]},
    )
    # One pass over the 4,000 training rows. Its held-out gain at this size is smaller than its
    # spread: +0.07, +0.06, +0.03 from one CE model, +0.17, +0.13, -0.01, -0.06 from others
    # (BENCHMARKS.md, 2026-12-06), so it is not asserted; that an SCST step moves probability
    # towards the better-rewarded beams is (tests/unit/test_caption_scst.py). Asserted: SCST does
    # not collapse onto one sentence (as lr 5e-5 began to) nor undo what CE learnt.
    ft.finetune(scst, model, train, epochs=1, batch_size=scst.job.data.batch_size, max_steps=500)
    after = ft.evaluate(scst, model, test, setup)[0]["CIDEr"]
    assert after > constant + 0.12, f"SCST CIDEr {after:.3f} vs constant caption {constant:.3f}"
    assert after > ce - 0.10, f"SCST CIDEr {after:.3f} vs its CE start {ce:.3f}"


def test_vqa_beats_the_majority_answer_of_its_question_type(world: World) -> None:
    # Every training question: 1,440 of them for 5 epochs left it on the prior (41.4 vs 41.3).
    task, model, _ = ft.finetuned("vqa", world.pretrained, world.rows("vqa", "train"), epochs=3)
    accuracy = ft.evaluate(task, model, world.rows("vqa", "test"))[0][task.primary_metric]
    majority = world.baselines["vqa"]["majority_by_question_type"]
    # Measured: 47.4 on 600 held-out questions against 41.3.
    assert accuracy > majority + 3.0, f"VQA {accuracy:.1f} vs majority by question type {majority:.1f}"


def test_snli_ve_beats_the_majority_label(world: World) -> None:
    task, model, _ = ft.finetuned("snli_ve", world.pretrained, world.rows("snli_ve", "train"), epochs=5)
    accuracy = ft.evaluate(task, model, world.rows("snli_ve", "test"))[0][task.primary_metric]
    majority = world.baselines["snli_ve"]["majority_class"]
    # Measured: 46.3 on 300 held-out pairs against 33.3.
    assert accuracy > majority + 6.0, f"SNLI-VE {accuracy:.1f} vs majority label {majority:.1f}"


def test_retrieval_recall_is_far_above_chance_after_itc_and_itm_reranking(world: World) -> None:
    task, model, _ = ft.finetuned("retrieval", world.pretrained, world.rows("retrieval", "train"), epochs=6)
    m = ft.evaluate(task, model, world.rows("retrieval", "test"))[0]
    # 100 held-out images, 500 captions: chance R@1 is 1.0 both ways. Measured (6 epochs, two
    # seeds): ITC R@1 41.0 / 37.8 and 42.0 / 38.2, ITM re-ranked 40.0 / 38.4 and 50.0 / 40.8;
    # r_mean ITM re-ranked 72.9 vs ITC alone 71.5, and 74.4 vs 72.0.
    for prefix in ("itc_", ""):
        for d in ("i2t", "t2i"):
            got, chance = m[f"{prefix}{d}_r1"], m[f"chance_{d}_r1"]
            assert got > chance + 12.0, (
                f"{prefix or 'ITM re-ranked '}{d} R@1 {got:.1f} vs chance {chance:.1f}"
            )
    assert m["r_mean"] > m["itc_r_mean"], (
        f"ITM re-ranked r_mean {m['r_mean']:.2f} vs ITC {m['itc_r_mean']:.2f}"
    )


def test_nlvr2_beats_the_majority_label(world: World) -> None:
    task, model, _ = ft.finetuned("nlvr2", world.pretrained, world.rows("nlvr2", "train"), epochs=5)
    accuracy = ft.evaluate(task, model, world.rows("nlvr2", "test"))[0][task.primary_metric]
    majority = world.baselines["nlvr2"]["majority_class"]
    # Measured: 57.0, and 54.0 after the sincos position start, on 200 held-out pairs against
    # 50.0 (the baseline). A classifier of the statement alone gets 55.5 by template,
    # 58.0 by sentence: this margin is not yet proof that the image pair is read.
    assert accuracy > majority + 3.0, f"NLVR2 {accuracy:.1f} vs majority label {majority:.1f}"


@pytest.mark.timeout(2400)  # ~23 min of the suite's ~50 (6,000 steps and 1,465 evaluations)
def test_grounding_beats_always_pointing_at_the_largest_object(world: World, tmp_path) -> None:
    from pipelines.synth.tasks import render_task_annotations, task_baselines

    # Its own, larger pool: the decoder learns to find a named object among 2-4 only after
    # ~1,500 steps, and 2,456 expressions for that many steps are learnt by heart.
    root = str(tmp_path / "data")
    files = render_task_annotations(root, num=GROUNDING_IMAGES, seed=1, image_size=64, tasks=("grounding",))
    train = ft.processed_rows(files["grounding"]["train"], root)
    test = ft.processed_rows(files["grounding"]["test"], root)
    task, model, _ = ft.finetuned("grounding", world.pretrained, train, epochs=GROUNDING_EPOCHS)
    accuracy = ft.evaluate(task, model, test)[0][task.primary_metric]
    largest = task_baselines(root, tasks=("grounding",))["grounding"]["largest_object"]
    # Measured: 49.7 on 1,465 held-out expressions against 34.1 (31.3 after 2,000 steps, 41.9
    # after 4,000; BENCHMARKS.md, 2026-12-06).
    assert accuracy > largest + 8.0, f"grounding Acc@0.5 {accuracy:.1f} vs largest object {largest:.1f}"
