"""Video (issue #28) without Ray: frame sampling, decoding and its rejects, the video annotation
formats and webdataset tars through ingest's own per-unit processing, the clip transforms, the
model reading a clip, the video tasks' scoring, and the moving shapes world. Tiny clips (32-64 px,
a few frames), so the whole module runs in seconds."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from pipelines.data.image import ImageLimits, ImageRejected
from pipelines.data.ingest import IngestConfig, UnitCounts, list_units, process_unit_records
from pipelines.data.video import (
    VideoLimits,
    entry_rows,
    frame_indices,
    process_video,
    video_refs,
)
from pipelines.synth.video import (
    Clip,
    captions,
    encode_mp4,
    question_kind,
    questions,
    render_clip,
    render_video_tasks,
)

pytestmark = pytest.mark.unit


def _clip(frames: int = 8, size: int = 32) -> bytes:
    """A clip whose frame t is grey level 20 t: which frame a sample is, is readable from it."""
    return encode_mp4([np.full((size, size, 3), 20 * t, np.uint8) for t in range(frames)], fps=4)


def _level(jpeg: bytes) -> int:
    from PIL import Image

    return int(round(np.asarray(Image.open(io.BytesIO(jpeg))).mean() / 20))


def _limits(**kw) -> VideoLimits:
    image = ImageLimits(resolution=kw.pop("resolution", 16), min_size=kw.pop("min_size", 8),
                        max_bytes=kw.pop("max_bytes", 10_000_000))  # fmt: skip
    return VideoLimits(image, **kw)


# ---- sampling -----------------------------------------------------------------------------------
def test_uniform_sampling_takes_the_first_frame_of_each_equal_span() -> None:
    # The official np.arange(0, vlen, vlen / num, dtype=int) where it is exact.
    assert frame_indices(100, 4, "uniform") == [0, 25, 50, 75]
    assert frame_indices(3, 6, "uniform") == [0, 0, 1, 1, 2, 2]  # a short clip repeats frames


def test_rand_and_headtail_draw_sorted_frames_from_where_they_should() -> None:
    rng = np.random.default_rng(0)
    rand = frame_indices(50, 8, "rand", rng)
    assert rand == sorted(rand) and len(set(rand)) == 8 and max(rand) < 50
    head_tail = frame_indices(50, 8, "headtail", rng)
    assert all(i < 25 for i in head_tail[:4]) and all(25 <= i < 50 for i in head_tail[4:])
    assert len(frame_indices(3, 5, "rand", rng)) == 5  # fewer frames than asked: drawn again
    with pytest.raises(ValueError, match="uniform"):
        frame_indices(10, 2, "middle")


# ---- decoding -----------------------------------------------------------------------------------
def test_a_clip_becomes_its_sampled_frames_resized_in_time_order() -> None:
    clip = process_video(_clip(8, size=32), _limits(num_frames=4, resolution=16))
    assert clip.length == 8 and clip.indices == (0, 2, 4, 6)
    assert [_level(f) for f in clip.frames] == [0, 2, 4, 6]  # the frames asked for, in order
    assert (clip.width, clip.height, clip.orig_width) == (16, 16, 32)
    assert clip.poster == clip.frames[2]
    drawn = process_video(_clip(8, size=32), _limits(num_frames=4, sampling="rand")).indices
    assert (
        drawn == process_video(_clip(8, size=32), _limits(num_frames=4, sampling="rand")).indices
    )  # re-runs agree


@pytest.mark.parametrize(
    ("data", "limits", "reason"),
    [
        (b"", {}, "empty_image"),
        (None, {}, "missing_image"),
        (b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8, {}, "decode_error"),
        ("truncated", {}, "decode_error"),
        ("one_frame", {"min_frames": 2}, "too_short"),
        ("clip", {"max_bytes": 100}, "too_large"),
        ("clip", {"min_size": 64}, "too_small"),
    ],
)
def test_a_broken_or_unfit_video_is_rejected_with_its_reason(data, limits, reason) -> None:
    good = _clip(8)
    data = {"truncated": good[: len(good) // 2], "one_frame": _clip(1), "clip": good}.get(data, data)
    with pytest.raises(ImageRejected) as err:
        process_video(data, _limits(**limits))
    assert err.value.reason == reason


# ---- annotation formats and ingest's per-unit processing ----------------------------------------
def test_each_video_annotation_format_gives_its_rows() -> None:
    msrvtt = entry_rows({"clip_name": "video7010", "caption": "a man sings"}, "u-1", "s3://b/v")
    assert msrvtt[0]["caption"] == "a man sings" and msrvtt[0]["image_id"] == "video7010"
    assert msrvtt[0]["_image_refs"] == [video_refs("s3://b/v", "video7010")]
    assert msrvtt[0]["_image_refs"][0][:2] == ["s3://b/v/video7010.mp4", "s3://b/v/video7010.webm"]
    qa = entry_rows({"video_id": "v1", "question": "who sings?", "answer": "man", "question_id": 7}, "u", "r")
    assert (qa[0]["key"], qa[0]["answers"], qa[0]["answer_weights"]) == ("7", ["man"], [1.0])
    vatex = entry_rows({"videoID": "Ab_000012_000022", "enCap": ["one", "two"]}, "u", "r")
    assert [r["key"] for r in vatex] == ["Ab_000012_000022#0", "Ab_000012_000022#1"]
    assert entry_rows({"clip_name": "../../etc/passwd", "caption": "x"}, "u-2", "r")[0]["_reject"][0] == (
        "path_outside_root"
    )
    assert entry_rows({"image": "a.jpg", "caption": "x"}, "u-3", "r")[0]["_reject"][0] == "bad_record"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("video-world"))
    return render_video_tasks(root, num=6, seed=0, image_size=32, num_frames=4, corrupt=True,
                              webdataset=True, split_fractions=(0.5, 0.0, 0.5))  # fmt: skip


def _ingest(input_uri: str, video_root: str | None, **options) -> tuple[list[dict], list[dict], int]:
    cfg = IngestConfig(input=input_uri, format="video", output="/nonexistent", video_root=video_root,
                       image_size=16, min_image_size=8, num_frames=3, **options)  # fmt: skip
    units, cols = list_units(cfg)
    good, bad, read = [], [], 0
    for unit in units:
        counts = UnitCounts()
        for clean, reject in process_unit_records(unit, cfg, cols, counts):
            (bad if reject else good).append(reject or clean)
        read += counts.read
    return good, bad, read


def test_ingest_counts_broken_videos_as_rejects_and_writes_the_rest(world) -> None:
    root = world["video_root"]["all"]
    good, bad, read = _ingest(world["msrvtt"]["train"], root, min_video_frames=2)
    with open(world["msrvtt"]["train"].replace("msrvtt_train.jsonl", "train_corrupt.json")) as f:
        expected = json.load(f)
    assert read == len(good) + len(bad) and len(good) == 2 * 3  # two captions per good clip
    assert sorted(r["reason"] for r in bad) == sorted(expected.values())
    assert all(root in r["detail"] for r in bad)  # the detail names the video
    row = good[0]
    assert len(row["frames"]) == 3 and row["image"] == row["frames"][1] and row["width"] == 16
    assert row["image_id"] == "train-000000"


def test_ingest_reads_webdataset_tars_with_a_video_member(world, tmp_path) -> None:
    good, bad, read = _ingest(world["webdataset"]["train"], None)
    assert (read, len(bad)) == (3, 0) and all(len(r["frames"]) == 3 and r["caption"] for r in good)
    tar = tmp_path / "noclip.tar"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("k1.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"text"))
    good, bad, _ = _ingest(str(tar), None)
    assert not good and bad[0]["reason"] == "missing_image" and "mp4" in bad[0]["detail"]


def test_a_video_annotation_file_is_cut_into_units_of_64_clips_unless_told(tmp_path) -> None:
    annotations = tmp_path / "msrvtt_test.jsonl"
    annotations.write_text(
        "".join(json.dumps({"clip_name": f"video{i}", "caption": f"a clip {i}"}) + "\n" for i in range(300))
    )

    def config(**options) -> IngestConfig:
        return IngestConfig(input=str(annotations), format="video", output="/nonexistent",
                            video_root=str(tmp_path), **options)  # fmt: skip

    default, explicit = config(), config(rows_per_unit=1_000)
    # A clip is a hundred images' work: 300 clips spread over the workers, not one unit.
    assert default.unit_rows() == 64 and len(list_units(default)[0]) >= 4
    assert explicit.unit_rows() == 1_000 and len(list_units(explicit)[0]) == 1
    # The layout is part of the output's settings: a re-run with another one is refused.
    assert default.settings()["rows_per_unit"] == 64 and explicit.settings()["rows_per_unit"] == 1_000
    images = IngestConfig(input=str(annotations), format="json", output="/nonexistent")
    assert images.unit_rows() == images.rows_per_unit == 1_000


def test_video_annotations_need_a_video_root(world) -> None:
    with pytest.raises(ValueError, match="video_root"):
        _ingest(world["msrvtt"]["train"], None)


# ---- the moving shapes world --------------------------------------------------------------------
def _frames_of(clip: Clip) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(clip.mp4)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def _centre_of(frame: np.ndarray, colour: tuple[int, int, int]) -> tuple[float, float] | None:
    near = np.abs(frame.astype(int) - np.asarray(colour)).sum(-1) < 60
    if near.sum() < 4:
        return None
    ys, xs = np.nonzero(near)
    return float(ys.mean()), float(xs.mean())


def test_the_event_questions_need_more_than_one_frame() -> None:
    from pipelines.synth.world import COLOURS

    seen = set()
    for i in range(40):
        clip = render_clip(f"c{i}", np.random.default_rng([9, i]), 64, 6, fps=4)
        frames = _frames_of(clip)
        first, last = frames[0], frames[-1]
        actor = clip.actor
        question, answer = questions(clip)[0]
        assert question_kind(question) in ("direction", "turn", "appear")
        seen.add(clip.event)
        if clip.event == "move":
            (y0, x0), (y1, x1) = (
                _centre_of(first, COLOURS[actor["colour"]]),
                _centre_of(last, COLOURS[actor["colour"]]),
            )
            moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}[answer]
            assert moved > 10, (clip.key, answer, (y0, x0), (y1, x1))
        elif clip.event == "turn":
            assert (
                _centre_of(first, COLOURS[answer]) is None and _centre_of(last, COLOURS[answer]) is not None
            )
        else:
            assert _centre_of(first, COLOURS[actor["colour"]]) is None
            assert _centre_of(last, COLOURS[actor["colour"]]) is not None
        assert captions(clip)[0].startswith(("a ", "an "))
    assert seen == {"move", "turn", "appear"}


# ---- the model reads a clip ---------------------------------------------------------------------
def _cfg():
    from mplug import MPlugConfig

    return MPlugConfig.preset("tiny", image_size=32, queue_size=16, text_config={"vocab_size": 1024})


def test_a_clip_is_its_frames_encoded_one_by_one_and_a_still_clip_ranks_as_its_image() -> None:
    from mplug.retrieval import MPlugForRetrieval

    torch.manual_seed(0)
    model = MPlugForRetrieval(_cfg()).eval()
    frames = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.encode_image(frames)
        per_frame = [model.encode_image(frames[:, t]) for t in range(3)]
        torch.testing.assert_close(tokens, torch.cat(per_frame, dim=1))  # (B, T*L, D), time order
        cls_mean = torch.stack([f[:, 0] for f in per_frame], 1).mean(1)
        expected = torch.nn.functional.normalize(model.vision_proj(cls_mean), dim=-1)
        torch.testing.assert_close(model.encode_image_features(frames), expected)
        still = frames[:, :1].expand(-1, 4, -1, -1, -1)
        torch.testing.assert_close(
            model.encode_image_features(still), model.encode_image_features(frames[:, 0])
        )
    ids = torch.randint(1000, 1024, (2, 8))
    out = model(frames, ids, torch.ones_like(ids), image_ids=torch.tensor([0, 1]))  # video training step
    assert torch.isfinite(out.loss)


# ---- the tasks -----------------------------------------------------------------------------------
def _task(name: str, **overrides):
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config

    job = load_config(None, {"task": name, "run.max_steps": 1, "video.num_frames": 2, **overrides})
    return task_class(name)(job, _cfg())


def test_video_transforms_read_the_frames_and_augment_a_clip_alike() -> None:
    frames = [_jpeg(level) for level in (0, 60, 120, 180)]
    row = {"key": "k", "image": frames[0], "frames": frames, "caption": "a red circle moves left",
           "image_id": "v"}  # fmt: skip
    batch = {k: np.asarray([v], dtype=object) for k, v in row.items()}
    evaluation = _task("video_retrieval").transform(train=False).build()(batch)
    assert evaluation["image"].shape == (1, 2, 3, 32, 32)
    levels = evaluation["image"][0].mean(axis=(1, 2, 3))
    assert levels[0] < levels[1]  # frames 0 and 2, in order
    still = {**row, "frames": [frames[1]] * 4, "_seed": 3}
    batch = {k: np.asarray([v], dtype=object) for k, v in still.items()}
    trained = (
        _task("video_qa", **{"vqa.answer_len": 4})
        .transform(train=True)
        .build()(
            {
                **batch,
                "question": np.asarray(["which way does it move?"], dtype=object),
                "answers": np.asarray([["left"]], dtype=object),
            }  # fmt: skip
        )
    )
    clip = trained["image"][0]
    assert clip.shape == (2, 3, 32, 32) and np.allclose(clip[0], clip[1])  # one crop, flip, RandAugment
    with pytest.raises(ValueError, match="ingest --format video"):
        _task("video_caption").transform(train=False).build()(
            {**batch, "frames": np.asarray([None], dtype=object)}
        )


def _jpeg(level: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 40), (level, level, level)).save(out, format="JPEG")
    return out.getvalue()


def test_video_qa_scores_top1_accuracy_beside_the_question_type_prior() -> None:
    task = _task("video_qa")
    rows = [
        {"question_id": "1", "question": "which way does it move?", "answer": "left", "answers": ["left"]},
        {"question_id": "2", "question": "which way does it go?", "answer": "Left", "answers": ["right"]},
        {"question_id": "3", "question": "which way is up?", "answer": "up", "answers": ["right"]},
        {"question_id": "4", "question": "what color is it?", "answer": "red", "answers": ["red"]},
    ]
    assert task.score(rows) == {"accuracy": 50.0, "num_questions": 4.0}
    assert task.baseline(rows) == {"accuracy": 75.0}  # "right" for "which way", "red" for "what color"


def test_an_answer_list_is_a_list_or_msrvtt_qas_answer_to_label_mapping() -> None:
    from pipelines.tasks.video import read_answer_list

    assert read_answer_list({"b": 1, "a": 0}, "x.json") == ["a", "b"]
    assert read_answer_list(["yes", "no"], "x.json") == ["yes", "no"]
    with pytest.raises(ValueError, match="answer: label"):
        read_answer_list([1, 2], "x.json")


def test_video_retrieval_ranks_by_itm_plus_itc_as_the_official_video_evaluation() -> None:
    task = _task("video_retrieval", **{"retrieval.k_test": 2})
    rng = np.random.default_rng(0)
    rows = [{"key": f"k{i}", "image_id": f"v{i // 2}", "image_emb": rng.normal(size=4), "text_emb": rng.normal(size=4)}
            for i in range(6)]  # fmt: skip
    from pipelines.tasks.ranking import Ranking, candidates

    ranking = Ranking.of(rows)
    pairs = candidates(ranking.sim, 2).pairs
    rescored = [{"image_id": ranking.image_ids[int(i)], "text": int(t), "score": float(10 * (int(i) == int(t) // 2))}
                for i, t in pairs]  # fmt: skip
    from pipelines.tasks.retrieval import RetrievalTask

    image = RetrievalTask.score(task, rows, None, rescored)
    video = task.score(rows, None, rescored)
    assert video["r_mean"] == image["itm_itc_r_mean"] and video["itm_r_mean"] == image["r_mean"]
    assert video["t2i_r1"] == image["itm_itc_t2i_r1"] and "itm_itc_r_mean" not in video


def test_video_qa_finetunes_through_the_registry_on_ingested_clips(world) -> None:
    from tests import finetune as ft

    rows, _, _ = _ingest(world["videoqa"]["train"], world["video_root"]["all"], min_video_frames=2)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows][:4]
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config
    from pipelines.train.launch import build_model_config

    job = load_config(None, {"task": "video_qa", "run.max_steps": 1, "video.num_frames": 2, "data.image_size": 32,
                             "vqa.answer_len": 4, "optim.lr": 1e-3, "optim.visual_lr": 1e-3,
                             "optim.warmup_steps": 0})  # fmt: skip
    task = task_class("video_qa")(job, build_model_config(job))  # the model `mplug finetune` builds
    torch.manual_seed(0)
    model = task.build_model()
    # The train step the loop runs, on clips as ingest writes them: the same 4 clips, learnt.
    losses = ft.finetune(task, model, rows, epochs=6, batch_size=4)
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_each_video_task_runs_its_image_tasks_model() -> None:
    from pipelines.tasks.video import video_task_for

    assert [video_task_for(t) for t in ("vqa", "caption", "retrieval", "grounding")] == [
        "video_qa", "video_caption", "video_retrieval", None,
    ]  # fmt: skip
    for name, image in (("video_qa", "vqa"), ("video_caption", "caption"), ("video_retrieval", "retrieval")):
        assert _task(name).model_class() is _task(image).model_class()
        assert _task(name).example_batch(2)["image"].shape[:2] == (2, 2)
