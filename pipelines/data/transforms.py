"""Row transforms of the training and evaluation streams: processed rows -> fixed-shape rows.

Each transform is a Ray Data `map_batches` UDF: heavy state (tokenizer, torchvision transforms)
is built once per worker process in `__init__`; `__call__(batch) -> batch` is pure and runs
without Ray (unit-testable). Batches are numpy dicts; image columns hold encoded bytes.

The image side is shared (`ImageAugment`): training draws RandomResizedCrop + horizontal flip +
RandAugment(2, 7) over the official op set, evaluation resizes deterministically. A flip mirrors
the scene, so "left" and "right" swap in the row's text too (`swap_left_right`).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from mplug.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Transform:
    """A row transform to run in the stream: `cls(**kwargs)` once per worker process, then
    `__call__(batch)`. `kwargs` are (name, hashable value) pairs: the stream keeps one built
    instance per distinct Transform."""

    cls: type
    kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, transform_cls: type, **kwargs: Any) -> Transform:
        return cls(transform_cls, tuple(sorted(kwargs.items())))

    def build(self) -> Any:
        return self.cls(**dict(self.kwargs))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(text: str) -> str:
    """A horizontal flip mirrors the scene, so 'left' and 'right' in its text swap too."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


OFFICIAL_RANDAUG_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


class OfficialRandAugment(T.RandAugment):
    """RandAugment(N, M) over the op set the official mPLUG code uses.

    The official list leaves out the colour-changing ops (Color, Solarize, Posterize,
    Contrast): captions name colours, and an op that turns a red circle purple makes the
    pair wrong.
    """

    _AUGMENTATION_SPACE = {
        k: v for k, v in T.RandAugment._AUGMENTATION_SPACE.items() if k in OFFICIAL_RANDAUG_OPS
    }


def decode_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(bytes(data))).convert("RGB")


class ImageAugment:
    """PIL image -> normalised (3, S, S) float tensor, and whether it was flipped.

    train: RandomResizedCrop(crop_min_scale..1, bicubic) + flip (p 0.5) + RandAugment(2, 7)
    (pretraining 0.2, finetuning 0.5, as the official code). eval: `eval_resize="square"`
    resizes to S×S as the official finetuning evaluation does; `"center_crop"` resizes the
    shorter side and centre-crops (no aspect change).
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        crop_min_scale: float = 0.2,
        eval_resize: str = "center_crop",
        rng: np.random.Generator | None = None,
        randaugment: bool = True,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size={image_size} must be positive")
        if eval_resize not in ("square", "center_crop"):
            raise ValueError(f"eval_resize={eval_resize!r}: expected 'square' or 'center_crop'")
        bicubic = T.InterpolationMode.BICUBIC
        self.train = train
        self.rng = rng if rng is not None else np.random.default_rng(0)
        if train:
            self.geometric = T.RandomResizedCrop(
                image_size, scale=(crop_min_scale, 1.0), interpolation=bicubic
            )
            self.randaugment = (
                OfficialRandAugment(num_ops=2, magnitude=7, interpolation=bicubic) if randaugment else None
            )
        elif eval_resize == "square":
            self.geometric = T.Resize((image_size, image_size), interpolation=bicubic)
            self.randaugment = None
        else:
            self.geometric = T.Compose(
                [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
            )
            self.randaugment = None
        self.to_float = T.Compose(
            [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
        )

    def reseed(self, seed: int | None) -> None:
        """Draw this row's augmentation from its own seed (the training order's `_seed`: the
        same draws in every run, whichever process transforms the row)."""
        if seed is not None and self.train:
            self.rng = np.random.default_rng(int(seed))
            torch.manual_seed(int(seed))

    def __call__(self, im: Image.Image, flip: bool | None = None) -> tuple[torch.Tensor, bool]:
        """`flip`: force the flip decision (two images of one NLVR2 row flip together)."""
        im = self.geometric(im)
        flipped = False
        if self.train:
            flipped = bool(self.rng.random() < 0.5) if flip is None else flip
            if flipped:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.randaugment is not None:
                im = self.randaugment(im)
        return self.to_float(im), flipped


def process_rng(seed: int) -> np.random.Generator:
    """A random stream per worker process: seeded, distinct per process. torch's global RNG
    (RandomResizedCrop, RandAugment) is seeded from it too."""
    rng = np.random.default_rng([seed, os.getpid()])
    torch.manual_seed(int(rng.integers(2**31)))
    return rng


class TextTokenizer:
    """BERT tokenisation padded/truncated to a fixed length -> (ids, mask) int64 (B, L)."""

    def __init__(self, max_len: int, tokenizer_path: str | None = None) -> None:
        if max_len <= 0:
            raise ValueError(f"max_len={max_len} must be positive")
        self.max_len = max_len
        self.tokenizer = load_tokenizer(tokenizer_path)

    def __call__(self, texts: list[str], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_len or self.max_len,
            return_tensors="np",
        )  # fmt: skip
        return tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)


def objects(values: list) -> np.ndarray:
    """A 1-D object array holding one Python value (e.g. a list of references) per row."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _values(value) -> list:
    """A list column's value as a list: Ray Data hands numpy arrays, Python callers lists, None for null."""
    return [] if value is None else list(value)


