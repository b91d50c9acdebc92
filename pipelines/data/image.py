"""Decode, validate, normalise and resize one encoded image: the per-row work of ingest.

Pure Python + Pillow, no Ray, so the benchmark's single-process limit and the unit tests call the
exact function the Ray workers run.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class ImageLimits:
    """What an acceptable image looks like and what it becomes."""

    resolution: int = 256  # shorter side after resizing
    min_size: int = 32  # shorter side before resizing
    max_aspect_ratio: float = 3.0
    max_pixels: int = 25_000_000  # decompression-bomb guard, checked from the header before decoding
    max_bytes: int = 20_000_000
    jpeg_quality: int = 95


@dataclass(frozen=True)
class ProcessedImage:
    jpeg: bytes
    width: int
    height: int
    scale: float  # resized / original, for carrying boxes through
    orig_width: int  # the source image's size, EXIF orientation applied
    orig_height: int


class ImageRejected(Exception):
    """Raised with a reason from records.REJECT_REASONS and a human-readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _to_rgb(im: Image.Image) -> Image.Image:
    """Every PIL mode to 8-bit RGB; transparency is composited on white (a black background would
    turn transparent logos into black squares)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # convert("L") clips 16-bit values at 255; scale the full range down instead.
        arr = np.asarray(im, dtype=np.uint16) >> 8
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def process_image(data: bytes | None, limits: ImageLimits) -> ProcessedImage:
    """Encoded bytes → RGB JPEG with shorter side `limits.resolution`, or raise ImageRejected."""
    if data is None:
        raise ImageRejected("missing_image", "no image bytes")
    if len(data) == 0:
        raise ImageRejected("empty_image", "0 bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > max_image_bytes={limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        width, height = im.size
        # Header-only check: refuse before any pixel is decoded.
        if width * height > limits.max_pixels:
            raise ImageRejected("too_large", f"{width}x{height} > max_image_pixels={limits.max_pixels}")
        if width == 0 or height == 0:
            raise ImageRejected("empty_image", f"{width}x{height}")
        short, long_ = min(width, height), max(width, height)
        if short < limits.min_size:
            raise ImageRejected(
                "too_small", f"{width}x{height}, shorter side < min_image_size={limits.min_size}"
            )
        if long_ / short > limits.max_aspect_ratio:
            raise ImageRejected(
                "bad_aspect",
                f"{width}x{height}, ratio {long_ / short:.2f} > max_aspect_ratio={limits.max_aspect_ratio}",
            )
        # EXIF orientations 5-8 rotate by 90°: the upright image has width and height swapped.
        rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)
        orig_width, orig_height = (height, width) if rotated else (width, height)
        scale = limits.resolution / short
        if im.format == "JPEG" and scale < 1:
            # DCT-domain downscaling: decode at ≥ the target size, several times faster.
            im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_large", str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as err:
        raise ImageRejected("decode_error", f"{type(err).__name__}: {err}") from err
    w, h = im.size
    scale = limits.resolution / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=limits.jpeg_quality)
    return ProcessedImage(
        jpeg=out.getvalue(),
        width=size[0],
        height=size[1],
        scale=limits.resolution / short,
        orig_width=orig_width,
        orig_height=orig_height,
    )
