"""`mplug ingest`: raw image-text pairs in object storage → clean training shards (Ray Data)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jobs.cli import add_command, check_config, shipped_configs

# CLI flag (argparse dest) → IngestConfig key, for flags that override YAML keys.
FLAG_KEYS = {
    "input": "input",
    "format": "format",
    "output": "output",
    "image_root": "image_root",
    "video_root": "video_root",
    "num_frames": "num_frames",
    "frame_sampling": "frame_sampling",
    "min_video_frames": "min_video_frames",
    "max_video_bytes": "max_video_bytes",
    "allow_image_paths_outside_root": "allow_image_paths_outside_root",
    "max_annotation_bytes": "max_annotation_bytes",
    "image_column": "image_column",
    "caption_column": "caption_column",
    "key_column": "key_column",
    "url_column": "url_column",
    "image_size": "image_size",
    "min_image_size": "min_image_size",
    "max_aspect_ratio": "max_aspect_ratio",
    "max_image_pixels": "max_image_pixels",
    "max_words": "max_words",
    "rows_per_shard": "rows_per_shard",
    "rows_per_unit": "rows_per_unit",
    "dedupe": "dedupe",
    "num_workers": "num_workers",
    "splits": "splits",
    "overwrite": "overwrite",
}

# Flags that set what a shipped config may leave as a placeholder (`CHANGE-ME`).
PLACEHOLDER_FLAGS = {
    "input": "--input URI", "output": "--output URI", "image_root": "--image-root URI",
    "video_root": "--video-root URI",
}  # fmt: skip

# Exit statuses: 0 done; 2 invalid config or refused (an output written with other settings);
# 3 done, but some input could not be read (rows rejected as bad_shard or storage_error: see
# OUTPUT/rejects/).
EXIT_INVALID = 2
EXIT_BAD_SHARDS = 3


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.data.ingest import VIDEO_ROWS_PER_UNIT, IngestConfig

    defaults = {k: f.default for k, f in IngestConfig.model_fields.items()}

    def default(key: str) -> str:  # a flag left out keeps the YAML's value, else the field's
        value = defaults[key]
        return f"default: the config's {key}, else {f'{value:,}' if type(value) is int else value}"

    p = add_command(
        sub, "ingest",
        help="turn raw image-text pairs (parquet, webdataset, JSON, URL lists) into clean training shards",
        description="Read raw pairs from s3://, gs://, file:// or a path; decode, validate, resize, clean "
        "captions and drop exact duplicates on Ray Data; write OUTPUT/data/*.parquet, every rejected row "
        "with its reason to OUTPUT/rejects/, and OUTPUT/stats.json. Re-running an interrupted ingest "
        "finishes it without duplicating rows. img2dataset output needs no column options. S3 endpoint "
        "and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or the YAML; "
        "a GCS emulator from STORAGE_EMULATOR_HOST. --format json reads the tasks' official annotation "
        "files unchanged (captions/retrieval, COCO Karpathy, VQA, RefCOCO-style grounding, NLVR2, SNLI-VE; "
        "a JSON array or JSON Lines). --format video samples --num-frames frames of each clip (mp4, webm, avi, "
        "...) named by MSRVTT / MSRVTT-QA / MSVD-QA / VATEX annotations under --video-root, or in webdataset "
        "tars with a video member (docs/video.md).\n\nExit status: 0 done; 2 invalid config, or the output was written "
        "with other settings; 3 done, but an input file (or part of one, or an image) could not be read "
        "and was counted as bad_shard or storage_error rejects; 1 any other failure.",
        examples=[
            "mplug ingest --input demo_out/raw/train --format parquet --output demo_out/processed/train",
            "mplug ingest --config ingest_coco_karpathy --input s3://bucket/coco/dataset_coco.json "
            "--image-root s3://bucket/coco/images --output s3://bucket/processed/coco_train",
            "mplug ingest --format video --input s3://bucket/msrvtt/msrvtt_test.jsonl "
            "--video-root s3://bucket/msrvtt/videos --num-frames 12 --output s3://bucket/processed/msrvtt_test",
        ],
    )  # fmt: skip
    p.add_argument("--config", metavar="NAME|YAML",
                   help="ingest YAML (path or URI) or a shipped one: " + ", ".join(shipped_configs("ingest"))
                   + " (default: none; every value from the flags)")  # fmt: skip
    p.add_argument(
        "--input", metavar="URI", help="one file or a folder of shards (required, here or in the config)"
    )
    p.add_argument(
        "--format", choices=["parquet", "webdataset", "json", "urls", "video"],
        help="parquet (encoded images), webdataset tars, json annotations + --image-root, urls (URL lists), "
        "video (video annotations + --video-root, or tars with a video member) (required, here or in the config)",
    )  # fmt: skip
    p.add_argument("--output", metavar="URI",
                   help="gets data/, rejects/, stats.json (required, here or in the config)")  # fmt: skip
    p.add_argument("--image-root", metavar="URI",
                   help="json: what the annotations' image paths are relative to (required with json; default: none)")  # fmt: skip
    p.add_argument("--video-root", metavar="URI",
                   help="video: what the annotations' video names are relative to (required with video "
                   "annotations; default: none)")  # fmt: skip
    p.add_argument(
        "--allow-image-paths-outside-root", action="store_true", default=None,
        help="json/video: trust the annotations to name images or videos anywhere (absolute paths, other "
        "URIs, ..); without it such a path is a path_outside_root reject (default: off)",
    )  # fmt: skip
    p.add_argument("--num-frames", type=int, metavar="N",
                   help=f"video: frames sampled from each clip and stored ({default('num_frames')})")  # fmt: skip
    p.add_argument("--frame-sampling", choices=["uniform", "rand", "headtail"],
                   help="video: uniform (the first frame of each of N equal spans), rand (N at random) or "
                   f"headtail (half from each half of the clip), as the official scripts ({default('frame_sampling')})")  # fmt: skip
    p.add_argument("--min-video-frames", type=int, metavar="N",
                   help=f"video: a clip with fewer frames is a too_short reject ({default('min_video_frames')})")  # fmt: skip
    p.add_argument("--max-video-bytes", type=int, metavar="N",
                   help=f"video: a larger file or tar member is a too_large reject, never read whole "
                   f"({default('max_video_bytes')})")  # fmt: skip
    p.add_argument(
        "--allow-private-urls", action="store_true", default=None,
        help="urls: also fetch loopback, private and link-local addresses (a local server, an intranet "
        "mirror); without it such a URL is a url_not_allowed reject (default: off)",
    )  # fmt: skip
    p.add_argument("--max-annotation-bytes", type=int, metavar="N",
                   help="json/urls: a longer JSON line or entry is a too_large reject, never read whole "
                   f"({default('max_annotation_bytes')})")  # fmt: skip
    p.add_argument(
        "--splits", metavar="A,B", type=lambda text: [s for s in text.split(",") if s],
        help="json: keep only entries whose `split` is one of these, e.g. train,restval (default: every entry)",
    )  # fmt: skip
    p.add_argument("--image-column", help="column with encoded image bytes (default: image/jpg/png/webp)")
    p.add_argument("--caption-column", help="caption column (default: caption/TEXT/text/txt)")
    p.add_argument("--key-column", help="row id column (default: key; else generated)")
    p.add_argument("--url-column", help="URL column (default: url/URL)")
    p.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help=f"shorter side of stored images ({default('image_size')})",
    )
    p.add_argument("--min-image-size", type=int, metavar="PX",
                   help=f"reject images whose shorter side is smaller ({default('min_image_size')})")  # fmt: skip
    p.add_argument("--max-aspect-ratio", type=float, metavar="R",
                   help=f"reject long/short side ratios above this ({default('max_aspect_ratio')})")  # fmt: skip
    p.add_argument("--max-image-pixels", type=int, metavar="N",
                   help=f"decompression-bomb guard ({default('max_image_pixels')})")  # fmt: skip
    p.add_argument(
        "--max-words",
        type=int,
        metavar="N",
        help=f"captions are cut to this many words ({default('max_words')})",
    )
    p.add_argument(
        "--rows-per-shard",
        type=int,
        metavar="N",
        help=f"rows per output parquet file ({default('rows_per_shard')})",
    )
    p.add_argument("--rows-per-unit", type=int, metavar="N",
                   help=f"json/urls/video: annotation rows per work unit ({default('rows_per_unit')}; "
                   f"video annotations: {VIDEO_ROWS_PER_UNIT})")  # fmt: skip
    p.add_argument("--dedupe", action=argparse.BooleanOptionalAction, default=None,
                   help=f"drop exact duplicate pairs ({default('dedupe')})")  # fmt: skip
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="concurrent ingest tasks (default: the config's num_workers, else every cluster CPU)")  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true", default=None,
        help="clear the output first; without it, an output written with other settings is refused "
        "(default: off)",
    )  # fmt: skip
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The validated IngestConfig: the YAML (`--config`), then the flags."""
    from pydantic import ValidationError

    from pipelines.data.ingest import IngestConfig, format_validation_error
    from pipelines.train.config import ConfigError

    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    path = check_config(args.config, "ingest")
    try:
        if path is not None:
            config = IngestConfig.from_yaml(path, **overrides)
        else:
            config = IngestConfig.model_validate({k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        raise ConfigError(f"invalid config: {format_validation_error(err)}") from None
    if getattr(args, "allow_private_urls", None):  # a key of the YAML's `download:` section
        download = config.download.model_copy(update={"allow_private_urls": True})
        config = config.model_copy(update={"download": download})
    return config


def check_before_ray(config) -> None:
    """Everything about an ingest that needs no cluster, checked before Ray starts."""
    from pipelines import storage
    from pipelines.train.config import ConfigError, check_placeholders

    check_placeholders(config.model_dump(mode="json"), PLACEHOLDER_FLAGS)
    if config.format == "json" and not config.image_root:
        raise ConfigError(
            "--format json needs --image-root URI (or image_root in the config): the folder the "
            "annotations' image paths are relative to"
        )
    if config.image_root and config.format != "json":
        raise ConfigError(f"--image-root applies to --format json only, not {config.format}")
    if config.video_root and config.format != "video":
        raise ConfigError(f"--video-root applies to --format video only, not {config.format}")
    annotations = config.input.rstrip("/").endswith((".json", ".jsonl"))
    if config.format == "video" and annotations and not config.video_root:
        raise ConfigError(
            "--format video with an annotation file needs --video-root URI (or video_root in the config): "
            "the folder the annotations' video names are relative to"
        )
    if not storage.exists(config.input):
        raise ConfigError(f"--input {config.input!r} does not exist")


def format_summary(stats: dict) -> str:
    reasons = {k: v for k, v in stats["rejected_by_reason"].items() if v}
    lines = [
        f"ingest {stats['input']} ({stats['format']})",
        f"  read {stats['read']}  written {stats['written']}  rejected {stats['rejected']}",
        f"  rejected by reason: {json.dumps(reasons) if reasons else 'none'}",
        f"  bytes read {stats['bytes_read']:,}  bytes written {stats['bytes_written']:,}",
        f"  {stats['units']} units, {stats['units_processed_this_run']} processed this run "
        f"in {stats['elapsed_s']:.1f}s ({stats['rows_per_s']:.1f} rows/s, {stats['workers']} workers)",
    ]
    if "downloads" in stats:
        lines.append(f"  downloads: {json.dumps(stats['downloads'])}")
    if "skipped_by_split" in stats:
        lines.append(f"  entries of other splits skipped: {stats['skipped_by_split']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pipelines import storage
    from pipelines.cluster import init_ray, quiet_ray_data
    from pipelines.data.ingest import SettingsMismatch, run_ingest

    config = build_config(args)
    # The config's storage settings and credentials, for this process and a local Ray instance
    # started below (which inherits them); they never travel in a task's runtime environment.
    os.environ.update(config.storage_env() | config.credentials_env())
    check_before_ray(config)  # config errors exit 2 (jobs.cli.main) before Ray starts
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    init_ray(args.address)
    if args.quiet:
        quiet_ray_data()
    try:
        stats = run_ingest(config)
    except SettingsMismatch as err:
        print(f"mplug ingest: refused: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(format_summary(stats))
    print(
        f"  shards: {storage.join(config.output, 'data')}  rejects: {storage.join(config.output, 'rejects')}"
    )
    reasons = stats["rejected_by_reason"]
    bad = reasons.get("bad_shard", 0) + reasons.get("storage_error", 0)
    if bad:
        print(
            f"mplug ingest: {bad} input file(s), part(s) or image(s) could not be read (reasons bad_shard "
            f"and storage_error in {storage.join(config.output, 'rejects')}; re-run with --overwrite "
            "to read storage_error ones again); the rest is written",
            file=sys.stderr,
        )
        return EXIT_BAD_SHARDS
    return 0
