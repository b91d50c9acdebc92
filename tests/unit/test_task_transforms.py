"""The finetuning row transforms, called directly: answer weights, boxes that stay on their
object through crop, flip and letterbox, image pairs that flip together with their statement."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mplug.tokenizer import load_tokenizer
from pipelines.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    CaptionTransform,
    ClassificationTransform,
    GroundingTransform,
    VQATransform,
    objects,
)

pytestmark = pytest.mark.unit


def _png(size=(80, 60), colour=(128, 128, 128), box=None, box_colour=(230, 20, 20)) -> bytes:
    im = Image.new("RGB", size, colour)
    if box is not None:
        x, y, w, h = box
        ImageDraw.Draw(im).rectangle((x, y, x + w - 1, y + h - 1), fill=box_colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _decode(ids) -> str:
    return load_tokenizer().decode([int(i) for i in ids], skip_special_tokens=True)


def _pixel(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """RGB 0-255 of a normalised (3, S, S) image at pixel (x, y)."""
    value = image[:, int(y), int(x)] * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    return value * 255


def test_vqa_rows_weigh_answers_by_votes_and_single_sources_as_configured() -> None:
    udf = VQATransform(image_size=32, question_len=12, answer_len=6, max_answers=3, train=False,
                       single_answer_weight=0.5)  # fmt: skip
    eval_rows = udf({"key": objects(["q1"]), "image": objects([_png()]), "question": objects(["what color"]),
                     "raw_answers": objects([["red", "red", "blue"]])})  # fmt: skip
    assert eval_rows["raw_answers"][0] == ["red", "red", "blue"] and eval_rows["key"][0] == "q1"
    train = VQATransform(image_size=32, question_len=12, answer_len=6, max_answers=3, train=True, seed=0)
    batch = {
        "key": objects(["q1", "q2"]),
        "image": objects([_png(), _png()]),
        "question": objects(["what color is it", "what shape"]),
        # List columns arrive from Ray Data as numpy arrays.
        "answers": objects(
            [np.array(["red", "blue", "green", "pink"], dtype=object), np.array(["circle"], dtype=object)]
        ),
        "answer_weights": objects(
            [np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32), np.array([1.0], dtype=np.float32)]
        ),
        "raw_answers": objects([["red"] * 4 + ["blue"] * 3 + ["green"] * 2 + ["pink"], ["circle"]]),
        "dataset": objects(["vqa", "vg"]),
    }
    out = train(batch)
    assert out["answer_ids"].shape == (2, 3, 6) and out["answer_weights"].dtype == np.float32
    np.testing.assert_allclose(
        out["answer_weights"], [[0.4, 0.3, 0.2], [0.5, 0.0, 0.0]]
    )  # top 3; VG-style 0.5
    assert [_decode(out["answer_ids"][0, i]) for i in range(3)] == ["red", "blue", "green"]
    # The source decides, not the number of answers: a VQA question with one (or ten agreeing)
    # human answers keeps its full weight; a VG question is single-answer whatever it holds.
    agreed = {**batch, "dataset": objects(["vg", "vqa"]), "raw_answers": objects([["red"] * 10, ["circle"]])}
    np.testing.assert_allclose(train(agreed)["answer_weights"], [[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]])


def test_vqa_flip_swaps_left_and_right_in_question_and_answers() -> None:
    udf = VQATransform(image_size=32, question_len=12, answer_len=6, max_answers=1, train=True, seed=3)
    seen = set()
    for _ in range(12):
        out = udf({"key": objects(["q"]), "image": objects([_png()]), "question": objects(["is the cat left"]),
                   "answers": objects([["left"]]), "answer_weights": objects([[1.0]]),
                   "raw_answers": objects([["left"] * 10])})  # fmt: skip
        question, answer = _decode(out["question_ids"][0]), _decode(out["answer_ids"][0, 0])
        assert question.split()[-1] == answer  # both flipped or neither
        seen.add(answer)
    assert seen == {"left", "right"}


def test_scst_caption_rows_say_which_images_were_flipped() -> None:
    udf = CaptionTransform(image_size=32, caption_len=10, train=True, seed=0, include_ids=True)
    rows = {"key": objects(["c"]), "image": objects([_png()]), "caption": objects(["a dot left of a box"]),
            "image_id": objects(["img7"])}  # fmt: skip
    seen = set()
    for _ in range(12):
        out = udf(rows)
        side = _decode(out["caption_ids"][0]).split()[2]
        assert bool(out["flipped"][0]) == (side == "right") and out["image_id"][0] == "img7"
        seen.add(side)
    assert seen == {"left", "right"}
    evaluation = CaptionTransform(image_size=32, caption_len=10, train=False, include_ids=True)
    assert not evaluation(rows)["flipped"][0]


def test_grounding_box_stays_on_its_object_through_crop_flip_and_letterbox() -> None:
    box = [50.0, 10.0, 20.0, 16.0]  # red rectangle right of centre, in an 80 × 60 image
    rows = {"key": objects(["r"]), "image": objects([_png(box=box)]), "caption": objects(["the red box on the right"]),
            "bbox": objects([box]), "width": objects([80]), "orig_width": objects([160])}  # fmt: skip
    udf = GroundingTransform(image_size=48, max_text_len=10, train=True, seed=0, crop_probability=0.7)
    sides = set()
    for _ in range(20):
        out = udf(rows)
        cx, cy, w, h = out["boxes"][0] * 48
        assert (
            np.all(_pixel(out["image"][0], cx, cy) > [180, -10, -10])
            and _pixel(out["image"][0], cx, cy)[1] < 80
        )
        sides.add(_decode(out["text_ids"][0]).split()[-1])
    assert sides == {
        "left",
        "right",
    }  # flipped rows say "left": the box moved with the mirror (checked above)
    ev = GroundingTransform(image_size=48, max_text_len=10, train=False)(rows)
    np.testing.assert_allclose(ev["gt_box"][0], [100, 20, 40, 32])  # original pixels (2× the stored image)
    np.testing.assert_allclose(ev["frame"][0], [0, 0, 48 / 80])  # top-left placement, resized 48/80
    np.testing.assert_allclose(ev["orig_size"][0], [160, 120])


def _gradient_png(horizontal: bool) -> bytes:
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    pixels = np.tile(ramp[None, :] if horizontal else ramp[:, None], (32, 1) if horizontal else (1, 32))
    buf = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(buf, format="PNG")
    return buf.getvalue()


def _left_to_right(image: np.ndarray) -> float:
    """How much the column means rise from the left edge to the right one (normalised units):
    about +3.7 for the horizontal ramp, -3.7 mirrored, near 0 for the vertical one."""
    columns = image.mean(axis=(0, 1))
    return float(np.polyfit(np.linspace(0, 1, columns.size), columns, 1)[0])


def test_image_pairs_flip_together_with_their_statement() -> None:
    # The left image rises left→right; the right one top→bottom (flat across x). RandAugment's
    # ops keep a ramp's direction (monotone colour maps, small shears), a flip reverses it.
    rising, flat = _gradient_png(horizontal=True), _gradient_png(horizontal=False)
    udf = ClassificationTransform(
        image_size=16, max_text_len=12, labels=("false", "true"), num_images=2, train=True, seed=1
    )
    seen = set()
    for _ in range(12):
        out = udf({"key": objects(["p"]), "image": objects([rising]), "images": objects([[rising, flat]]),
                   "caption": objects(["the left image rises"]), "label": objects(["True"])})  # fmt: skip
        side = _decode(out["input_ids"][0]).split()[1]
        slope = [_left_to_right(out["image"][0, i]) for i in range(2)]
        ramp = int(np.argmax(np.abs(slope)))  # the horizontal ramp's slot
        if side == "left":  # not flipped: the rising image first, still rising
            assert ramp == 0 and slope[0] > 0.5, slope
        else:  # flipped: both mirrored and swapped, so the statement reads true again
            assert side == "right" and ramp == 1 and slope[1] < -0.5, slope
        assert out["label"][0] == 1
        seen.add(side)
    assert seen == {"left", "right"}
    red, blue = _png(colour=(230, 20, 20)), _png(colour=(20, 20, 230))
    with pytest.raises(ValueError, match="not one of"):
        udf({"key": objects(["p"]), "image": objects([red]), "images": objects([[red, blue]]),
             "caption": objects(["x"]), "label": objects(["maybe"])})  # fmt: skip
