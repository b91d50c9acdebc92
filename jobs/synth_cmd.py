"""`mplug synth`: render the synthetic shapes-world corpus in any ingest input format, or the
finetuning tasks' annotation files (`--tasks`)."""

from __future__ import annotations

import argparse

from jobs.cli import add_command
from pipelines.train.config import ConfigError

TASK_NAMES = ("vqa", "caption", "retrieval", "grounding", "nlvr2", "snli_ve")  # = synth_tasks.TASKS


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "synth",
        help="render the synthetic shapes-world corpus (train/val/test) in any ingest input format",
        examples=[
            "mplug synth --output demo_out/raw --num 3000",
            "mplug synth --output demo_out/raw_tasks --num 500 --format json --tasks vqa,snli_ve --baselines",
            "mplug synth --output demo_out/raw_video --num 200 --format video --image-size 64 --baselines",
        ],
        description="Scenes of coloured shapes, deterministic by seed. Without --tasks: a caption corpus "
        "(1-3 shapes, rich captions) written as img2dataset parquet or webdataset shards, ALBEF JSON "
        "annotations or URL lists. With --tasks (needs --format json): JPEG images plus the official "
        "annotation files of each finetuning task: vqa_{split}.json, dataset_coco.json + caption_{split}.json, "
        "retrieval_{split}.json, grounding_{split}.json, nlvr2_{split}.json, snli_ve_{split}.json, and "
        "scenes_{split}.json (each image's objects); OUTPUT is their image root. --format video: the shapes world "
        "in motion (shapes that move, appear or change colour) as mp4 clips under OUTPUT/videos (the video root) "
        "with MSRVTT (msrvtt_{split}.jsonl), MSRVTT-QA (videoqa_{split}.jsonl, videoqa_answer_list.json) and "
        "VATEX (vatex_{split}.json) annotations (docs/video.md).",
    )  # fmt: skip
    p.add_argument(
        "--output", required=True, metavar="URI", help="output URI (s3://, gs://, file:// or a path)"
    )
    p.add_argument(
        "--num",
        type=int,
        required=True,
        help="number of scenes over all splits (per task image pool with --tasks)",
    )
    p.add_argument("--format", default="parquet", choices=["parquet", "webdataset", "json", "urls", "video"],
                   help="the ingest input format written (json: ALBEF-style annotations + images; video: "
                   "mp4 clips + the video tasks' annotations)")  # fmt: skip
    p.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="comma-separated finetuning tasks to write annotations for (with --format json): "
        f"{','.join(TASK_NAMES)} (default: none, the caption corpus)",
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="with --tasks: also print each task's model-free baselines on the test split (the figures to beat)",
    )
    p.add_argument("--seed", type=int, default=0, help="scenes, captions and splits follow from it")
    p.add_argument("--image-size", type=int, default=96, help="square image side in pixels")
    p.add_argument("--frames", type=int, default=8, help="video: frames per clip")
    p.add_argument("--fps", type=int, default=4, help="video: frames per second of the mp4 files")
    p.add_argument("--webdataset", action="store_true",
                   help="video: also write each split's clips as a webdataset tar (wds_{split}/)")  # fmt: skip
    p.add_argument(
        "--corrupt-per-kind", type=int, default=0,
        help="bad records of each kind added to the train split (video: 1 or more adds one broken video of each kind)",
    )  # fmt: skip
    p.add_argument(
        "--split-fractions",
        default="0.8,0.1,0.1",
        metavar="TRAIN,VAL,TEST",
        help="fractions of the scenes per split",
    )
    p.add_argument("--url-base", metavar="URL",
                   help="urls format: the HTTP address that will serve OUTPUT (required with --format urls)")  # fmt: skip
    p.set_defaults(func=run)


def _tasks(value: str, fmt: str, corrupt_per_kind: int) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown or not tasks:
        raise ConfigError(f"--tasks {value!r}: unknown {unknown}; valid tasks: {','.join(TASK_NAMES)}")
    if fmt != "json":
        raise ConfigError(
            f"--tasks writes the tasks' official JSON annotation files: use --format json, not {fmt}"
        )
    if corrupt_per_kind:
        raise ConfigError("--corrupt-per-kind applies to the caption corpus, not to --tasks")
    return tasks


def _refuse_baselines_without_tasks(args: argparse.Namespace) -> None:
    if args.baselines and args.tasks is None and args.format != "video":
        raise ConfigError("--baselines reports the finetuning tasks' baselines: add --tasks")


def run(args: argparse.Namespace) -> int:
    _refuse_baselines_without_tasks(args)
    if args.format == "urls" and not args.url_base:
        raise ConfigError("--format urls needs --url-base URL: the HTTP address that will serve --output")
    try:
        fractions = tuple(float(x) for x in args.split_fractions.split(","))
    except ValueError:
        raise ConfigError(
            f"--split-fractions {args.split_fractions!r}: expected three numbers like 0.8,0.1,0.1"
        ) from None
    if args.format == "video":
        return _video(args, fractions)
    if args.tasks is not None:
        from pipelines.synth.tasks import render_task_annotations

        tasks = _tasks(args.tasks, args.format, args.corrupt_per_kind)
        files = render_task_annotations(
            args.output, args.num, seed=args.seed, image_size=args.image_size, tasks=tasks,
            split_fractions=fractions,  # type: ignore[arg-type]
        )  # fmt: skip
        for task, splits in files.items():
            uris = sorted(set(splits.values()))
            print(f"{task}: {uris[0] if len(uris) == 1 else ' '.join(uris)}")
        print(f"image root: {args.output}")
        if args.baselines:
            from pipelines.synth.tasks import task_baselines

            print("test-split baselines (percent; CIDEr-D on its 0-10 scale):")
            for task, figures in task_baselines(args.output, tasks).items():
                print(f"  {task}: " + ", ".join(f"{name} {value:.2f}" for name, value in figures.items()))
        return 0

    from pipelines.synth.world import render_corpus

    splits = render_corpus(
        args.output,
        args.num,
        fmt=args.format,
        seed=args.seed,
        image_size=args.image_size,
        corrupt_per_kind=args.corrupt_per_kind,
        split_fractions=fractions,  # type: ignore[arg-type]
        url_base=args.url_base,
    )
    for split, uri in splits.items():
        print(f"{split}: {uri}")
    if args.format == "json":
        print(f"image root: {args.output}  (task annotations: mplug synth --tasks ...)")
    return 0


def _video(args: argparse.Namespace, fractions: tuple[float, ...]) -> int:
    from pipelines.synth.video import render_video_tasks, video_baselines

    if args.tasks is not None:
        raise ConfigError(
            "--tasks writes image tasks' annotations; --format video writes the video tasks' own"
        )
    files = render_video_tasks(
        args.output, args.num, seed=args.seed, image_size=args.image_size, num_frames=args.frames, fps=args.fps,
        split_fractions=fractions, corrupt=args.corrupt_per_kind > 0, webdataset=args.webdataset,  # type: ignore[arg-type]
    )  # fmt: skip
    for kind, splits in files.items():
        print(f"{kind}: {' '.join(sorted(set(splits.values())))}")
    if args.baselines:
        print("test-split baselines (percent):")
        for name, value in video_baselines(args.output).items():
            print(f"  {name} {value:.2f}")
    return 0
