"""The shapes world in motion: short clips for the video tasks, written as real mp4 files with the
official video annotation formats (`mplug synth --format video`).

Each clip holds 1–3 shapes in distinct cells of the 3×3 grid over a still, noisy background. One
of them, the *actor*, does one thing during the clip; the others stand still:

- `move`: it slides one cell left, right, up or down, from the first frame to the last;
- `appear`: it is absent from the first half of the clip and present from the middle on;
- `turn`: it changes colour at the middle of the clip.

Captions say what happens and what stands where ("a red circle moves left, with a blue square at
the top right"); the questions of a clip come in two kinds: ones no single frame answers ("which
way does the red circle move?", "what color does the star turn?", "what shape appears?") and
ones any frame answers ("what color is the square?", about a still shape). A model that reads
one frame can answer the second kind only; the question-type prior is the figure to beat.

Written under `output_uri` (the video root is `{output_uri}/videos`):

    videos/{split}-{i:06d}.mp4        the clips (H.264, yuv420p, `fps` frames a second)
    msrvtt_{split}.jsonl              MSRVTT retrieval JSON Lines: {clip_name, caption}, a line per caption
    videoqa_{split}.jsonl             MSRVTT-QA JSON Lines: {video_id, question, answer, question_id}
    videoqa_answer_list.json          every answer: {answer: index} (MSRVTT-QA's train_ans2label.json)
    vatex_{split}.json                VATEX: [{videoID, enCap: [...]}]
    clips_{split}.json                the truth: each clip's objects, actor and event
    wds_{split}/00000.tar             with `webdataset`: {key}.mp4 + {key}.txt per clip

With `corrupt`, the train split also names broken videos (in every annotation file, listed in
`train_corrupt.json` as key → the reject reason ingest gives): random bytes (`decode_error`), an
empty file (`empty_image`), a truncated mp4 (`decode_error`) and a one-frame clip (`too_short`
when ingest's `min_video_frames` is 2 or more).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipelines import storage
from pipelines.synth import language as lang
from pipelines.synth.tasks import TASK_SIZES
from pipelines.synth.world import COLOURS, SHAPES, SPLITS, draw_shape, noisy_background, split_counts

EVENTS = ("move", "appear", "turn")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (row, column) step
QUESTION_TYPES = {  # first two words -> kind; the first three need more than one frame
    "which way": "direction",
    "what color does": "turn",
    "what shape appears": "appear",
    "what color is": "colour",
    "how many": "count",
}
_BACKGROUND_TINT = 15
_STREAM = 301  # random stream id of the clips (pipelines/synth/tasks.py uses 101-206)


@dataclass(frozen=True)
class Clip:
    key: str
    mp4: bytes
    objects: tuple[dict, ...]  # colour (at the start), shape, size, cell (at the start); actor first
    event: str
    detail: str  # move: the direction; turn: the new colour; appear: ""

    @property
    def actor(self) -> dict:
        return self.objects[0]

    def meta(self) -> dict:
        return {"objects": list(self.objects), "event": self.event, "detail": self.detail}


def encode_mp4(frames: Sequence[np.ndarray], fps: int) -> bytes:
    """(H, W, 3) uint8 frames → an mp4 (H.264 where the FFmpeg build has it, else MPEG-4 Part 2)."""
    import av

    buf = io.BytesIO()
    # Bit-exact: the same frames give the same bytes (no encoder version tag, one encoder thread),
    # so a corpus is the same whatever machine renders it.
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # crf 18: colours stay the shapes' colours. mbtree off: on frames this small x264's
            # macroblock-tree lookahead reads memory it never wrote, so the same frames gave
            # different bytes (and pixels) after other PyAV work in the process.
            stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        else:
            stream.options = {"threads": "1"}
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.thread_count = 1  # PyAV's default threads would override "threads"
        stream.codec_context.thread_type = "NONE"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _cell_box(cell: int, size: str, image_size: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(x, y, extent) of a shape jittered inside its cell."""
    side = image_size / 3
    extent = TASK_SIZES[size] * image_size
    slack = max(0.0, side - extent)
    return (cell % 3) * side + rng.uniform(0, slack), (cell // 3) * side + rng.uniform(0, slack), extent


def _neighbour(cell: int, direction: str) -> int | None:
    dr, dc = DIRECTIONS[direction]
    r, c = cell // 3 + dr, cell % 3 + dc
    return r * 3 + c if 0 <= r < 3 and 0 <= c < 3 else None


def render_clip(key: str, rng: np.random.Generator, image_size: int, num_frames: int, fps: int) -> Clip:
    """One clip from `rng`: background, still shapes, and the actor's event over `num_frames`."""
    if image_size % 2 or image_size < 32:
        raise ValueError(
            f"image_size={image_size}: an even number of pixels, at least 32 (yuv420p halves it)"
        )
    if num_frames < 4:
        raise ValueError(f"num_frames={num_frames}: an event needs at least 4 frames")
    event = EVENTS[int(rng.integers(len(EVENTS)))]
    count = int(rng.integers(1, 4))
    cells = [int(c) for c in rng.choice(9, size=count, replace=False)]
    detail = ""
    if event == "move":
        options = [
            d
            for d in DIRECTIONS
            if _neighbour(cells[0], d) is not None and _neighbour(cells[0], d) not in cells
        ]
        if not options:  # boxed in by the still shapes: it changes colour instead
            event = "turn"
        else:
            detail = options[int(rng.integers(len(options)))]
    objects, used = [], set()
    for cell in cells:
        while True:  # every shape has its own colour and shape: "the red circle" is one object
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            if colour not in {c for c, _ in used} and shape not in {s for _, s in used}:
                break
        used.add((colour, shape))
        objects.append(
            {"colour": colour, "shape": shape, "size": str(rng.choice(list(TASK_SIZES))), "cell": cell}
        )
    if event == "turn":
        taken = {o["colour"] for o in objects}
        free = [c for c in COLOURS if c not in taken]
        detail = free[int(rng.integers(len(free)))]
    boxes = [_cell_box(o["cell"], o["size"], image_size, rng) for o in objects]
    end = None
    if event == "move":
        end_cell = _neighbour(cells[0], detail)
        end = _cell_box(end_cell, objects[0]["size"], image_size, rng)
    background = noisy_background(rng, image_size, tint=_BACKGROUND_TINT)
    frames = []
    for t in range(num_frames):
        im = Image.fromarray(background, "RGB")
        draw = ImageDraw.Draw(im)
        late = t >= num_frames // 2
        for n, (o, (x, y, extent)) in enumerate(zip(objects, boxes)):
            colour = o["colour"]
            if n == 0:
                if event == "appear" and not late:
                    continue
                if event == "turn" and late:
                    colour = detail
                if end is not None:
                    f = t / (num_frames - 1)
                    x, y = x + f * (end[0] - x), y + f * (end[1] - y)
            draw_shape(draw, o["shape"], (x, y, extent, extent), COLOURS[colour])
        frames.append(np.asarray(im))
    return Clip(key, encode_mp4(frames, fps), tuple(objects), event, detail)


# ---- language ---------------------------------------------------------------------------------
def _where(o: dict) -> str:
    return lang.POSITION_PHRASES[o["cell"]][0]


def _still(objects: Sequence[dict], terse: bool) -> str:
    parts = [f"{lang.with_article(o['colour'] + ' ' + o['shape'])}" + ("" if terse else f" {_where(o)}")
             for o in objects]  # fmt: skip
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(clip: Clip) -> list[str]:
    """Two references: what the actor does, and what stands still (where, in the first)."""
    a, rest = clip.actor, list(clip.objects[1:])
    name = f"{a['colour']} {a['shape']}"
    if clip.event == "move":
        says = [f"{lang.with_article(name)} moves {clip.detail}", f"the {name} slides {clip.detail}"]
    elif clip.event == "appear":
        says = [
            f"{lang.with_article(name)} appears {_where(a)}",
            f"suddenly {lang.with_article(name)} shows up",
        ]
    else:
        says = [
            f"{lang.with_article(name)} turns {clip.detail}",
            f"the {a['shape']} changes from {a['colour']} to {clip.detail}",
        ]
    if rest:
        says = [
            says[0] + ", with " + _still(rest, terse=False),
            says[1] + " beside " + _still(rest, terse=True),
        ]
    return says


def questions(clip: Clip) -> list[tuple[str, str]]:
    """(question, answer) pairs: the event's (needs more than one frame), then still ones."""
    a = clip.actor
    out: list[tuple[str, str]] = []
    if clip.event == "move":
        out.append((f"which way does the {a['colour']} {a['shape']} move?", clip.detail))
    elif clip.event == "turn":
        out.append((f"what color does the {a['shape']} turn?", clip.detail))
    else:
        out.append(("what shape appears?", a["shape"]))
    for o in clip.objects[1:]:
        out.append((f"what color is the {o['shape']}?", o["colour"]))
    if clip.event != "appear":
        out.append(("how many shapes are there?", str(len(clip.objects))))
    return out


def question_kind(question: str) -> str:
    """'direction', 'turn', 'appear' (more than one frame needed), 'colour' or 'count'."""
    q = " ".join(question.lower().split())
    for prefix, kind in QUESTION_TYPES.items():
        if q.startswith(prefix):
            return kind
    raise ValueError(
        f"question {question!r} fits no video question template; known: {sorted(QUESTION_TYPES)}"
    )


def answer_list() -> list[str]:
    return [*COLOURS, *SHAPES, *DIRECTIONS, *(str(n) for n in range(1, 4))]


# ---- files ------------------------------------------------------------------------------------
def _corrupt(clip: Clip, rng: np.random.Generator, image_size: int, fps: int) -> dict[str, tuple[bytes, str]]:
    """Broken videos of the kinds ingest must count: kind → (bytes, expected reject reason)."""
    still = np.asarray(Image.new("RGB", (image_size, image_size), (90, 120, 150)))
    return {
        "garbage": (rng.bytes(3000), "decode_error"),
        "empty": (b"", "empty_image"),
        "truncated": (clip.mp4[: len(clip.mp4) // 2], "decode_error"),
        "one_frame": (encode_mp4([still], fps), "too_short"),
    }


def render_video_tasks(
    output_uri: str,
    num: int,
    seed: int = 0,
    image_size: int = 64,
    num_frames: int = 8,
    fps: int = 4,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    corrupt: bool = False,
    webdataset: bool = False,
) -> dict[str, dict[str, str]]:
    """Render `num` clips over the splits and write them with their annotation files (see the
    module docstring). Returns file kind ("msrvtt", "videoqa", "vatex", "clips", "webdataset")
    → split → URI, plus "video_root" and "answer_list"."""
    if num < 1:
        raise ValueError(f"num={num}: need at least one clip")
    out = output_uri.rstrip("/")
    root = storage.join(out, "videos")
    counts = split_counts(num, split_fractions)
    result: dict[str, dict[str, str]] = {k: {} for k in ("msrvtt", "videoqa", "vatex", "clips")}
    if webdataset:
        result["webdataset"] = {}
    for s, split in enumerate(SPLITS):
        clips = [
            render_clip(
                f"{split}-{i:06d}", np.random.default_rng([seed, _STREAM, s, i]), image_size, num_frames, fps
            )
            for i in range(counts[split])
        ]
        msrvtt, videoqa, vatex, truth = [], [], [], {}
        for i, clip in enumerate(clips):
            storage.write_bytes(storage.join(root, f"{clip.key}.mp4"), clip.mp4)
            refs = captions(clip)
            msrvtt += [{"clip_name": clip.key, "caption": c} for c in refs]
            vatex.append({"videoID": clip.key, "enCap": refs})
            videoqa += [{"video_id": clip.key, "question": q, "answer": a, "question_id": (s + 1) * 10_000_000 + i * 10 + j}
                        for j, (q, a) in enumerate(questions(clip))]  # fmt: skip
            truth[clip.key] = clip.meta()
        if corrupt and split == "train" and clips:
            expected = {}
            rng = np.random.default_rng([seed, _STREAM, 99])
            for kind, (data, reason) in _corrupt(clips[0], rng, image_size, fps).items():
                key = f"{split}-corrupt-{kind}"
                storage.write_bytes(storage.join(root, f"{key}.mp4"), data)
                msrvtt.append({"clip_name": key, "caption": f"a broken video {kind}"})
                vatex.append({"videoID": key, "enCap": [f"a broken video {kind}"]})
                videoqa.append({"video_id": key, "question": "how many shapes are there?", "answer": "1"})
                expected[key] = reason
            storage.write_text(storage.join(out, f"{split}_corrupt.json"), json.dumps(expected, indent=1))
        result["msrvtt"][split] = _write_lines(storage.join(out, f"msrvtt_{split}.jsonl"), msrvtt)
        result["videoqa"][split] = _write_lines(storage.join(out, f"videoqa_{split}.jsonl"), videoqa)
        result["vatex"][split] = _write(storage.join(out, f"vatex_{split}.json"), vatex)
        result["clips"][split] = _write(storage.join(out, f"clips_{split}.json"), truth)
        if webdataset:
            result["webdataset"][split] = _write_tar(storage.join(out, f"wds_{split}"), clips)
    result["answer_list"] = {"all": _write(storage.join(out, "videoqa_answer_list.json"),
                                           {a: i for i, a in enumerate(answer_list())})}  # fmt: skip
    result["video_root"] = {"all": root}
    return result


def _write(uri: str, value: object) -> str:
    storage.write_text(uri, json.dumps(value))
    return uri


def _write_lines(uri: str, entries: list[dict]) -> str:
    storage.write_text(uri, "".join(json.dumps(e) + "\n" for e in entries))
    return uri


def _write_tar(folder: str, clips: Sequence[Clip]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for clip in clips:
            for name, data in (
                (f"{clip.key}.mp4", clip.mp4),
                (f"{clip.key}.txt", captions(clip)[0].encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(storage.join(folder, "00000.tar"), buf.getvalue())
    return folder


def video_baselines(output_uri: str, split: str = "test") -> dict[str, float]:
    """Model-free figures on `split` (percent): video QA's question-type prior fitted on train
    (the most common train answer of the question's first two words) and text-to-video
    retrieval's chance R@1."""
    from collections import Counter

    from pipelines.tasks.vqa import question_type

    out = output_uri.rstrip("/")

    def lines(name: str) -> list[dict]:
        return [json.loads(line) for line in storage.read_text(storage.join(out, name)).splitlines() if line]

    train, test = lines("videoqa_train.jsonl"), lines(f"videoqa_{split}.jsonl")
    by_type: dict[str, Counter] = {}
    for e in train:
        by_type.setdefault(question_type(e["question"]), Counter())[e["answer"]] += 1
    overall = sum(by_type.values(), Counter())
    guess = [(by_type.get(question_type(e["question"])) or overall).most_common(1)[0][0] for e in test]
    clips = {e["clip_name"] for e in lines(f"msrvtt_{split}.jsonl")}
    return {
        "videoqa_prior_by_question_type": 100.0
        * sum(g == e["answer"] for g, e in zip(guess, test))
        / len(test),
        "retrieval_chance_t2v_r1": 100.0 / max(1, len(clips)),
    }
