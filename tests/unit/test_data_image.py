"""Decode/validate/resize of one image: every mode to RGB, EXIF, bomb guard, every reject reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.data.image import ImageLimits, ImageRejected, process_image
from pipelines.data.records import REJECT_REASONS

pytestmark = pytest.mark.unit

LIMITS = ImageLimits(
    resolution=48, min_size=16, max_aspect_ratio=3.0, max_pixels=1_000_000, max_bytes=500_000
)


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (80, 64), 128),
        Image.new("P", (80, 64), 3),
        Image.new("RGBA", (80, 64), (255, 0, 0, 128)),
        Image.new("CMYK", (80, 64), (0, 255, 255, 0)),
        Image.new("1", (80, 64), 1),
        Image.fromarray(np.full((64, 80), 40000, dtype=np.uint16)),  # 16-bit grey
    ],
    ids=["L", "P", "RGBA", "CMYK", "1bit", "I16"],
)
def test_every_mode_becomes_rgb_jpeg_at_resolution(image: Image.Image) -> None:
    fmt = "JPEG" if image.mode == "CMYK" else ("TIFF" if image.mode.startswith("I") else "PNG")
    out = process_image(encode(image, fmt), LIMITS)
    im = decoded(out.jpeg)
    assert im.format == "JPEG" and im.mode == "RGB"
    assert (out.width, out.height) == im.size == (60, 48)  # shorter side 64 → 48, ratio kept
    assert out.scale == pytest.approx(48 / 64)


def test_sixteen_bit_keeps_its_brightness_instead_of_clipping() -> None:
    im16 = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))  # half of full scale
    pixels = np.asarray(decoded(process_image(encode(im16, "TIFF"), LIMITS).jpeg))
    assert abs(int(pixels.mean()) - 128) <= 2


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    pixels = np.asarray(decoded(process_image(encode(clear), LIMITS).jpeg))
    assert pixels.min() >= 250


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (96, 48), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 48, 48))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = process_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95), LIMITS)
    rotated = np.asarray(decoded(out.jpeg))
    assert (out.width, out.height) == (48, 96)  # portrait after applying the orientation
    assert rotated[5, 24, 0] > 200 and rotated[90, 24, 2] > 200  # red moved to the top


def test_large_jpeg_uses_draft_and_still_hits_resolution_exactly() -> None:
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 500, 3), dtype=np.uint8))
    out = process_image(encode(im, "JPEG"), ImageLimits(resolution=96, max_pixels=10**7))
    assert min(out.width, out.height) == 96 and decoded(out.jpeg).size == (120, 96)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "missing_image"),
        (b"", "empty_image"),
        (b"\x00" * 600_000, "too_large"),  # over max_bytes
        (b"not an image at all", "decode_error"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "decode_error"),  # truncated
        (encode(Image.new("RGB", (10, 40))), "too_small"),
        (encode(Image.new("RGB", (200, 40))), "bad_aspect"),
        (encode(Image.new("L", (2000, 2000)), "PNG"), "too_large"),  # 4 Mpx > 1 Mpx guard
    ],
    ids=["none", "empty", "bytes_cap", "garbage", "truncated", "small", "aspect", "bomb"],
)
def test_rejects_carry_their_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(ImageRejected) as err:
        process_image(data, LIMITS)
    assert err.value.reason == reason and reason in REJECT_REASONS
    assert err.value.detail


def test_bomb_guard_refuses_from_the_header_without_decoding() -> None:
    # An 8000×8000 PNG of a few KB: decoding would need 64 Mpx; our guard fires from the header.
    data = encode(Image.new("1", (8000, 8000)), "PNG")
    with pytest.raises(ImageRejected, match="max_image_pixels=25000000") as err:
        process_image(data, ImageLimits(max_pixels=25_000_000))
    assert err.value.reason == "too_large"
    # Past Pillow's own limit (2 × MAX_IMAGE_PIXELS) Pillow refuses at open; still too_large.
    with pytest.raises(ImageRejected) as err:
        process_image(encode(Image.new("1", (20000, 20000)), "PNG"), ImageLimits(max_pixels=10**12))
    assert err.value.reason == "too_large"
