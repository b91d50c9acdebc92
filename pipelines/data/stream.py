"""Processed shards → what each Ray Train worker iterates.

Ingest did the expensive deterministic work once (decode, validate, resize to the train
resolution); here only the per-epoch random work runs, streamed by CPU tasks:
decode → RandomResizedCrop(0.2–1) + flip + RandAugment(2, 7) → CLIP normalisation → tokenise.
The eval variant resizes the shorter side and centre-crops, with no randomness.

Trainer usage (Ray Train V2):

    ds = training_dataset(uris, image_size=256, max_text_len=30)
    trainer = TorchTrainer(loop, datasets={"train": ds}, dataset_config=train_data_config(), ...)
    # (train_data_config: pipelines.train.data_config)
    # in the loop, every epoch:
    it = ray.train.get_dataset_shard("train")
    for batch in it.iter_torch_batches(batch_size=B, drop_last=True, local_shuffle_buffer_size=4 * B):
        batch["image"]  # float32 (B, 3, S, S); batch["input_ids"], batch["attention_mask"]: int64 (B, L)

Training rows carry no `key` (strings cannot become tensors); eval rows do, for `take_all` or
`iter_torch_batches(collate_fn=collate_with_keys)`.

Per-epoch reshuffling: the dataset re-executes each epoch; `randomize_block_order` below is
seeded with `reseed_after_execution=True`, so each epoch reads blocks in a different, seeded
order, and `local_shuffle_buffer_size` mixes rows across blocks inside each worker.
`drop_last=True` keeps every batch the same shape.
"""

from __future__ import annotations

import io
import os
import re
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from mplug.tokenizer import load_tokenizer
from pipelines import storage
from pipelines.data.shards import read_shard_rows

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(text: str) -> str:
    """A horizontal flip mirrors the scene, so 'left' and 'right' in its caption swap too."""
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
    """RandAugment(N, M) over the op set the official mPLUG pretraining uses.

    The official list leaves out the colour-changing ops (Color, Solarize, Posterize,
    Contrast): captions name colours, and an op that turns a red circle purple makes the
    pair wrong.
    """

    _AUGMENTATION_SPACE = {
        k: v for k, v in T.RandAugment._AUGMENTATION_SPACE.items() if k in OFFICIAL_RANDAUG_OPS
    }


