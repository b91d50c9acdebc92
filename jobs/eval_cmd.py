"""`mplug evaluate` (a trained model on held-out data, the task's metrics) and `mplug infer`
(captions or answers for a folder of images), both on Ray Data."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.tasks import TASKS

    tasks = sorted(t for t in TASKS if t != "pretrain") + ["pretrain"]
    p = sub.add_parser(
        "evaluate",
        help="score a trained model on held-out processed data with its task's metric (Ray Data)",
        description="Predict with the model in Ray Data actors (a GPU each when there are GPUs), score with the "
        "task's reference metric, write OUTPUT/metrics.json, OUTPUT/predictions.parquet and, for vqa and "
        "caption, the official submission JSON (OUTPUT/submission.json).",
    )
    p.add_argument("--task", required=True, choices=tasks, help="pretrain evaluates zero-shot retrieval")
    p.add_argument("--model", required=True, help="a model folder: STORAGE/RUN/final (any URI)")
    p.add_argument("--data", required=True, action="append", help="output URI of `mplug ingest` (repeatable)")
    p.add_argument(
        "--output", required=True, help="URI for metrics.json, predictions.parquet, submission.json"
    )
    _common(p)
    p.set_defaults(func=run_evaluate)

    q = sub.add_parser(
        "infer",
        help="caption images or answer a question about them, over a folder/parquet/ingest output (Ray Data)",
        description="Batch inference: every image of the input through ingest's decode guards (a bad image is "
        "counted and written to OUTPUT/rejects/, never fatal), then the model; OUTPUT/predictions/*.parquet "
        "holds `key` and `prediction`, OUTPUT/stats.json the counts.",
    )
    q.add_argument("--task", required=True, choices=[t for t in ("caption", "vqa") if t in TASKS])
    q.add_argument("--model", required=True, help="a model folder: STORAGE/RUN/final (any URI)")
    q.add_argument(
        "--input", required=True, help="a folder of images, parquet with image bytes, or an ingest output"
    )
    q.add_argument("--output", required=True, help="URI for predictions/, rejects/, stats.json")
    q.add_argument(
        "--question", help="vqa: the question asked of every image (else the input's `question` column)"
    )
    _common(q)
    q.set_defaults(func=run_infer)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS, else a local instance")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-actors", type=int, help="model actors (default: one per GPU, else 2)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per actor (default: when the cluster has GPUs)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. vqa.num_beams=3 or caption.max_length=20")  # fmt: skip


def run_evaluate(args: argparse.Namespace) -> int:
    from pipelines.eval.evaluate import evaluate_task, format_result
    from pipelines.train.config import parse_set_args

    result = evaluate_task(args.task, args.model, args.data, args.output, overrides=parse_set_args(args.set),
                           batch_size=args.batch_size, num_actors=args.num_actors, use_gpu=args.use_gpu,
                           address=args.address)  # fmt: skip
    print(format_result(result))
    print(f"  outputs {args.output}/metrics.json, predictions.parquet")
    return 0


def run_infer(args: argparse.Namespace) -> int:
    from pipelines.eval.infer import run_infer as infer
    from pipelines.train.config import parse_set_args

    stats = infer(args.task, args.model, args.input, args.output, question=args.question,
                  overrides=parse_set_args(args.set), batch_size=args.batch_size, num_actors=args.num_actors,
                  use_gpu=args.use_gpu, address=args.address)  # fmt: skip
    print(json.dumps(stats, indent=1))
    return 0
