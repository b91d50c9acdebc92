"""Videos as ingest reads them: frame sampling, decoding, and the video annotation formats.

A video becomes a row with `frames`: `num_frames` frames sampled from the whole clip as the
official mPLUG video scripts name the strategies, each resized like an image (shorter side
`image_size`) and stored as JPEG, in time order; `image` holds the middle one, so an image task
can read the row too. Decoding is PyAV's (FFmpeg). Memory stays bounded by the limits, whatever
the clip: its bytes are refused past `max_video_bytes` before they are read whole, and only the
sampled frames are converted and kept (the frames between them pass through the decoder, which
inter-frame codecs need, and are dropped at once).

Pure Python + PyAV + Pillow, no Ray: the unit tests and the ingest benchmark call the function
the Ray workers run.

Annotation formats (`--format video` with `--video-root`), recognised by their keys:

| format | an entry | one row per |
|---|---|---|
| msrvtt | `{clip_name, caption: ".." or [..]}` (MSRVTT retrieval JSON Lines, as released) | caption |
| video_qa | `{video_id, question, answer}` (MSRVTT-QA, MSVD-QA JSON Lines) | entry |
| vatex | `{videoID, enCap: [..]}` (VATEX) | caption |

A video name without a suffix (`video7010`) is looked up as `.mp4`, then the other `VIDEO_SUFFIXES`.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.data import formats
from pipelines.data.image import ImageLimits, ImageRejected

FRAME_SAMPLING = ("uniform", "rand", "headtail")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
WDS_VIDEO_EXTS = tuple(s.lstrip(".") for s in VIDEO_SUFFIXES)
VIDEO_FORMATS: dict[str, str] = {
    "msrvtt": "{clip_name, caption: '..' | [..]}",
    "video_qa": "{video_id, question, answer}",
    "vatex": "{videoID, enCap: [..]}",
}


# ---- which frames -------------------------------------------------------------------------------
def frame_indices(length: int, num: int, strategy: str, rng: np.random.Generator | None = None) -> list[int]:
    """`num` frame indices of a `length`-frame clip, in time order, as the official scripts sample:

    uniform: the first frame of each of `num` equal spans (evaluation); rand: `num` distinct
    frames drawn at random (training); headtail: half from the first half of the clip, half from
    the second. A clip shorter than `num` frames repeats frames (uniform) or draws with
    replacement, where the official code would fail."""
    if strategy not in FRAME_SAMPLING:
        raise ValueError(f"frame sampling {strategy!r}: valid strategies are {FRAME_SAMPLING}")
    if length < 1 or num < 1:
        raise ValueError(
            f"need a clip of >= 1 frame and >= 1 frame to sample, got length={length}, num={num}"
        )
    if strategy == "uniform":
        return [i * length // num for i in range(num)]
    rng = rng if rng is not None else np.random.default_rng(0)

    def draw(low: int, high: int, count: int) -> list[int]:
        span = max(1, high - low)
        picked = rng.choice(span, size=count, replace=count > span) + low
        return sorted(int(i) for i in picked)

    if strategy == "rand":
        return draw(0, length, num)
    half = max(1, length // 2)
    head = num // 2
    return draw(0, half, head) + draw(min(half, length - 1), length, num - head)


# ---- decoding -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoLimits:
    """What an acceptable video looks like and what it becomes: `image` says how each frame is
    checked and stored (its `max_bytes` bounds the video file)."""

    image: ImageLimits
    num_frames: int = 8
    sampling: str = "uniform"
    min_frames: int = 1

    def __post_init__(self) -> None:
        if self.sampling not in FRAME_SAMPLING:
            raise ValueError(f"frame_sampling={self.sampling!r}: valid strategies are {FRAME_SAMPLING}")
        if self.num_frames < 1 or self.min_frames < 1:
            raise ValueError(
                f"num_frames={self.num_frames} and min_video_frames={self.min_frames} must be >= 1"
            )


@dataclass(frozen=True)
class ProcessedVideo:
    frames: tuple[bytes, ...]  # JPEG, shorter side = the limits' resolution, in time order
    indices: tuple[int, ...]  # which frames of the clip
    length: int  # frames in the clip
    width: int  # stored frame size
    height: int
    orig_width: int
    orig_height: int

    @property
    def poster(self) -> bytes:
        """The middle sampled frame: the row's `image`."""
        return self.frames[len(self.frames) // 2]


def _seed(data: bytes) -> int:
    """rand/headtail draw from the video's own bytes: a re-run of an ingest samples the same frames."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} frames > max_image_pixels={limits.max_pixels}")
    if width == 0 or height == 0:
        raise ImageRejected("empty_image", f"{width}x{height} frames")
    short, long_ = min(width, height), max(width, height)
    if short < limits.min_size:
        raise ImageRejected(
            "too_small", f"{width}x{height} frames, shorter side < min_image_size={limits.min_size}"
        )
    if long_ / short > limits.max_aspect_ratio:
        raise ImageRejected(
            "bad_aspect",
            f"{width}x{height} frames, ratio {long_ / short:.2f} > max_aspect_ratio={limits.max_aspect_ratio}",
        )


def _stored(frame, limits: ImageLimits) -> Image.Image:
    im = frame.to_image()  # RGB
    w, h = im.size
    scale = limits.resolution / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im if size == (w, h) else im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _jpeg(im: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _open(data: bytes):
    import av

    container = av.open(io.BytesIO(data), mode="r")
    if not container.streams.video:
        container.close()
        raise ImageRejected("decode_error", "no video stream in the file")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-parallel decoding where the codec allows
    return container, stream


def _count_frames(data: bytes) -> int:
    """Frames in the clip, from its packets (demuxed, not decoded: cheap)."""
    container, stream = _open(data)
    with container:
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode(
    data: bytes, wanted: list[int], limits: ImageLimits
) -> tuple[dict[int, bytes], int, tuple[int, int]]:
    """({frame index: stored JPEG} of the `wanted` frames, frames decoded, source (width, height)).
    Stops after the last wanted frame."""
    kept: dict[int, bytes] = {}
    want = set(wanted)
    last = max(wanted)
    size = (0, 0)
    decoded = 0
    container, stream = _open(data)
    with container:
        for n, frame in enumerate(container.decode(stream)):
            decoded = n + 1
            if n == 0:
                size = (frame.width, frame.height)
                _check_size(frame.width, frame.height, limits)
            if n in want:
                kept[n] = _jpeg(_stored(frame, limits), limits.jpeg_quality)
            if n >= last:
                break
    return kept, decoded, size


def process_video(data: bytes | None, limits: VideoLimits) -> ProcessedVideo:
    """Encoded video bytes → its sampled frames as stored JPEGs, or raise ImageRejected with a
    reason from records.REJECT_REASONS: missing_image, empty_image (no bytes or no frame),
    too_large, decode_error (not a video, corrupt, truncated), too_short (fewer decodable frames
    than `min_frames`), too_small, bad_aspect."""
    import av

    if data is None:
        raise ImageRejected("missing_image", "no video bytes")
    if len(data) == 0:
        raise ImageRejected("empty_image", "0 bytes")
    if len(data) > limits.image.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > max_video_bytes={limits.image.max_bytes}")
    rng = np.random.default_rng(_seed(data))
    try:
        length = _count_frames(data)
        if length == 0:
            raise ImageRejected("empty_image", "the video stream holds no frame")
        if length < limits.min_frames:
            raise ImageRejected("too_short", f"{length} frames < min_video_frames={limits.min_frames}")
        wanted = frame_indices(length, limits.num_frames, limits.sampling, rng)
        kept, decoded, size = _decode(data, wanted, limits.image)
        if len(kept) < len(set(wanted)):
            # Fewer frames decode than the packets promised (a damaged stream): sample again
            # over the frames that do decode.
            if decoded < limits.min_frames or decoded == 0:
                raise ImageRejected(
                    "too_short" if decoded else "decode_error",
                    f"{decoded} of {length} frames decode (min_video_frames={limits.min_frames})",
                )
            length = decoded
            wanted = frame_indices(length, limits.num_frames, limits.sampling, rng)
            kept, _, size = _decode(data, wanted, limits.image)
    except ImageRejected:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError) as err:
        raise ImageRejected("decode_error", f"{type(err).__name__}: {err}"[:2000]) from err
    first = Image.open(io.BytesIO(kept[wanted[0]]))
    return ProcessedVideo(
        frames=tuple(kept[i] for i in wanted), indices=tuple(wanted), length=length,
        width=first.width, height=first.height, orig_width=size[0], orig_height=size[1],
    )  # fmt: skip


# ---- annotation formats -------------------------------------------------------------------------
def detect(entry: object) -> str | None:
    """The video annotation format of an entry, from its keys; None if it fits none."""
    if not isinstance(entry, dict):
        return None
    if "clip_name" in entry and "caption" in entry:
        return "msrvtt"
    if "video_id" in entry and "question" in entry:
        return "video_qa"
    if "videoID" in entry and "enCap" in entry:
        return "vatex"
    return None


def describe_mismatch(entry: object) -> str:
    keys = sorted(entry) if isinstance(entry, dict) else f"a {type(entry).__name__}, not an object"
    valid = "; ".join(f"{name} {shape}" for name, shape in VIDEO_FORMATS.items())
    return f"fits no video annotation format (keys: {keys}); valid formats: {valid}"


def check_first_entry(entry: object, file_uri: str) -> None:
    """Refuse a file up front when its first entry fits no video format (a wrong file)."""
    if detect(entry) is None:
        raise ValueError(f"{file_uri}: the first annotation entry {describe_mismatch(entry)}")


def video_refs(video_root: str, name: str, allow_outside_root: bool = False) -> list[str]:
    """Candidate URIs of a video named in an annotation (the first that exists is read): the name
    as given when it has a video suffix, else with each of VIDEO_SUFFIXES. Raises
    formats.PathOutsideRoot as image paths do."""
    if posixpath.splitext(name)[1].lower() in VIDEO_SUFFIXES:
        return formats._image_refs(video_root, name, allow_outside_root=allow_outside_root)
    return [
        uri
        for suffix in VIDEO_SUFFIXES
        for uri in formats._image_refs(video_root, name + suffix, allow_outside_root=allow_outside_root)
    ]


def _reject(key: str, detail: str) -> list[dict]:
    return [{"key": key, "_reject": ("bad_record", detail[:2000])}]


def entry_rows(
    entry: object, fallback_key: str, video_root: str, allow_outside_root: bool = False
) -> list[dict]:
    """Raw records (no video bytes yet: `_image_refs` lists the candidate URIs of the row's video)
    for one annotation entry, or one reject (`bad_record`, `path_outside_root`)."""
    fmt = detect(entry)
    if fmt is None:
        return _reject(fallback_key, f"annotation entry {describe_mismatch(entry)}")
    assert isinstance(entry, dict)
    name_field = {"msrvtt": "clip_name", "video_qa": "video_id", "vatex": "videoID"}[fmt]
    name = entry[name_field]
    key = formats._first_id(entry, "key", "question_id") or fallback_key
    if fmt == "vatex":
        key = formats._first_id(entry, "key") or str(name)
    if not isinstance(name, str) or not name:
        return _reject(key, f"'{name_field}' must name a video, got {name!r}"[:300])
    try:
        refs = [video_refs(video_root, name, allow_outside_root)]
    except formats.PathOutsideRoot as err:
        return [{"key": key, "_reject": ("path_outside_root", str(err)[:2000])}]
    base = {
        "caption": None, "question": None, "answers": None, "answer_weights": None, "raw_answers": None,
        "dataset": None, "bbox": None, "label": None, "url": None, "image_id": name, "_image_refs": refs,
    }  # fmt: skip
    if fmt == "video_qa":
        question, answer = entry["question"], entry.get("answer")
        if not isinstance(question, str):
            return _reject(key, f"'question' must be text, got {question!r}"[:300])
        if answer is not None and not isinstance(answer, str | int | float):
            return _reject(key, f"'answer' must be text, got {answer!r}"[:300])
        answers = None if answer is None else [str(answer)]
        return [{**base, "key": key, "question": question, "raw_answers": answers, "answers": answers,
                 "answer_weights": None if answers is None else [1.0]}]  # fmt: skip
    field = "caption" if fmt == "msrvtt" else "enCap"
    texts = formats._texts(entry[field], f"'{field}'")
    if isinstance(texts, str):
        return _reject(key, texts)
    several = isinstance(entry[field], list)
    return [
        {**base, "key": f"{key}#{i}" if several else key, "caption": text} for i, text in enumerate(texts)
    ]
