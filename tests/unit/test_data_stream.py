"""The training-stream UDF, called directly (no Ray): shapes, dtypes, normalisation, tokens."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mplug.tokenizer import load_tokenizer
from pipelines.data.stream import collate_rows
from pipelines.data.transforms import CLIP_MEAN, CLIP_STD, ImageTextTransform, swap_left_right

pytestmark = pytest.mark.unit


def batch_of(
    colours: list[tuple[int, int, int]], captions: list[str], size: tuple[int, int] = (60, 40)
) -> dict:
    images = []
    for colour in colours:
        buf = io.BytesIO()
        Image.new("RGB", size, colour).save(buf, format="PNG")
        images.append(buf.getvalue())
    return {
        "key": np.array([f"k{i}" for i in range(len(colours))], dtype=object),
        "image": np.array(images, dtype=object),
        "caption": np.array(captions, dtype=object),
    }


def test_eval_rows_are_fixed_shape_normalised_and_deterministic() -> None:
    udf = ImageTextTransform(image_size=32, max_text_len=12, train=False)
    batch = batch_of([(255, 0, 0), (0, 0, 0)], ["a red square", "a black square on the left"])
    out = udf(batch)
    assert out["image"].shape == (2, 3, 32, 32) and out["image"].dtype == np.float32
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 12)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == np.int64
    assert list(out["key"]) == ["k0", "k1"]
    red = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    np.testing.assert_allclose(out["image"][0].mean(axis=(1, 2)), red, atol=1e-3)
    expected = load_tokenizer()(["a red square", "a black square on the left"], padding="max_length",
                                truncation=True, max_length=12)  # fmt: skip
    np.testing.assert_array_equal(out["input_ids"], np.array(expected["input_ids"]))
    np.testing.assert_array_equal(udf(batch)["image"], out["image"])  # no randomness in eval


def test_train_rows_are_augmented_but_keep_their_shape() -> None:
    udf = ImageTextTransform(image_size=32, max_text_len=8, train=True, seed=1)
    noise = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    batch = {"key": np.array(["a"] * 4, dtype=object), "image": np.array([buf.getvalue()] * 4, dtype=object),
             "caption": np.array(["x"] * 4, dtype=object)}  # fmt: skip
    out = udf(batch)
    assert out["image"].shape == (4, 3, 32, 32) and np.isfinite(out["image"]).all()
    # Same source image four times, random crops/flips/RandAugment: the rows differ.
    assert len({out["image"][i].tobytes() for i in range(4)}) == 4
    torch.testing.assert_close(torch.from_numpy(out["input_ids"][0]), torch.from_numpy(out["input_ids"][1]))


def test_question_stands_in_for_a_missing_caption() -> None:
    udf = ImageTextTransform(image_size=16, max_text_len=8, train=False)
    batch = batch_of([(9, 9, 9)], [None])
    batch["question"] = np.array(["what colour"], dtype=object)
    ids = udf(batch)["input_ids"][0]
    assert load_tokenizer().decode(ids, skip_special_tokens=True) == "what colour"


def test_flip_swaps_left_and_right_words_only() -> None:
    assert swap_left_right("a circle on the left and a star at the top right") == (
        "a circle on the right and a star at the top left"
    )
    assert swap_left_right("leftover bright") == "leftover bright"


def test_bad_sizes_are_named() -> None:
    with pytest.raises(ValueError, match="image_size=0"):
        ImageTextTransform(image_size=0, max_text_len=8)


def test_training_rows_can_leave_out_the_string_key_and_keyed_rows_collate() -> None:
    batch = batch_of([(1, 2, 3)], ["x"])
    unkeyed = ImageTextTransform(image_size=16, max_text_len=8, train=False, include_key=False)(batch)
    assert set(unkeyed) == {"image", "input_ids", "attention_mask"}
    keyed = collate_rows(ImageTextTransform(image_size=16, max_text_len=8, train=False)(batch))
    assert (
        keyed["key"] == ["k0"]
        and keyed["image"].dtype == torch.float32
        and keyed["input_ids"].shape == (1, 8)
    )
