"""`mplug demo`: the whole pipeline at small size, on a local Ray instance.

synthetic shapes world → Ray Data ingest → 2-worker Ray Train pretraining of mPLUG-tiny →
zero-shot retrieval beside chance → Ray Tune search over a finetuning task (ASHA, two trials at a
time) → `mplug evaluate` of the best trial on held-out data beside the task's baseline.

Sized for 2 CPU cores. A trial's cold start (its Tune actor, Train controller and worker each a
new process importing torch, the Train worker group, the first evaluation) took ~45-57 s beside
~100 s of training and evaluation; trials are CPU-bound, so 4 at a time took as long as 2 at a
time (309 s vs 262 s for 4 trials): the default search is 2 trials at once (141 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from jobs.cli import add_command

DEMO_TASKS = ("snli_ve", "vqa", "nlvr2", "retrieval", "grounding", "caption")
# Trials at once: one Train worker each, on the 2 CPU cores the demo is sized for (more at once
# only share the same cores: measured no faster).
MAX_CONCURRENT_TRIALS = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "demo",
        help="the whole pipeline at small size, locally: synth, ingest, pretrain, tune a finetuning task, evaluate",
        description="On a local Ray instance: render the synthetic shapes world, ingest it with Ray Data, "
        "pretrain mPLUG-tiny with Ray Train workers, score zero-shot retrieval beside chance, search a "
        "finetuning task's learning rates with Ray Tune (ASHA) and evaluate the best trial beside the task's "
        "baseline. Every artefact lands under --output.",
        examples=["mplug demo", "mplug demo --task vqa --output /tmp/demo_vqa"],
    )  # fmt: skip
    p.add_argument("--output", default="demo_out", metavar="URI",
                   help="folder or URI used as object storage for every artefact")  # fmt: skip
    p.add_argument("--num-images", type=int, default=3000, metavar="N",
                   help="caption scenes (80/10/10 train/val/test)")  # fmt: skip
    p.add_argument("--task-images", type=int, default=500, metavar="N",
                   help="images per pool of the finetuning task")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=250, metavar="N", help="pretraining steps")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="pretraining samples per worker")
    p.add_argument("--num-workers", type=int, default=2, metavar="N", help="pretraining Ray Train workers")
    p.add_argument("--image-size", type=int, default=64, metavar="PX", help="image side the model sees")
    p.add_argument("--task", default="snli_ve", choices=DEMO_TASKS, help="the finetuning task tuned")
    p.add_argument("--trials", type=int, default=2, metavar="N",
                   help="Tune trials, 2 at a time (ASHA stops the weak ones early)")  # fmt: skip
    p.add_argument(
        "--trial-epochs", type=int, default=3, metavar="N", help="finetuning epochs of a full trial"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="data, initial weights and trial samples follow from it"
    )
    p.set_defaults(func=run)


# Terminal control sequences (colours, cursor moves) and bare carriage returns: what a terminal
# draws with and a log file shows as noise.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\r(?!\n)")


class _PlainText:
    """stdout or stderr, less terminal control sequences: for output that is not a terminal.
    A bare carriage return (a redrawn line) becomes a newline."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_CONTROL.sub(lambda m: "\n" if m.group(0) == "\r" else "", text))
        return len(text)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def quiet_output(plain: bool) -> None:
    """Before Ray starts. The training and evaluation streams run Ray Data inside the workers, whose
    progress bars the driver redraws as they come (and once more when it exits, after the
    summary): off; the step lines and stage timings show progress. With `plain` (output to a
    file or a pipe), no colours or cursor moves either, from Ray's log prefixes or anything else."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # read by every worker process
    if plain:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        wrapped = {id(sys.stdout): _PlainText(sys.stdout), id(sys.stderr): _PlainText(sys.stderr)}
        # Loggers set up at import (Ray's) hold the streams themselves: they write through it too.
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for handler in (h for lg in loggers for h in getattr(lg, "handlers", [])):
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in wrapped:
                handler.setStream(wrapped[id(handler.stream)])
        sys.stdout, sys.stderr = wrapped[id(sys.stdout)], wrapped[id(sys.stderr)]


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _ingest(raw: str, fmt: str, output: str, image_size: int, **options) -> str:
    from pipelines.data.ingest import IngestConfig, run_ingest

    stats = run_ingest(IngestConfig(input=raw, format=fmt, output=output, image_size=image_size, **options))
    rejected = {k: v for k, v in stats.get("rejected_by_reason", {}).items() if v}
    print(f"  {raw.rsplit('/', 1)[-1]}: read {stats['read']}, written {stats['written']}, rejected "
          f"{stats['rejected']} {rejected or ''} → {output}")  # fmt: skip
    return output


def run(args: argparse.Namespace) -> int:
    import ray

    from jobs.env_cmd import collect
    from pipelines.cluster import init_ray, quiet_ray_data

    plain = not sys.stdout.isatty()
    quiet_output(plain)
    out = args.output if "://" in args.output else str(Path(args.output).resolve())
    started = time.perf_counter()
    env = collect(None)
    print("== mplug demo: " + ", ".join(f"{k} {env[k].split()[0]}" for k in ("torch", "ray", "transformers")))
    t = _stage("starting a local Ray instance")
    info = init_ray("local")
    if plain:
        quiet_ray_data()
    print(f"  ready in {time.perf_counter() - t:.1f}s: {info.cpus:g} logical CPUs, {info.gpus:g} GPUs")
    results: dict = {}
    try:
        code = _pipeline(args, out, results)
    finally:
        ray.shutdown()  # its last worker lines are printed here, before the summary
        sys.stdout.flush()
        sys.stderr.flush()
    if code:
        return code
    print(summary(args, out, results, (time.perf_counter() - started) / 60), flush=True)
    return 0


def _pipeline(args: argparse.Namespace, out: str, results: dict) -> int:
    """The stages; fills `results` (each stage's figures and its seconds in results["seconds"])."""
    from jobs.cli import CONFIG_DIR
    from pipelines import storage
    from pipelines.eval.evaluate import evaluate_task, format_result
    from pipelines.eval.retrieval import evaluate_retrieval, format_retrieval
    from pipelines.synth.tasks import render_task_annotations
    from pipelines.synth.world import render_corpus
    from pipelines.train.config import load_config
    from pipelines.train.launch import run_training
    from pipelines.tune.driver import best_trial_model, plan_search, run_search
    from pipelines.tune.space import load_space

    seconds = results["seconds"] = {}
    t = _stage(f"rendering the shapes world: {args.num_images} captioned scenes, {args.task} files")
    raw = render_corpus(
        storage.join(out, "raw"), num=args.num_images, fmt="parquet", seed=args.seed, image_size=96
    )
    task_raw = storage.join(out, "raw_tasks")
    files = render_task_annotations(
        task_raw, num=args.task_images, seed=args.seed, image_size=96, tasks=(args.task,)
    )
    print(f"  {raw['train']}, {task_raw} ({time.perf_counter() - t:.1f}s)")
    seconds["synth"] = time.perf_counter() - t

    t = _stage("ingesting with Ray Data")
    processed = {
        s: _ingest(raw[s], "parquet", storage.join(out, "processed", s), args.image_size)
        for s in ("train", "test")
    }
    task_data = {
        s: _ingest(files[args.task][s], "json", storage.join(out, "processed", f"{args.task}_{s}"), args.image_size,
                   image_root=task_raw, dedupe=s == "train")
        for s in ("train", "val", "test")
    }  # fmt: skip
    seconds["ingest"] = time.perf_counter() - t
    print(f"  ({seconds['ingest']:.1f}s)")

    t = _stage(f"pretraining mPLUG-tiny with {args.num_workers} Ray Train workers ({args.max_steps} steps)")
    runs = storage.join(out, "runs")
    job = load_config(
        str(CONFIG_DIR / "pretrain_tiny.yaml"),
        {"data.uris": [processed["train"]], "data.batch_size": args.batch_size, "data.image_size": args.image_size,
         "run.storage": runs, "run.name": "demo-tiny", "run.max_steps": args.max_steps, "run.seed": args.seed,
         "scaling.num_workers": args.num_workers},
    )  # fmt: skip
    result = run_training(job)
    if result.error is not None:
        print(f"pretraining failed: {result.error}")
        return 1
    pretrained = storage.join(runs, "demo-tiny", "final")
    seconds["pretraining"] = time.perf_counter() - t
    print(f"  ({seconds['pretraining']:.0f}s)")

    t = _stage("zero-shot image↔text retrieval on the held-out test split (ITC similarity)")
    results["retrieval"] = evaluate_retrieval(pretrained, [processed["test"]])
    print(format_retrieval(results["retrieval"]))
    storage.write_text(
        storage.join(runs, "demo-tiny", "retrieval_test.json"), json.dumps(results["retrieval"], indent=1)
    )
    seconds["zero-shot retrieval"] = time.perf_counter() - t

    at_once = min(args.trials, MAX_CONCURRENT_TRIALS)
    t = _stage(f"Ray Tune: {args.trials} finetuning trials of {args.task}, ASHA, {at_once} at a time")
    base = load_config(
        str(CONFIG_DIR / f"finetune_{args.task}_tiny.yaml"),
        {"data.uris": [task_data["train"]], "data.eval_uris": [task_data["val"]], "model.init": pretrained,
         "run.storage": runs, "run.name": f"tune-{args.task}", "run.epochs": args.trial_epochs,
         "run.seed": args.seed, "scaling.num_workers": 1, "run.checkpoint_every": 10_000},
    )  # fmt: skip
    space = load_space(str(CONFIG_DIR / "tune_tiny.yaml"))
    plan = plan_search(base, space, storage_uri=runs, name=f"tune-{args.task}", num_samples=args.trials,
                       max_concurrent=at_once, scheduler="asha")  # fmt: skip
    run_search(plan, space)
    best_model = best_trial_model(plan)
    seconds["search"] = time.perf_counter() - t
    print(f"  ({seconds['search']:.0f}s)")

    t = _stage(f"mplug evaluate: the best trial on the held-out {args.task} test split")
    results["task"] = evaluate_task(
        args.task, best_model, [task_data["test"]], storage.join(out, "eval", args.task)
    )
    print(format_result(results["task"]))
    seconds["evaluation"] = time.perf_counter() - t
    results["task_raw"], results["runs"] = task_raw, runs
    return 0


def summary(args: argparse.Namespace, out: str, results: dict, minutes: float) -> str:
    """The closing screen: each stage's figure beside its baseline, where the time went, the artefacts."""
    from pipelines import storage

    r, m = results["retrieval"], results["task"]
    runs, task_raw = results["runs"], results["task_raw"]
    primary = m["primary_metric"]
    beside = m["baseline"].get(primary)
    lines = [
        f"\n== demo finished in {minutes:.1f} min",
        f"  pretraining  zero-shot retrieval R@5 i2t {r['i2t_r5']:.1f} / t2i {r['t2i_r5']:.1f}   "
        f"(chance {r['chance_i2t_r5']:.1f} / {r['chance_t2i_r5']:.1f})",
        f"  {args.task:<12} {primary} {m['metrics'][primary]:.2f} on the test split"
        + (f"   (baseline {beside:.2f})" if isinstance(beside, int | float) else ""),
        "  time         " + ", ".join(f"{stage} {s:.0f}s" for stage, s in results["seconds"].items()),
        "  artefacts:",
    ]
    for label, where in (
        ("raw corpora", f"{storage.join(out, 'raw')}, {task_raw}"),
        ("processed shards", storage.join(out, "processed")),
        ("ingest stats/rejects", storage.join(out, "processed", "train", "stats.json")),
        (
            "pretraining run",
            storage.join(runs, "demo-tiny") + " (checkpoints, metrics.csv, curves.png, final/)",
        ),
        ("zero-shot retrieval", storage.join(runs, "demo-tiny", "retrieval_test.json")),
        (
            "search",
            storage.join(runs, f"tune-{args.task}")
            + " (results.csv, best.yaml, search.png, a run per trial)",
        ),
        ("evaluation", storage.join(out, "eval", args.task) + " (metrics.json, predictions.parquet)"),
    ):
        lines.append(f"    {label:<20} {where}")
    return "\n".join(lines)
