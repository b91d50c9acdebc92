"""Video ingest throughput: clips/s and frames/s of `mplug ingest --format video`, against the
limit measured in the same run.

Clips: `--clips` H.264 mp4 files of `--seconds` at `--fps`, `--width`×`--height`, photo-like
(smooth moving gradients, shapes and noise, so they compress like camera footage). Each is
ingested as MSRVTT does (`{clip_name, caption}` JSON Lines + a video root): `--num-frames`
frames sampled uniformly, stored at `--image-size`.

Limit: a single-process loop calling the per-row function the Ray workers run
(`pipelines.data.video.process_video`: count the packets, decode up to the last sampled frame,
convert, resize and JPEG-encode the sampled ones), times `--cores`. Ray: `run_ingest` over the
same files with `num_workers` = `--cores`, its decode stage alone and the whole job. Reported:
clips/s, stored frames/s (clips × num_frames) and decoded frames/s (every frame up to the last
sampled one passes through the decoder).

    .venv/bin/python -m benchmarks.video_ingest_throughput --clips 24 --cores 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def photo_like_clip(rng: np.random.Generator, width: int, height: int, frames: int, fps: int) -> bytes:
    from pipelines.synth.video import encode_mp4

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    out = []
    for t in range(frames):
        phase = 2 * np.pi * t / max(1, frames)
        r = base[0] + 60 * np.sin(x / width * 3 + phase)
        g = base[1] + 60 * np.cos(y / height * 2 - phase)
        b = base[2] + 40 * np.sin((x + y) / (width + height) * 4 + 2 * phase)
        pixels = np.stack([r, g, b], -1) + rng.normal(0, 6, size=(height, width, 3))
        cx, cy = int(width * (0.2 + 0.6 * t / max(1, frames - 1))), height // 2
        pixels[max(0, cy - 20) : cy + 20, max(0, cx - 20) : cx + 20] = (230, 40, 40)
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return encode_mp4(out, fps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled and stored per clip")
    p.add_argument("--image-size", type=int, default=224, help="shorter side of the stored frames")
    p.add_argument("--cores", type=int, default=2, help="Ray workers, and the limit's multiplier")
    args = p.parse_args()

    from pipelines.data.ingest import IngestConfig, run_ingest
    from pipelines.data.video import process_video

    work = tempfile.mkdtemp(prefix="video-ingest-bench-")
    try:
        rng = np.random.default_rng(0)
        frames = int(args.seconds * args.fps)
        os.makedirs(os.path.join(work, "videos"))
        clips = []
        for i in range(args.clips):
            data = photo_like_clip(rng, args.width, args.height, frames, args.fps)
            clips.append(data)
            with open(os.path.join(work, "videos", f"clip{i:05d}.mp4"), "wb") as f:
                f.write(data)
        with open(os.path.join(work, "clips.jsonl"), "w") as f:
            for i in range(args.clips):
                f.write(
                    json.dumps({"clip_name": f"clip{i:05d}", "caption": f"a red square crosses clip {i}"})
                    + "\n"
                )
        cfg = IngestConfig(input=os.path.join(work, "clips.jsonl"), format="video", output=os.path.join(work, "out"),
                           video_root=os.path.join(work, "videos"), num_frames=args.num_frames,
                           image_size=args.image_size, num_workers=args.cores, rows_per_unit=max(1, args.clips // (2 * args.cores)))  # fmt: skip
        limits = cfg.video_limits()
        started = time.perf_counter()
        decoded = 0
        for data in clips:
            clip = process_video(data, limits)
            decoded += clip.indices[-1] + 1
        one = time.perf_counter() - started
        stats = run_ingest(cfg)
        mib = sum(len(c) for c in clips) / 2**20
        print(f"{args.clips} clips of {frames} frames ({args.seconds:g} s at {args.fps} fps), {args.width}x{args.height} "
              f"H.264, {mib / args.clips:.2f} MiB each; {args.num_frames} frames sampled (uniform), stored at "
              f"{args.image_size} px; {args.cores} cores")  # fmt: skip
        print("| what | clips/s | stored frames/s | decoded frames/s |")
        print("|---|---:|---:|---:|")
        for name, seconds in (
            (f"limit: 1 process x {args.cores}", one / args.cores),
            ("Ray decode stage", stats["decode_stage_s"]),
            ("Ray whole job", stats["elapsed_s"]),
        ):
            print(f"| {name} | {args.clips / seconds:.2f} | {args.clips * args.num_frames / seconds:.1f} | "
                  f"{decoded / seconds:.0f} |")  # fmt: skip
        assert stats["written"] == args.clips, stats
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
