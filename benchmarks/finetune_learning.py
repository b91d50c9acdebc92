"""How far each finetuning task of mPLUG-tiny gets past its model-free baseline on held-out
shapes-world data, after a short pretraining: the measurement the learning tests are sized from.

In-process, one thread pool, no Ray (the same ingest processing, row transforms, `train_step`,
`predict` and `score` the Ray jobs run; `tests/finetune.py`): pretrain on the caption pool's train
split, then finetune each task from that model with its `finetune_{task}_tiny.yaml` and score the
test split beside `task_baselines` (fitted on train). Prints one JSON line per task.

    .venv/bin/python -m benchmarks.finetune_learning --num 300 --pretrain-steps 150 --epochs 5

`--scst-steps N` follows captioning with its SCST stage (from the CE model just scored) and
scores it the same way (`--scst-lr`, `--scst-set KEY=VALUE` override its config).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

TASK_NAMES = ("vqa", "caption", "retrieval", "grounding", "nlvr2", "snli_ve")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=300, help="images per pool (80/10/10 split)")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=5, help="finetuning epochs per task")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every finetuning task, e.g. optim.lr=1e-3")  # fmt: skip
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a pretraining config override, e.g. model.overrides.itm_random_negative_steps=250")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scst-steps", type=int, default=0,
                        help="after caption, this many SCST steps (finetune_caption_scst_tiny) from its CE model")  # fmt: skip
    parser.add_argument("--scst-lr", type=float, help="the SCST stage's lr (default: its config's)")
    parser.add_argument("--scst-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the SCST stage, e.g. data.crop_min_scale=1.0")  # fmt: skip
    parser.add_argument("--scst-every", type=int, default=0, metavar="K",
                        help="also score the held-out images every K SCST steps (its trajectory)")  # fmt: skip
    parser.add_argument("--scst-seed", type=int, default=0, help="the SCST stage's data order")
    parser.add_argument("--score-train", type=int, default=0, metavar="N",
                        help="also score N training images unaugmented: not learning vs not generalising")  # fmt: skip
    parser.add_argument("--workdir", help="keep the data and the pretrained model here (reused when there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipelines.synth.tasks import render_task_annotations, task_baselines
    from pipelines.tasks.base import EvalSetup
    from pipelines.train.config import parse_set_args
    from tests import finetune as ft

    work = args.workdir or tempfile.mkdtemp(prefix="mplug-learning-")
    root = os.path.join(work, "data")
    started = time.perf_counter()
    files = render_task_annotations(root, num=args.num, seed=1, image_size=64)
    baselines = task_baselines(root, tasks=args.tasks)
    print(json.dumps({"stage": "render", "seconds": round(time.perf_counter() - started, 1)}), flush=True)

    final = os.path.join(work, "pretrain", "final")
    if os.path.exists(os.path.join(final, "config.json")):  # a kept --workdir: finetune the same model again
        print(json.dumps({"stage": "pretrain", "reused": final}), flush=True)
    else:
        started = time.perf_counter()
        rows = ft.processed_rows(files["caption"]["train"], root)
        pretrain = ft.task_from_config(
            "pretrain", "jobs/configs/pretrain_tiny.yaml", parse_set_args(args.pretrain_set)
        )
        torch.manual_seed(0)
        model = pretrain.build_model()
        epochs = max(1, round(args.pretrain_steps * pretrain.job.data.batch_size / len(rows)))
        losses = ft.finetune(pretrain, model, rows, epochs=epochs, batch_size=pretrain.job.data.batch_size)
        final = ft.save_run(model, os.path.join(work, "pretrain"))
        print(json.dumps({"stage": "pretrain", "rows": len(rows), "epochs": epochs,
                          "loss_per_epoch": [round(x, 3) for x in losses],
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)  # fmt: skip

    overrides = parse_set_args(args.set)
    for name in args.tasks:
        started = time.perf_counter()
        train = ft.processed_rows(files[name]["train"], root)
        test = ft.processed_rows(files[name]["test"], root)
        task, model, losses = ft.finetuned(name, final, train, args.epochs, overrides)
        train_s = time.perf_counter() - started
        setup = None
        if name == "caption":  # one prediction per image, scored against all its references
            setup = EvalSetup(keys=ft.first_keys(test), references=ft.references_of(test))
        metrics, _, predictions = ft.evaluate(task, model, test, setup)
        print(json.dumps({
            "task": name, "train_rows": len(train), "test_rows": len(test), "epochs": args.epochs,
            "loss_per_epoch": [round(x, 3) for x in losses], "train_s": round(train_s, 1),
            "primary": {task.primary_metric: round(metrics[task.primary_metric], 2)},
            "metrics": {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)},
            "baselines": {k: round(v, 2) for k, v in baselines.get(name, {}).items() if "/" not in k},
            **({"examples": _examples(predictions)} if name == "caption" else {}),
            **({"train_primary": _train_score(task, model, train, args.score_train)} if args.score_train else {}),
        }), flush=True)  # fmt: skip
        if name == "caption" and args.scst_steps:
            _scst(
                model,
                train,
                test,
                setup,
                os.path.join(work, "caption_train_refs"),
                args.scst_steps,
                args.scst_lr,
                parse_set_args(args.scst_set),
                args.score_train,
                args.scst_every,
                args.scst_seed,
            )


def _scst(
    model,
    train: list[dict],
    test: list[dict],
    setup,
    refs_dir: str,
    steps: int,
    lr: float | None,
    overrides: dict,
    score_train: int,
    every: int = 0,
    seed: int = 0,
) -> None:
    """The SCST stage from the CE-finetuned `model`, scored as the CE stage is (and, with
    `every`, on the held-out images every `every` steps)."""
    from tests import finetune as ft

    task = ft.task_from_config(
        "caption",
        "jobs/configs/finetune_caption_scst_tiny.yaml",
        {
            "data.uris": [ft.caption_references(train, refs_dir)],
            **({"optim.lr": lr, "optim.visual_lr": lr} if lr else {}),
            **overrides,
        },
    )
    started = time.perf_counter()
    batch = task.job.data.batch_size
    rewards: list[float] = []

    def after_step(step: int, result) -> None:
        rewards.append(float(result.values["reward"]))
        if every and step % every == 0 and step < steps:
            cider = ft.evaluate(task, model, test, setup)[0]["CIDEr"]
            model.train()
            print(json.dumps({"task": "caption_scst", "step": step, "CIDEr": round(cider, 3),
                              "mean_beam_reward_last": round(sum(rewards[-every:]) / every, 3)}), flush=True)  # fmt: skip

    ft.finetune(task, model, train, epochs=-(-steps * batch // len(train)), batch_size=batch, max_steps=steps,
                seed=seed, after_step=after_step)  # fmt: skip
    train_s = time.perf_counter() - started
    metrics, _, predictions = ft.evaluate(task, model, test, setup)
    tenth = max(1, len(rewards) // 10)
    print(json.dumps({
        "task": "caption_scst", "steps": steps, "train_s": round(train_s, 1),
        "mean_beam_reward_first_last_tenth": [round(sum(rewards[:tenth]) / tenth, 3),
                                               round(sum(rewards[-tenth:]) / tenth, 3)],
        "primary": {"CIDEr": round(metrics["CIDEr"], 2)},
        "metrics": {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)},
        "examples": _examples(predictions),
        **({"train_primary": _train_score(task, model, train, score_train)} if score_train else {}),
    }), flush=True)  # fmt: skip


def _train_score(task, model, train: list[dict], n: int) -> float:
    """The task's primary metric on its first `n` training images, unaugmented (captioning: one
    prediction per image against all its references)."""
    from pipelines.tasks.base import EvalSetup
    from tests import finetune as ft

    setup = None
    if task.name == "caption":
        keys = frozenset(sorted(ft.first_keys(train))[:n])
        rows = [r for r in train if r["key"] in keys]
        refs = ft.references_of(train)
        setup = EvalSetup(keys=keys, references={i: refs[i] for i in ft.references_of(rows)})
    else:
        images = set(list(dict.fromkeys(str(r.get("image_id") or r["key"]) for r in train))[:n])
        rows = [r for r in train if str(r.get("image_id") or r["key"]) in images]
    metrics, _, _ = ft.evaluate(task, model, rows, setup)
    return round(metrics[task.primary_metric], 2)


def _examples(predictions: list[dict], n: int = 4) -> dict[str, str]:
    """The first test images' captions, to read what a stage changed."""
    return {p["image_id"]: p["caption"] for p in sorted(predictions, key=lambda p: p["image_id"])[:n]}


if __name__ == "__main__":
    main()
