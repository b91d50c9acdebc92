"""`mplug synth`: render the synthetic shapes-world corpus in any ingest input format."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="render the synthetic shapes-world corpus (train/val/test) in any ingest input format",
        description="Scenes of 1-3 coloured shapes with rich captions, question/answer pairs and boxes, "
        "deterministic by seed, written as img2dataset parquet or webdataset shards, ALBEF JSON "
        "annotations (+ vqa_/grounding_ files) or URL lists.",
    )
    p.add_argument("--output", required=True, help="output URI (s3://, gs://, file:// or a path)")
    p.add_argument("--num", type=int, required=True, help="number of scenes over all splits")
    p.add_argument("--format", default="parquet", choices=["parquet", "webdataset", "json", "urls"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96, help="square image side in pixels")
    p.add_argument(
        "--corrupt-per-kind", type=int, default=0, help="bad records of each kind added to the train split"
    )
    p.add_argument(
        "--split-fractions", default="0.8,0.1,0.1", help="train,val,test fractions (default 0.8,0.1,0.1)"
    )
    p.add_argument("--url-base", help="urls format: HTTP address that will serve OUTPUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.data.synth import render_corpus

    try:
        fractions = tuple(float(x) for x in args.split_fractions.split(","))
    except ValueError:
        raise SystemExit(
            f"--split-fractions {args.split_fractions!r}: expected three numbers like 0.8,0.1,0.1"
        ) from None
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
        print(f"image root: {args.output}  (vqa_{{split}}.json and grounding_{{split}}.json beside)")
    return 0
