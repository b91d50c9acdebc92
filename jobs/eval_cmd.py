"""`mplug evaluate` (a trained model on held-out data, the task's metrics) and `mplug infer`
(captions or answers for a folder of images), both on Ray Data."""

from __future__ import annotations

import argparse
import json

from jobs.cli import add_command, check_task_keys


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.tasks import TASKS

    tasks = sorted(t for t in TASKS if t != "pretrain") + ["pretrain"]
    p = add_command(
        sub, "evaluate",
        help="score a trained model on held-out processed data with its task's metric (Ray Data)",
        examples=[
            "mplug evaluate --task snli_ve --model demo_out/runs/tune-snli_ve/TRIAL/final "
            "--data demo_out/processed/snli_ve_test --output demo_out/eval/snli_ve",
            "mplug evaluate --task pretrain --model runs/pretrain-tiny/final --data demo_out/processed/test "
            "--output eval/zero_shot",
        ],
        description="Predict with the model in Ray Data actors (a GPU each when there are GPUs), score with the "
        "task's reference metric, write OUTPUT/metrics.json, OUTPUT/predictions.parquet and, for vqa and "
        "caption, the official submission JSON (OUTPUT/submission.json).",
    )  # fmt: skip
    p.add_argument("--task", required=True, choices=tasks,
                   help="the model's task; pretrain evaluates zero-shot retrieval")  # fmt: skip
    p.add_argument(
        "--model", required=True, metavar="URI", help="a model folder: STORAGE/RUN/final (any URI)"
    )
    p.add_argument("--data", required=True, action="append", metavar="URI",
                   help="output folder of `mplug ingest`; repeat to score several")  # fmt: skip
    p.add_argument("--output", required=True, metavar="URI",
                   help="folder for metrics.json, predictions.parquet, submission.json")  # fmt: skip
    _common(p)
    p.set_defaults(func=run_evaluate)

    q = add_command(
        sub, "infer",
        help="caption images or clips or answer a question about them, over a folder/parquet/ingest output (Ray Data)",
        examples=[
            "mplug infer --task caption --model runs/caption-tiny/final --input photos/ --output captions",
            "mplug infer --task vqa --model runs/vqa-tiny/final --input photos/ --output answers "
            '--question "what colour is the circle?"',
        ],
        description="Batch inference: every image of the input through ingest's decode guards (a bad image is "
        "counted and written to OUTPUT/rejects/, never fatal), then the model; OUTPUT/predictions/*.parquet "
        "holds `key` and `prediction`, OUTPUT/stats.json the counts. A folder of video files (mp4, webm, avi, "
        "...) is answered clip by clip: video.num_frames frames of each, read as the task's video task reads "
        "them (docs/video.md).",
    )  # fmt: skip
    q.add_argument("--task", required=True, choices=[t for t in ("caption", "vqa") if t in TASKS],
                   help="caption: describe each image; vqa: answer a question about it")  # fmt: skip
    q.add_argument(
        "--model", required=True, metavar="URI", help="a model folder: STORAGE/RUN/final (any URI)"
    )
    q.add_argument("--input", required=True, metavar="URI",
                   help="a folder of images or of video files, parquet with image bytes, or an ingest output")  # fmt: skip
    q.add_argument(
        "--output", required=True, metavar="URI", help="folder for predictions/, rejects/, stats.json"
    )
    q.add_argument("--question",
                   help="vqa: the question asked of every image (default: the input's `question` column)")  # fmt: skip
    _common(q)
    q.set_defaults(func=run_infer)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per model call")
    p.add_argument("--num-actors", type=int, metavar="N", help="model actors (default: one per GPU, else 2)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per actor (default: when the cluster has GPUs)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. vqa.num_beams=3 or caption.max_length=20; repeat")  # fmt: skip


def check_inputs(model: str, data: list[str] | None = None, input_uri: str | None = None) -> None:
    """What needs no cluster, checked before Ray starts: the model folder and the data exist."""
    from pipelines import storage
    from pipelines.train.config import ConfigError

    if not storage.exists(storage.join(model, "config.json")):
        raise ConfigError(f"--model {model!r} is not a model folder (no config.json): pass STORAGE/RUN/final")
    for uri in data or []:
        if not storage.exists(storage.join(uri, "stats.json")):
            raise ConfigError(f"--data {uri!r} has no stats.json: pass an output folder of `mplug ingest`")
    if input_uri is not None and not storage.exists(input_uri):
        raise ConfigError(f"--input {input_uri!r} does not exist")


def run_evaluate(args: argparse.Namespace) -> int:
    from pipelines.eval.evaluate import evaluate_task, format_result
    from pipelines.train.config import parse_set_args

    check_inputs(args.model, data=args.data)
    overrides = parse_set_args(args.set)
    check_task_keys(list(overrides), args.task)
    result = evaluate_task(args.task, args.model, args.data, args.output, overrides=overrides,
                           batch_size=args.batch_size, num_actors=args.num_actors, use_gpu=args.use_gpu,
                           address=args.address)  # fmt: skip
    print(format_result(result))
    print(f"  outputs {args.output}/metrics.json, predictions.parquet")
    return 0


def run_infer(args: argparse.Namespace) -> int:
    from pipelines.eval.infer import run_infer as infer
    from pipelines.train.config import parse_set_args

    check_inputs(args.model, input_uri=args.input)
    overrides = parse_set_args(args.set)
    # video.* is read when the input holds clips (the task's video task answers them).
    check_task_keys([k for k in overrides if not k.startswith("video.")], args.task)
    stats = infer(args.task, args.model, args.input, args.output, question=args.question,
                  overrides=overrides, batch_size=args.batch_size, num_actors=args.num_actors,
                  use_gpu=args.use_gpu, address=args.address)  # fmt: skip
    print(json.dumps(stats, indent=1))
    return 0