def _text_list(value) -> list[str]:
    """A list column's value (numpy array, list or None) as a list of str."""
    if value is None:
        return []
    return [str(v) for v in list(value)]


def _image_id(row: dict) -> str:
    """The row's image id (rows of one image share it: COCO's five captions), else its key."""
    image_id = row.get("image_id")
    return str(image_id) if image_id is not None else str(row["key"])


def _strings(values: list) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


class RowTransform:
    """What every task's row transform shares: one pass over the batch's rows, each drawing its
    random augmentation from its own seed (`_seed`, set by the training order: the same draws in
    every run and process), then the texts tokenised together. A task's transform says only what
    differs: `row` turns one row into its outputs, `stack` makes the batch of them."""

    def __init__(self, text_len: int, train: bool, tokenizer_path: str | None = None) -> None:
        self.train = train
        self.tokenize = TextTokenizer(text_len, tokenizer_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        rows = [{name: batch[name][i] for name in batch} for i in range(n)]
        outs = []
        for row in rows:
            seed = row.get("_seed")
            if self.train and seed is not None:
                self.reseed(int(seed))
            outs.append(self.row(row))
        return self.stack(rows, outs)

    def reseed(self, seed: int) -> None:
        """Draw the next row's augmentation from `seed`."""

    def row(self, row: dict) -> dict:
        raise NotImplementedError

    def stack(self, rows: list[dict], outs: list[dict]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def tokens(
        self, texts: list[str], ids: str, mask: str, max_len: int | None = None
    ) -> dict[str, np.ndarray]:
        token_ids, token_mask = self.tokenize(texts, max_len)
        return {ids: token_ids, mask: token_mask}


class AugmentedRowTransform(RowTransform):
    """A row transform whose image goes through `ImageAugment`: RandomResizedCrop, flip and
    RandAugment in training, a deterministic resize in evaluation (`eval_resize`)."""

    eval_resize = "square"  # the official finetuning evaluation resizes to S×S

    def __init__(self, image_size: int, text_len: int, train: bool = True, seed: int = 0,
                 crop_min_scale: float = 0.5, tokenizer_path: str | None = None) -> None:  # fmt: skip
        super().__init__(text_len, train, tokenizer_path)
        self.augment = ImageAugment(image_size, train, crop_min_scale, self.eval_resize,
                                    process_rng(seed) if train else None)  # fmt: skip

    def reseed(self, seed: int) -> None:
        self.augment.reseed(seed)

    def image(self, data: bytes, flip: bool | None = None) -> tuple[torch.Tensor, bool]:
        """The row's image, augmented: (normalised (3, S, S), whether it was mirrored)."""
        return self.augment(decode_rgb(data), flip)

    @staticmethod
    def images(outs: list[dict]) -> np.ndarray:
        return torch.stack([o["image"] for o in outs]).numpy()


class ImageTextTransform(AugmentedRowTransform):
    """Pretraining rows: `image` float32 (B, 3, S, S), `input_ids` / `attention_mask` int64
    (B, max_text_len) of the caption (or the question where a row has no caption), and with
    `include_key` the ids `key` and `image_id` (str; the key where the row has no image id)."""

    eval_resize = "center_crop"

    def __init__(
        self,
        image_size: int,
        max_text_len: int,
        train: bool = True,
        seed: int = 0,
        tokenizer_path: str | None = None,
        swap_left_right_on_flip: bool = True,
        include_key: bool = True,
        crop_min_scale: float = 0.2,
    ) -> None:
        if image_size <= 0 or max_text_len <= 0:
            raise ValueError(f"image_size={image_size} and max_text_len={max_text_len} must be positive")
        super().__init__(image_size, max_text_len, train, seed, crop_min_scale, tokenizer_path)
        self.swap_left_right_on_flip, self.include_key = swap_left_right_on_flip, include_key
        self.tokenizer = self.tokenize.tokenizer

    def row(self, row: dict) -> dict:
        image, flipped = self.image(row["image"])
        text = row.get("caption") or row.get("question") or ""
        return {
            "image": image,
            "text": swap_left_right(text) if flipped and self.swap_left_right_on_flip else text,
        }

    def stack(self, rows: list[dict], outs: list[dict]) -> dict[str, np.ndarray]:
        out = {
            "image": self.images(outs),
            **self.tokens([o["text"] for o in outs], "input_ids", "attention_mask"),
        }
        if self.include_key:
            out["key"] = _strings([r["key"] for r in rows])
            out["image_id"] = _strings([_image_id(r) for r in rows])
        return out


class VQATransform(AugmentedRowTransform):
    """VQA rows. Training: `image`, `question_ids`/`question_mask` (B, Lq), `answer_ids`/
    `answer_mask` (B, A, La) of up to A distinct answers as `[CLS] answer [SEP]`, and
    `answer_weights` (B, A) float32: each answer's share of the human answers (0 in unused
    slots); a row whose `dataset` is a single-answer source (`single_answer_sources`: Visual
    Genome, "vg") weighs its answer `single_answer_weight` (official: 0.5). Evaluation: `image`,
    the question tokens, `key` (the question id), `question` and `raw_answers` (the human
    answers, for the official metric). A flip swaps "left"/"right" in the question and in the
    answers.
    """

    def __init__(
        self,
        image_size: int,
        question_len: int,
        answer_len: int,
        max_answers: int,
        train: bool = True,
        seed: int = 0,
        crop_min_scale: float = 0.5,
        single_answer_weight: float = 0.5,
        tokenizer_path: str | None = None,
        single_answer_sources: tuple[str, ...] = ("vg",),
    ) -> None:
        super().__init__(image_size, question_len, train, seed, crop_min_scale, tokenizer_path)
        self.answer_len, self.max_answers = answer_len, max_answers
        self.single_answer_weight = single_answer_weight
        self.single_answer_sources = frozenset(s.lower() for s in single_answer_sources)

    def _answers(self, row: dict) -> tuple[list[str], list[float]]:
        answers, weights = (
            _text_list(row.get("answers")),
            [float(w) for w in _values(row.get("answer_weights"))],
        )
        if len(weights) != len(answers):
            weights = [1.0 / len(answers)] * len(answers) if answers else []
        if str(row.get("dataset") or "").lower() in self.single_answer_sources:  # one answer per question
            weights = [self.single_answer_weight] * len(answers)
        ranked = sorted(zip(answers, weights), key=lambda aw: -aw[1])[: self.max_answers]
        return [a for a, _ in ranked], [w for _, w in ranked]

    def row(self, row: dict) -> dict:
        image, flipped = self.image(row["image"])
        question = str(row.get("question") or "")
        answers, weights = self._answers(row)
        if flipped:
            question, answers = swap_left_right(question), [swap_left_right(a) for a in answers]
        return {"image": image, "question": question, "answers": answers, "weights": weights}

    def stack(self, rows: list[dict], outs: list[dict]) -> dict[str, np.ndarray]:
        questions = [o["question"] for o in outs]
        out = {"image": self.images(outs), **self.tokens(questions, "question_ids", "question_mask")}
        if not self.train:
            out["key"] = _strings([r["key"] for r in rows])
            out["question"] = np.asarray(questions, dtype=object)
            out["raw_answers"] = objects(
                [_text_list(r.get("raw_answers")) or _text_list(r.get("answers")) for r in rows]
            )
            return out
        n, a = len(rows), self.max_answers
        slots = [o["answers"] + [""] * (a - len(o["answers"])) for o in outs]
        answers = self.tokens([s for row in slots for s in row], "ids", "mask", self.answer_len)
        out["answer_ids"] = answers["ids"].reshape(n, a, self.answer_len)
        out["answer_mask"] = answers["mask"].reshape(n, a, self.answer_len)
        out["answer_weights"] = np.asarray([o["weights"] + [0.0] * (a - len(o["weights"])) for o in outs],
                                           dtype=np.float32)  # fmt: skip
        return out


class CaptionTransform(AugmentedRowTransform):
    """Captioning rows: `image` and `caption_ids`/`caption_mask` (B, L) of `[CLS] prompt caption
    [SEP]` (cut at `caption_len` tokens), plus the ids `key` and `image_id` (str: the image's
    references are looked up by it) and `flipped` (bool: SCST mirrors a flipped image's sampled
    captions back before scoring them against its references) when `include_ids` (evaluation and
    SCST). A flip swaps "left"/"right" in the caption."""

    def __init__(
        self,
        image_size: int,
        caption_len: int,
        train: bool = True,
        seed: int = 0,
        crop_min_scale: float = 0.5,
        prompt: str = "",
        include_ids: bool = False,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(image_size, caption_len, train, seed, crop_min_scale, tokenizer_path)
        self.prompt, self.include_ids = prompt, include_ids

    def row(self, row: dict) -> dict:
        image, flipped = self.image(row["image"])
        caption = str(row.get("caption") or "")
        return {"image": image, "flipped": flipped,
                "caption": self.prompt + (swap_left_right(caption) if flipped else caption)}  # fmt: skip

    def stack(self, rows: list[dict], outs: list[dict]) -> dict[str, np.ndarray]:
        out = {"image": self.images(outs),
               **self.tokens([o["caption"] for o in outs], "caption_ids", "caption_mask")}  # fmt: skip
        if self.include_ids:
            out["key"] = _strings([r["key"] for r in rows])
            out["image_id"] = _strings([_image_id(r) for r in rows])
            out["flipped"] = np.asarray([o["flipped"] for o in outs], dtype=bool)
        return out


def stable_image_number(image_id: str) -> int:
    """A non-negative int64 for an image id string, the same in every process (retrieval's ITC
    takes rows with equal numbers as captions of one image)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "big") >> 1


class RetrievalTransform(AugmentedRowTransform):
    """Retrieval rows: `image`, `input_ids`/`attention_mask` of the caption, and `image_number`
    (int64, from the image id: the captions of one image are positives of each other). In
    evaluation also `key` and `image_id` (str)."""

    def __init__(
        self,
        image_size: int,
        max_text_len: int,
        train: bool = True,
        seed: int = 0,
        crop_min_scale: float = 0.5,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(image_size, max_text_len, train, seed, crop_min_scale, tokenizer_path)

    def row(self, row: dict) -> dict:
        image, flipped = self.image(row["image"])
        caption = str(row.get("caption") or "")
        return {"image": image, "caption": swap_left_right(caption) if flipped else caption}

    def stack(self, rows: list[dict], outs: list[dict]) -> dict[str, np.ndarray]:
        groups = [_image_id(r) for r in rows]
        out = {
            "image": self.images(outs),
            **self.tokens([o["caption"] for o in outs], "input_ids", "attention_mask"),
            "image_number": np.asarray([stable_image_number(g) for g in groups], dtype=np.int64),
        }
        if not self.train:
            out["key"] = _strings([r["key"] for r in rows])
            out["image_id"] = _strings(groups)
        return out


class GroundingTransform(RowTransform):
    """Referring-expression rows, boxes kept right through every geometric step.

    The image is letterboxed: resized so its longer side is S, then padded to S×S (at a random
    offset in training, top-left in evaluation). Training first draws a random crop that keeps
    the whole box (p = 0.5) and a horizontal flip that mirrors the box and swaps "left"/"right"
    in the expression. Output: `image`, `text_ids`/`text_mask`, `boxes` float32 (B, 4): the
    normalised (cx, cy, w, h) in the square; evaluation adds `key`, `gt_box` (x, y, w, h in the
    original image's pixels) and `frame` float32 (B, 3) = (offset x, offset y, scale) mapping
    stored-image pixels into the square (square = stored · scale + offset), `to_original` (B,)
    = original / stored pixel ratio and `orig_size` (B, 2) the original (width, height).
    """

    def __init__(
        self,
        image_size: int,
        max_text_len: int,
        train: bool = True,
        seed: int = 0,
        crop_probability: float = 0.5,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(max_text_len, train, tokenizer_path)
        self.size, self.crop_probability = image_size, crop_probability
        self.rng = process_rng(seed) if train else np.random.default_rng(0)
        self.to_float = T.Compose(
            [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
        )

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def _crop_keeping_box(self, im: Image.Image, box: list[float]) -> tuple[Image.Image, list[float]]:
        x, y, w, h = box
        width, height = im.size
        left = self.rng.uniform(0, max(0.0, x))
        top = self.rng.uniform(0, max(0.0, y))
        right = self.rng.uniform(min(width, x + w), width)
        bottom = self.rng.uniform(min(height, y + h), height)
        if right - left < 2 or bottom - top < 2:
            return im, box
        return im.crop((left, top, right, bottom)), [x - left, y - top, w, h]

    def _letterbox(self, im: Image.Image) -> tuple[Image.Image, float, float, float]:
        width, height = im.size
        scale = self.size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        im = im.resize(new, Image.Resampling.BICUBIC)
        free_x, free_y = self.size - new[0], self.size - new[1]
        ox = int(self.rng.integers(0, free_x + 1)) if self.train else 0
        oy = int(self.rng.integers(0, free_y + 1)) if self.train else 0
        square = Image.new("RGB", (self.size, self.size), tuple(round(255 * m) for m in CLIP_MEAN))
        square.paste(im, (ox, oy))
        return square, float(ox), float(oy), scale

    def row(self, row: dict) -> dict:
        im = decode_rgb(row["image"])
        box = [float(v) for v in list(row["bbox"])]
        text = str(row.get("caption") or "")
        stored_box, stored_size = box, im.size
        if self.train:
            if self.rng.random() < self.crop_probability:
                im, box = self._crop_keeping_box(im, box)
            if self.rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                box = [im.size[0] - box[0] - box[2], box[1], box[2], box[3]]
                text = swap_left_right(text)
        square, ox, oy, scale = self._letterbox(im)
        x, y, w, h = (v * scale for v in box)
        x, y = x + ox, y + oy
        width, orig_width = row.get("width"), row.get("orig_width")
        ratio = float(orig_width) / float(width or stored_size[0]) if orig_width else 1.0
        return {
            "image": self.to_float(square), "text": text,
            "box": [(x + w / 2) / self.size, (y + h / 2) / self.size, w / self.size, h / self.size],
            "gt": [v * ratio for v in stored_box], "frame": [ox, oy, scale], "ratio": ratio,
            "size": [stored_size[0] * ratio, stored_size[1] * ratio],
        }  # fmt: skip

    def stack(self, rows: list[dict], outs: list[dict]) -> dict[str, np.ndarray]:
        out = {
            "image": torch.stack([o["image"] for o in outs]).numpy(),
            **self.tokens([o["text"] for o in outs], "text_ids", "text_mask"),
            "boxes": np.asarray([o["box"] for o in outs], dtype=np.float32).clip(0, 1),
        }
        if not self.train:
            out["key"] = _strings([r["key"] for r in rows])
            out["gt_box"] = np.asarray([o["gt"] for o in outs], dtype=np.float32)
            out["frame"] = np.asarray([o["frame"] for o in outs], dtype=np.float32)
            out["to_original"] = np.asarray([o["ratio"] for o in outs], dtype=np.float32)
            out["orig_size"] = np.asarray([o["size"] for o in outs], dtype=np.float32)
        return out


class ClassificationTransform(AugmentedRowTransform):
    """NLVR2 / SNLI-VE rows: `image` (B, 3, S, S), or (B, 2, 3, S, S) from the `images` column
    when `num_images` = 2, the statement's `input_ids`/`attention_mask`, and `label` int64
    (index into `labels`). In training one flip decision per row: with two images both are
    mirrored and their order swapped, and "left"/"right" swap in the statement, so the pair
    still reads true or false as before. Evaluation adds `key`."""

    def __init__(
        self,
        image_size: int,
        max_text_len: int,
        labels: tuple[str, ...],
        num_images: int = 1,
        train: bool = True,
        seed: int = 0,
        crop_min_scale: float = 0.5,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(image_size, max_text_len, train, seed, crop_min_scale, tokenizer_path)
        self.labels = {label.lower(): i for i, label in enumerate(labels)}
        self.num_images = num_images

    def _label(self, value) -> int:
        name = str(value).strip().lower()
        if name not in self.labels:
            raise ValueError(f"label {value!r} is not one of {sorted(self.labels)}")
        return self.labels[name]

    def row(self, row: dict) -> dict:
        sources = list(row.get("images")) if self.num_images > 1 else [row["image"]]
        if len(sources) != self.num_images:
            raise ValueError(
                f"row {row['key']!r} has {len(sources)} images, this task takes {self.num_images}"
            )
        flip = bool(self.augment.rng.random() < 0.5) if self.train else False
        tensors = [self.image(s, flip=flip)[0] for s in sources]
        text = str(row.get("caption") or "")
        if flip:
            tensors, text = tensors[::-1], swap_left_right(text)
        return {"image": torch.stack(tensors) if self.num_images > 1 else tensors[0], "text": text,
                "label": self._label(row["label"])}  # fmt: skip

    def stack(self, rows: list[dict], outs: list[dict]) -> dict[str, np.ndarray]:
        out = {
            "image": self.images(outs),
            **self.tokens([o["text"] for o in outs], "input_ids", "attention_mask"),
            "label": np.asarray([o["label"] for o in outs], dtype=np.int64),
        }
        if not self.train:
            out["key"] = _strings([r["key"] for r in rows])
        return out