class ImageTextTransform:
    """Ray Data `map_batches` UDF: heavy state (tokenizer, transforms) built once per worker process in
    `__init__`; `__call__(batch) -> batch` is pure and runs without Ray (unit-testable).

    Input batch (numpy format): `key`, `image` (encoded bytes), `caption`, optional `question`
    (used as the text where a row has no caption). Output: `image` float32 (B, 3, S, S),
    `input_ids` / `attention_mask` int64 (B, max_text_len), and `key` str if `include_key`.
    """

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
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.train = train
        self.swap_left_right_on_flip = swap_left_right_on_flip
        self.include_key = include_key
        self.tokenizer = load_tokenizer(tokenizer_path)
        bicubic = T.InterpolationMode.BICUBIC
        if train:
            self.geometric = T.RandomResizedCrop(
                image_size, scale=(crop_min_scale, 1.0), interpolation=bicubic
            )
            self.randaugment = OfficialRandAugment(num_ops=2, magnitude=7, interpolation=bicubic)
        else:
            self.geometric = T.Compose(
                [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
            )
            self.randaugment = None
        self.to_float = T.Compose(
            [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
        )
        # Each process draws its own random stream: seeded, but distinct per process.
        self.rng = np.random.default_rng([seed, os.getpid()])
        if train:
            torch.manual_seed(int(self.rng.integers(2**31)))

    def _image(self, data: bytes, text: str) -> tuple[torch.Tensor, str]:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        im = self.geometric(im)
        if self.train:
            if self.rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                if self.swap_left_right_on_flip:
                    text = swap_left_right(text)
            im = self.randaugment(im)
        return self.to_float(im), text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        captions = batch.get("caption", [None] * n)
        questions = batch.get("question", [None] * n)
        images, texts = [], []
        for data, caption, question in zip(batch["image"], captions, questions):
            tensor, text = self._image(bytes(data), caption or question or "")
            images.append(tensor)
            texts.append(text)
        tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_text_len, return_tensors="np"
        )
        out = {
            "image": torch.stack(images).numpy(),
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
        }
        if self.include_key:
            out["key"] = np.asarray([str(k) for k in batch["key"]], dtype=object)
        return out


def collate_with_keys(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor | list[str]]:
    """`iter_torch_batches(collate_fn=...)` for keyed rows: tensors for every numeric column and
    `key` as a list of str (Ray leaves device transfer to the caller for such mixed batches)."""
    out: dict[str, torch.Tensor | list[str]] = {k: torch.as_tensor(v) for k, v in batch.items() if k != "key"}
    if "key" in batch:
        out["key"] = [str(k) for k in batch["key"]]
    return out


@lru_cache(maxsize=4)
def _transform(**kwargs) -> ImageTextTransform:
    return ImageTextTransform(**kwargs)


def transform_batch(batch: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    """`ImageTextTransform` as a task function, built once per worker process and kept.

    Tasks, not an actor pool: the stream re-executes every epoch, and a fresh actor pool pays
    process start, imports and tokenizer load each time (seconds per epoch, all data wait),
    while Ray reuses its warm task workers and this cache across epochs.
    """
    return _transform(**kwargs)(batch)


def processed_files(data_uris: list[str]) -> list[str]:
    """Every `data/*.parquet` shard of the given ingest outputs, in a stable order."""
    if not data_uris:
        raise ValueError("data_uris is empty: pass at least one ingest OUTPUT URI")
    files: list[str] = []
    for uri in data_uris:
        found = storage.list_files(storage.join(uri, "data"), ".parquet")
        if not found:
            raise FileNotFoundError(
                f"no processed shards under {storage.join(uri, 'data')!r}: run `mplug ingest` first"
            )
        files.extend(found)
    return files


def training_dataset(
    data_uris: list[str],
    *,
    image_size: int,
    max_text_len: int,
    train: bool = True,
    seed: int = 0,
    tokenizer_path: str | None = None,
    batch_size: int = 32,
    max_actors: int | None = None,
    include_key: bool | None = None,
    crop_min_scale: float = 0.2,
):
    """A Ray Dataset of fixed-shape training (or eval) rows from ingest outputs.

    `data_uris` are ingest OUTPUT URIs (their `data/*.parquet` are read; a list mixes corpora,
    which must share one storage scheme). `batch_size` is the transform's batch, not the
    trainer's; `max_actors` caps the concurrent CPU transform tasks (default: up to 8).

    `include_key` (default: only for eval) keeps the string `key` column. `iter_torch_batches`
    cannot turn strings into tensors, so training rows leave it out; to iterate keyed rows as
    torch batches pass `collate_fn=collate_with_keys` (and move tensors to the device yourself).
    """
    import ray

    files = processed_files(data_uris)
    schemes = {f.split("://", 1)[0] if "://" in f else "" for f in files}
    if len(schemes) > 1:
        raise ValueError(f"data_uris mix storage schemes {sorted(schemes)}; copy them to one store first")
    # One item per shard file, read by tasks through the storage helper. Ray Data 2.60's
    # `read_parquet` costs 10-14 s of planning per execution here (measured: 128 rows, local),
    # paid again every epoch since the stream re-executes; a file list costs ~0.1 s.
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    if train:
        # The file order changes every epoch (seeded); the trainer's local shuffle buffer
        # mixes rows across files.
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    # Blocks of one transform batch: Ray splits the stream between Train workers only at
    # block boundaries, so whole-file blocks would hand a small corpus to a single worker.
    ds = ds.map_batches(read_shard_rows, fn_kwargs={"rows_per_block": batch_size}, batch_size=1, num_cpus=0.5)
    # Ray otherwise coalesces a task's output batches into blocks of up to 128 MiB.
    row_bytes = 3 * image_size * image_size * 4 + 2 * max_text_len * 8
    ds.context.target_max_block_size = row_bytes * batch_size
    keep_key = (not train) if include_key is None else include_key
    actors = max_actors or max(1, min(8, int(ray.cluster_resources().get("CPU", 1)) // 2))
    return ds.map_batches(
        transform_batch,
        fn_kwargs={
            "image_size": image_size,
            "max_text_len": max_text_len,
            "train": train,
            "seed": seed,
            "tokenizer_path": tokenizer_path,
            "include_key": keep_key,
            "crop_min_scale": crop_min_scale,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=actors),
        num_cpus=1,
    )
