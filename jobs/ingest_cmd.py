"""`mplug ingest`: raw image-text pairs in object storage → clean training shards (Ray Data)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.cli import CONFIG_DIR, resolve_config

# CLI flag (argparse dest) → IngestConfig key, for flags that override YAML keys.
FLAG_KEYS = {
    "input": "input",
    "format": "format",
    "output": "output",
    "image_root": "image_root",
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

# Exit statuses: 0 done; 2 invalid config or refused (an output written with other settings);
# 3 done, but some input could not be read (rows rejected as bad_shard: see OUTPUT/rejects/).
EXIT_INVALID = 2
EXIT_BAD_SHARDS = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="turn raw image-text pairs (parquet, webdataset, JSON, URL lists) into clean training shards",
        description="Read raw pairs from s3://, gs://, file:// or a path; decode, validate, resize, clean "
        "captions and drop exact duplicates on Ray Data; write OUTPUT/data/*.parquet, every rejected row "
        "with its reason to OUTPUT/rejects/, and OUTPUT/stats.json. Re-running an interrupted ingest "
        "finishes it without duplicating rows. img2dataset output needs no column options. S3 endpoint "
        "and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or the YAML; "
        "a GCS emulator from STORAGE_EMULATOR_HOST. --format json reads the tasks' official annotation "
        "files unchanged (captions/retrieval, COCO Karpathy, VQA, RefCOCO-style grounding, NLVR2, SNLI-VE; "
        "a JSON array or JSON Lines). Exit status: 0 done; 2 invalid config, or the output was written "
        "with other settings; 3 done, but an input file (or part of one) could not be read and was "
        "counted as bad_shard rejects.",
    )
    p.add_argument("--config", help="YAML (path/URI) or a shipped name: " + ", ".join(shipped_configs()))
    p.add_argument("--input", help="input URI: one file or a folder of shards")
    p.add_argument(
        "--format",
        choices=["parquet", "webdataset", "json", "urls"],
        help="parquet (encoded images), webdataset tars, json annotations + --image-root, urls (URL lists)",
    )
    p.add_argument("--output", help="output URI (gets data/, rejects/, stats.json)")
    p.add_argument("--image-root", help="json: URI that the annotations' image paths are relative to")
    p.add_argument(
        "--splits",
        type=lambda text: [s for s in text.split(",") if s],
        help="json: keep only entries whose `split` is one of these, comma-separated (e.g. train,restval)",
    )
    p.add_argument("--image-column", help="column with encoded image bytes (default: image/jpg/png/webp)")
    p.add_argument("--caption-column", help="caption column (default: caption/TEXT/text/txt)")
    p.add_argument("--key-column", help="row id column (default: key; else generated)")
    p.add_argument("--url-column", help="URL column (default: url/URL)")
    p.add_argument("--image-size", type=int, help="shorter side of stored images in pixels (default 256)")
    p.add_argument(
        "--min-image-size", type=int, help="reject images whose shorter side is smaller (default 32)"
    )
    p.add_argument(
        "--max-aspect-ratio", type=float, help="reject long/short side ratios above this (default 3)"
    )
    p.add_argument("--max-image-pixels", type=int, help="decompression-bomb guard (default 25e6)")
    p.add_argument("--max-words", type=int, help="captions are cut to this many words (default 30)")
    p.add_argument("--rows-per-shard", type=int, help="rows per output parquet file (default 10000)")
    p.add_argument(
        "--rows-per-unit", type=int, help="json/urls: annotation rows per work unit (default 1000)"
    )
    p.add_argument(
        "--dedupe", action=argparse.BooleanOptionalAction, default=None, help="drop exact duplicate pairs"
    )
    p.add_argument("--num-workers", type=int, help="concurrent ingest tasks (default: every cluster CPU)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="clear the output first (without it, an output written with other settings is refused)",
    )
    p.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS, else a local instance")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("ingest_*.yaml"))


def build_config(args: argparse.Namespace):
    from pipelines.data.ingest import IngestConfig

    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    path = resolve_config(args.config)
    if path is not None:
        return IngestConfig.from_yaml(path, **overrides)
    return IngestConfig.model_validate({k: v for k, v in overrides.items() if v is not None})


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
    from pydantic import ValidationError

    from pipelines import storage
    from pipelines.cluster import init_ray, quiet_ray_data
    from pipelines.data.ingest import SettingsMismatch, format_validation_error, run_ingest

    try:
        config = build_config(args)
    except ValidationError as err:
        print(f"mplug ingest: invalid config: {format_validation_error(err)}", file=sys.stderr)
        return EXIT_INVALID
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
    bad = stats["rejected_by_reason"].get("bad_shard", 0)
    if bad:
        print(
            f"mplug ingest: {bad} input file(s) or part(s) could not be read (reason bad_shard in "
            f"{storage.join(config.output, 'rejects')}); the rest is written",
            file=sys.stderr,
        )
        return EXIT_BAD_SHARDS
    return 0
