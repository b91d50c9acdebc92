"""Row transforms of the video tasks: a row's stored `frames` (`mplug ingest --format video`) ->
a (T, 3, S, S) clip in the row's `image` column, the rest as the image task's transform makes it.

Each video transform is its image task's transform (`VQATransform`, `CaptionTransform`,
`RetrievalTransform`) with the frames in place of the image: `VideoFrames` picks `num_frames` of
the stored frames (uniformly in evaluation, by `frame_sampling` in training: the official
scripts train on `rand`) and augments them all alike, one crop, one flip and one RandAugment
draw per clip. A flip mirrors the motion too, so "left" and "right" swap in the row's text, as
for an image.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from pipelines.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    CaptionTransform,
    OfficialRandAugment,
    RetrievalTransform,
    VQATransform,
    decode_rgb,
    process_rng,
)
from pipelines.data.video import frame_indices


class VideoAugment:
    """Stored JPEG frames -> a normalised (T, 3, S, S) float clip, and whether it was flipped.

    train: `num_frames` frames by `sampling`, then RandomResizedCrop(crop_min_scale..1, bicubic),
    flip (p 0.5) and RandAugment(2, 7) (bilinear), each drawn once for the whole clip; eval: `num_frames`
    frames uniformly, resized to S×S (the official video evaluation resizes to a square).
    """

    def __init__(self, image_size: int, train: bool, crop_min_scale: float, num_frames: int,
                 sampling: str, rng: np.random.Generator | None = None) -> None:  # fmt: skip
        if num_frames < 1:
            raise ValueError(f"video.num_frames={num_frames} must be >= 1")
        bicubic = T.InterpolationMode.BICUBIC
        self.train, self.num_frames = train, num_frames
        self.sampling = sampling if train else "uniform"
        frame_indices(1, 1, self.sampling)  # an unknown strategy fails here, not at the first row
        self.rng = rng if rng is not None else np.random.default_rng(0)
        if train:
            self.geometric = T.RandomResizedCrop(
                image_size, scale=(crop_min_scale, 1.0), interpolation=bicubic
            )
            # Bilinear: torchvision's affine ops (shear, translate, rotate) take no bicubic on tensors.
            bilinear = T.InterpolationMode.BILINEAR
            self.randaugment = OfficialRandAugment(num_ops=2, magnitude=7, interpolation=bilinear)
        else:
            self.geometric = T.Resize((image_size, image_size), interpolation=bicubic)
            self.randaugment = None
        self.to_float = T.Compose(
            [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
        )

    def reseed(self, seed: int | None) -> None:
        if seed is not None and self.train:
            self.rng = np.random.default_rng(int(seed))
            torch.manual_seed(int(seed))

    def __call__(self, frames: list[bytes], flip: bool | None = None) -> tuple[torch.Tensor, bool]:
        picked = frame_indices(len(frames), self.num_frames, self.sampling, self.rng)
        decoded = {i: TF.pil_to_tensor(decode_rgb(frames[i])) for i in set(picked)}
        clip = tv_tensors.Video(torch.stack([decoded[i] for i in picked]))  # (T, 3, H, W) uint8
        clip = self.geometric(clip)  # one crop for every frame
        flipped = False
        if self.train:
            flipped = bool(self.rng.random() < 0.5) if flip is None else flip
            if flipped:
                clip = TF.horizontal_flip(clip)
            clip = self.randaugment(clip)
        return self.to_float(clip).as_subclass(torch.Tensor), flipped


class VideoFrames:
    """Mixin before an `AugmentedRowTransform`: the row's `frames` take the place of its image."""

    def _video(self, image_size: int, train: bool, seed: int, crop_min_scale: float, num_frames: int,
               frame_sampling: str) -> None:  # fmt: skip
        self.video = VideoAugment(image_size, train, crop_min_scale, num_frames, frame_sampling,
                                  process_rng(seed) if train else None)  # fmt: skip

    def reseed(self, seed: int) -> None:
        self.video.reseed(seed)

    def image(self, data, flip: bool | None = None) -> tuple[torch.Tensor, bool]:
        return self.video(list(data), flip)

    def row(self, row: dict) -> dict:
        frames = row.get("frames")
        if frames is None or len(frames) == 0:
            raise ValueError(
                f"row {row.get('key')!r} has no `frames`: the video tasks read the output of "
                "`mplug ingest --format video`"
            )
        return super().row({**row, "image": frames})  # type: ignore[misc]


class VideoRetrievalTransform(VideoFrames, RetrievalTransform):
    """`RetrievalTransform`'s rows, `image` a clip (B, T, 3, S, S)."""

    def __init__(self, num_frames: int, frame_sampling: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._video(kwargs["image_size"], self.train, kwargs.get("seed", 0), kwargs.get("crop_min_scale", 0.5),
                    num_frames, frame_sampling)  # fmt: skip


class VideoQATransform(VideoFrames, VQATransform):
    """`VQATransform`'s rows, `image` a clip (B, T, 3, S, S)."""

    def __init__(self, num_frames: int, frame_sampling: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._video(kwargs["image_size"], self.train, kwargs.get("seed", 0), kwargs.get("crop_min_scale", 0.5),
                    num_frames, frame_sampling)  # fmt: skip


class VideoCaptionTransform(VideoFrames, CaptionTransform):
    """`CaptionTransform`'s rows, `image` a clip (B, T, 3, S, S)."""

    def __init__(self, num_frames: int, frame_sampling: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._video(kwargs["image_size"], self.train, kwargs.get("seed", 0), kwargs.get("crop_min_scale", 0.5),
                    num_frames, frame_sampling)  # fmt: skip
