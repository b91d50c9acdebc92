"""How many steps before mPLUG-tiny's box decoder reads *where* something is: grounding
finetuning on held-out data, the decoder's coordinate error measured as training goes.

Three cases. `single`: one square of a random colour and size on a grey image, the expression
always "the shape", so the box is only in the image. `colour`: 2-4 squares of different colours,
"the <colour> shape": the decoder must find the named one. `refcoco`: the shapes-world referring
expressions (`mplug synth --tasks grounding`), optionally one `--family` of them. Runs the
grounding task's own transform, loss (`finetune_grounding_tiny.yaml`) and `train_step`
in-process, from scratch or from `--init` (a run's `final/`), with the vision tower's
`--position-init` and the bins' `--bin-init` chosen here. Prints one JSON line per `--every`
steps: mean |error| of the teacher-forced cx, cy (fraction of the image side) and Acc@0.5.

    .venv/bin/python -m benchmarks.grounding_probe --case single --steps 1000 --every 125
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import torch

FAMILIES = ("relation", "attributes", "position", "comparative", "extreme")


def _row(key: str, im, caption: str, bbox: list[float]) -> dict:
    """One row as ingest writes it, for a square test image."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    size = im.size[0]
    return {"key": key, "image": buf.getvalue(), "caption": caption, "width": size, "height": size,
            "orig_width": size, "orig_height": size, "bbox": bbox}  # fmt: skip


def single_object_rows(n: int, seed: int, size: int = 64) -> list[dict]:
    """Rows as ingest writes them: one square (11.5 or 19.2 px, the shapes world's two sizes)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        side = float(rng.choice([0.18 * size, 0.30 * size]))
        x, y = rng.uniform(0, size - side, 2)
        im = Image.new("RGB", (size, size), (150, 150, 150))
        ImageDraw.Draw(im).rectangle(
            [x, y, x + side, y + side], fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
        rows.append(_row(f"{seed}-{i}", im, "the shape", [x, y, side, side]))
    return rows


def colour_choice_rows(n: int, seed: int, size: int = 64) -> list[dict]:
    """2-4 squares of different colours in different cells of the 3x3 grid (the shapes world's
    layout and sizes), the expression "the <colour> shape" for one of them: which one is only
    told by colour, where it is only by the image."""
    from PIL import Image, ImageDraw

    from pipelines.synth.world import COLOURS

    names = list(COLOURS)
    rng = np.random.default_rng(seed)
    rows = []
    cell = size / 3
    for i in range(n):
        count = int(rng.integers(2, 5))
        cells = rng.choice(9, size=count, replace=False)
        colours = rng.choice(len(names), size=count, replace=False)
        im = Image.new("RGB", (size, size), (150, 150, 150))
        draw = ImageDraw.Draw(im)
        boxes = []
        for c, k in zip(cells, colours):
            side = float(rng.choice([0.18 * size, 0.30 * size]))
            x = (c % 3) * cell + rng.uniform(0, max(0.0, cell - side))
            y = (c // 3) * cell + rng.uniform(0, max(0.0, cell - side))
            draw.rectangle([x, y, x + side, y + side], fill=COLOURS[names[k]])
            boxes.append([x, y, side, side])
        target = int(rng.integers(count))
        rows.append(_row(f"{seed}-{i}", im, f"the {names[colours[target]]} shape", boxes[target]))
    return rows


def family(expression: str) -> str:
    """Which family of `synth_tasks.referring_expression` an expression comes from."""
    if any(f" {r} " in f" {expression} " for r in ("left of", "right of", "above", "below")):
        return "relation"
    if "of the two" in expression:
        return "comparative"
    if any(w in expression for w in ("furthest", "highest", "lowest")):
        return "extreme"
    if any(f" {p} the " in expression for p in ("in", "at", "on")):
        return "position"
    return "attributes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("single", "colour", "refcoco"), default="single")
    parser.add_argument(
        "--num", type=int, default=2000, help="single: training images; refcoco: images per split pool"
    )
    parser.add_argument("--family", choices=FAMILIES, help="refcoco: train and test on one family only")
    parser.add_argument("--init", help="a run's final/ to start from (default: from scratch)")
    parser.add_argument("--position-init", choices=("normal", "sincos"), default="sincos")
    parser.add_argument("--bin-init", choices=("keep", "ordinal"), default="ordinal")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=125)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--workdir", help="refcoco: keep the rendered data here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from pipelines.synth.tasks import render_task_annotations
    from pipelines.train.config import parse_set_args
    from pipelines.train.init import load_run_weights
    from tests import finetune as ft

    if args.case == "single":
        train, test = single_object_rows(args.num, seed=0), single_object_rows(200, seed=1)
    elif args.case == "colour":
        train, test = colour_choice_rows(args.num, seed=0), colour_choice_rows(200, seed=1)
    else:
        root = os.path.join(args.workdir or tempfile.mkdtemp(prefix="mplug-grounding-"), "data")
        files = render_task_annotations(root, num=args.num, seed=1, image_size=64, tasks=("grounding",))
        train = ft.processed_rows(files["grounding"]["train"], root)
        test = ft.processed_rows(files["grounding"]["test"], root)
        if args.family:
            train = [r for r in train if family(r["caption"]) == args.family]
            test = [r for r in test if family(r["caption"]) == args.family]
    overrides = {"model.overrides.vision_config": {"position_init": args.position_init},
                 "grounding.bin_init": args.bin_init, **parse_set_args(args.set)}  # fmt: skip
    if args.init:
        overrides["model.init"] = args.init
    task = ft.task_from_config("grounding", "jobs/configs/finetune_grounding_tiny.yaml", overrides)
    torch.manual_seed(0)
    model = task.build_model()
    if args.init:
        load_run_weights(model, args.init)
    task.after_initial_weights(model)
    print(json.dumps({"case": args.case, "family": args.family, "train_rows": len(train), "test_rows": len(test),
                      "init": args.init, "position_init": args.position_init, "bin_init": args.bin_init}), flush=True)  # fmt: skip
    started = time.perf_counter()

    def report(step: int, _result) -> None:
        if step % args.every:
            return
        model.eval()
        errors = []
        with torch.no_grad():
            for batch in ft.batches(task, test, 64, train=False, drop_last=False):
                out = model(batch["image"], batch["text_ids"], batch["text_mask"], batch["boxes"])
                errors.append((out.pred_boxes - batch["boxes"]).abs()[:, :2])
        accuracy = ft.evaluate(task, model, test)[0]["accuracy"]
        model.train()
        error = torch.cat(errors).mean(0).tolist()
        print(json.dumps({"step": step, "cx_error": round(error[0], 3), "cy_error": round(error[1], 3),
                          "accuracy": round(accuracy, 1), "seconds": round(time.perf_counter() - started)}), flush=True)  # fmt: skip

    batch = task.job.data.batch_size
    ft.finetune(task, model, train, epochs=-(-args.steps * batch // len(train)), batch_size=batch,
                max_steps=args.steps, after_step=report)  # fmt: skip


if __name__ == "__main__":
    main()
