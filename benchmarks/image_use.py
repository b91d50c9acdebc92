"""Does a pretrained mPLUG use the image beyond "an image is there"? And when does it start to?

On held-out processed rows, the MLM and PrefixLM losses with each row's own image against
another row's (rolled) and against zero visual tokens, and the ITM matching probability of
matched and mismatched pairs. A model whose fusion and decoder read the image has a clearly lower
loss with the right image; a text-only solution has the same loss either way and ITM at its 1:2
prior (p = 1/3 for everything). With `--steps N` the pretraining continues in-process from the
model (pretrain_tiny's recipe, batch `--batch-size`) and the probe is repeated every `--every`
steps. Without `--model` it pretrains from scratch; `--set` changes the recipe (e.g. one
objective alone). `--num N` renders the learning suite's shapes-world caption data in place
of `--train`/`--test`. Prints one JSON line per probe.

    .venv/bin/python -m benchmarks.image_use --model demo_out/runs/demo-tiny/final \\
        --train demo_out/processed/train --test demo_out/processed/test --steps 600 --every 150
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _rows(uri: str, limit: int | None = None) -> list[dict]:
    """Processed rows of an ingest output (any URI), in shard order."""
    import pyarrow.parquet as pq

    from pipelines import storage
    from pipelines.data.stream import processed_files

    rows: list[dict] = []
    for f in processed_files([uri]):
        fs, path = storage.pyarrow_fs(f)
        rows.extend(pq.read_table(path, filesystem=fs).to_pylist())
        if limit and len(rows) >= limit:
            break
    return rows[:limit] if limit else rows


@torch.no_grad()
def probe(model, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, shift: int = 11) -> dict:
    """Losses and ITM probabilities with the right, another row's and no visual tokens."""
    from mplug.modeling import ones_mask

    was_training = model.training
    model.eval()
    visual = model.encode_image(images)
    text = model.encode_text(ids, mask)
    other = torch.roll(torch.arange(len(images)), shift)
    out = {}
    cfg = model.config
    for name, v in (("right", visual), ("other", visual[other]), ("zero", torch.zeros_like(visual))):
        torch.manual_seed(0)  # the same masked tokens in each condition
        if cfg.use_mlm:
            out[f"mlm_{name}"] = round(model._mlm_loss(ids, mask, v, ones_mask(v)).item(), 3)
        if cfg.use_prefix:
            out[f"prefix_{name}"] = round(model._prefix_loss(ids, mask, v, ones_mask(v)).item(), 3)
        if cfg.use_itm and name != "zero":
            out[f"itm_p_match_{name}"] = round(
                model.itm_logits(v, text, mask).softmax(-1)[:, 1].mean().item(), 3
            )
    model.train(was_training)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a pretraining run's final/ (or any run of ours); none: from scratch")
    parser.add_argument("--test", help="held-out ingest output (or --num)")
    parser.add_argument("--num", type=int, help="instead of --train/--test: render this many shapes-world "
                        "caption images (seed 1, 64 px, 80/10/10; the learning suite's data) and use its splits")  # fmt: skip
    parser.add_argument("--train", help="ingest output to continue pretraining on (with --steps)")
    parser.add_argument("--rows", type=int, default=192, help="held-out rows probed")
    parser.add_argument("--steps", type=int, default=0, help="continue pretraining this many steps")
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a pretraining config override, e.g. model.overrides.use_mlm=false")  # fmt: skip
    parser.add_argument("--save", help="write the continued model here as a run's final/ (for --init)")
    args = parser.parse_args()
    if (args.test is None) == (args.num is None):
        parser.error("give --test (with --train for --steps) or --num")
    if args.steps and not (args.train or args.num):
        parser.error("--steps needs --train or --num")
    torch.set_num_threads(args.threads)

    from mplug.tokenizer import word_start_table
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config, parse_set_args
    from pipelines.train.init import load_run_weights
    from pipelines.train.launch import build_model_config
    from tests import finetune as ft

    job = load_config(
        "jobs/configs/pretrain_tiny.yaml",
        {"optim.lr": args.lr, "optim.warmup_steps": 20, **parse_set_args(args.set)},
    )
    task = task_class("pretrain")(job, build_model_config(job))
    torch.manual_seed(0)
    model = task.build_model()
    if args.model:
        load_run_weights(model, args.model)
    model.set_word_starts(word_start_table(model.config.text_config.vocab_size))

    if args.num:
        import tempfile

        from pipelines.synth.tasks import render_task_annotations

        root = os.path.join(tempfile.mkdtemp(prefix="mplug-image-use-"), "data")
        files = render_task_annotations(root, num=args.num, seed=1, image_size=64)["caption"]
        test_rows = ft.processed_rows(files["test"], root)[: args.rows]
        train = ft.processed_rows(files["train"], root)
    else:
        test_rows = _rows(args.test, args.rows)
        train = _rows(args.train) if args.steps else []
    held_out = next(ft.batches(task, test_rows, args.rows, train=False, drop_last=False))
    images = torch.as_tensor(held_out["image"]).float()
    ids = torch.as_tensor(held_out["input_ids"]).long()
    mask = torch.as_tensor(held_out["attention_mask"]).long()
    print(json.dumps({"step": 0, **probe(model, images, ids, mask)}), flush=True)
    if not args.steps:
        return

    started = time.perf_counter()

    def report(step: int, result) -> None:
        if step % args.every == 0 or step == args.steps:
            losses = {k: round(float(v), 3) for k, v in result.values.items() if k.startswith("loss")}
            print(json.dumps({"step": step, "seconds": round(time.perf_counter() - started), **losses,
                              **probe(model, images, ids, mask)}), flush=True)  # fmt: skip

    epochs = -(-args.steps // (len(train) // args.batch_size))  # enough whole epochs to reach --steps
    ft.finetune(task, model, train, epochs=epochs, batch_size=args.batch_size, max_steps=args.steps,
                after_step=report)  # fmt: skip
    if args.save:
        print(json.dumps({"saved": ft.save_run(model, args.save)}), flush=True)


if __name__ == "__main__":
    main()
