"""`run_ingest`: raw image-text pairs in object storage → clean training shards, on Ray Data.

Three stages, each a Ray Data `map_batches` over small work items (the data itself never passes
through the driver; workers read and write storage directly):

A. per *unit* (an input file, a byte range of an annotation/URL list, or parquet row groups; see
   `readers`): read, (download), decode, validate, resize, clean captions, streaming. Writes the
   unit's clean rows, cut into shards of ≤ rows_per_shard rows as they fill, to
   `_staging/{unit}-{n:05d}.parquet`, its rejects to `rejects/{unit}.parquet`, the (key, content
   hash) of each clean row into 16 hash partitions `_state/hashes/p{h}/{unit}.parquet`, and last a
   marker `_state/a/{unit}.json` with its counts. A unit that turns out unreadable ends in one
   `bad_shard` reject; the other units are not affected.
B. per hash partition: exact duplicates (same image bytes, same cleaned text and task fields)
   meet in one partition; the smallest (key, unit, row) is kept, the others are listed in
   `_state/dups/p{h}.parquet`. A global step without a full shuffle: only hashes move.
C. per unit: publish each staged shard to `data/{unit}-{n:05d}.parquet` — copied as is (server-side
   on S3) unless it holds a listed duplicate, then filtered and rewritten — write
   `rejects/{unit}-duplicates.parquet`, then the marker `_state/c/{unit}.json`.

The driver holds unit descriptors and per-unit counts only, never rows. Every output name is a
function of the unit id and every stage is deterministic, so a re-run of an interrupted ingest
skips units whose markers exist, redoes the rest, overwrites partial files with identical
content, and never duplicates a row. The settings that shape the written rows are recorded in
`_state/settings.json` by the first run; a run with other settings is refused (or `overwrite`
clears the output first). Counts come only from the markers: `read == written + rejected` is
checked before `stats.json` is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from pipelines import storage
from pipelines.data import formats, readers, video
from pipelines.data.download import DownloadConfig, fetch_all
from pipelines.data.image import ImageLimits, ImageRejected, ProcessedImage, process_image
from pipelines.data.records import DATA_SCHEMA, REJECT_REASONS, clean_caption, rejects_table

log = logging.getLogger(__name__)

INPUT_FORMATS = ("parquet", "webdataset", "json", "urls", "video")
HASH_PARTITIONS = 16  # one per leading hex digit of the content hash
VIDEO_ROWS_PER_UNIT = 64
HASH_SCHEMA = pa.schema(
    [("key", pa.string()), ("_dedup", pa.string()), ("_unit", pa.string()), ("_row", pa.int64())]
)
DUP_SCHEMA = pa.schema(
    [("_unit", pa.string()), ("_row", pa.int64()), ("key", pa.string()), ("kept", pa.string())]
)


class IngestConfig(BaseModel):
    """One ingest job. YAML keys are these field names; CLI flags override them."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="input URI: a file or a folder of shards (s3://, gs://, file://, path)")
    format: Literal["parquet", "webdataset", "json", "urls", "video"]
    output: str = Field(description="output URI; gets data/, rejects/, stats.json")
    image_root: str | None = Field(None, description="json: URI the annotation's image paths are relative to")
    video_root: str | None = Field(
        None, description="video annotations: URI the annotation's video names are relative to"
    )
    allow_image_paths_outside_root: bool = Field(
        False,
        description="json/video: let annotations name images or videos anywhere (absolute paths, other "
        "URIs, `..`); off, such a path is a path_outside_root reject. Only for annotations you trust",
    )
    # video (`pipelines/data/video.py`): frames sampled from each clip, stored like images.
    num_frames: int = Field(8, gt=0, description="video: frames sampled from each clip and stored")
    frame_sampling: Literal["uniform", "rand", "headtail"] = Field(
        "uniform",
        description="video: which frames (the official strategies; rand/headtail seeded by the clip)",
    )
    min_video_frames: int = Field(
        1, gt=0, description="video: a clip with fewer frames is a too_short reject"
    )
    max_video_bytes: int = Field(
        200_000_000, gt=0, description="video: larger video files and tar members are rejected unread"
    )
    image_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    url_column: str | None = None
    image_size: int = Field(256, gt=0, description="shorter side of the stored images, in pixels")
    min_image_size: int = Field(32, gt=0)
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    max_image_pixels: int = Field(25_000_000, gt=0, description="decompression-bomb guard")
    max_image_bytes: int = Field(
        20_000_000, gt=0, description="larger image files and tar members are rejected unread"
    )
    max_annotation_bytes: int = Field(
        readers.MAX_ENTRY_BYTES,
        gt=0,
        description="json/urls: longer JSON lines or entries are rejected unread",
    )
    jpeg_quality: int = Field(95, ge=1, le=100)
    max_words: int = Field(30, gt=0, description="captions are cut to this many words")
    dedupe: bool = True
    rows_per_shard: int = Field(10_000, gt=0, description="rows per output data file")
    rows_per_unit: int = Field(
        1_000,
        gt=0,
        description="json/urls/video: entries (about, for text files) per work unit; "
        f"video annotations: {VIDEO_ROWS_PER_UNIT} unless set",
    )
    splits: list[str] | None = Field(
        None,
        description="json: keep only entries whose `split` is listed (Karpathy: train, restval, val, test)",
    )
    num_workers: int | None = Field(
        None, gt=0, description="concurrent ingest tasks; default: every cluster CPU"
    )
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    overwrite: bool = Field(
        False, description="clear the output first (else its recorded settings must match)"
    )
    # Storage access; default is the usual environment. Secrets are never printed, and never put
    # in a Ray runtime environment (see `credentials_env`).
    s3_endpoint_url: str | None = None
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_region: str | None = None

    @classmethod
    def from_yaml(cls, text_or_uri: str, **overrides) -> IngestConfig:
        """Load a YAML file (URI) or YAML text; `overrides` (non-None) replace its keys."""
        text = (
            storage.read_text(text_or_uri)
            if "\n" not in text_or_uri and storage.exists(text_or_uri)
            else text_or_uri
        )
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"ingest config must be a YAML mapping, got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)

    def limits(self) -> ImageLimits:
        return ImageLimits(
            resolution=self.image_size,
            min_size=self.min_image_size,
            max_aspect_ratio=self.max_aspect_ratio,
            max_pixels=self.max_image_pixels,
            max_bytes=self.max_image_bytes,
            jpeg_quality=self.jpeg_quality,
        )

    def unit_rows(self) -> int:
        """Entries per work unit: `rows_per_unit`, except that video annotations, a clip being a
        hundred images' work, default to VIDEO_ROWS_PER_UNIT (an MSRVTT test file of 1,000 lines
        then spreads over the workers)."""
        if self.format == "video" and "rows_per_unit" not in self.model_fields_set:
            return VIDEO_ROWS_PER_UNIT
        return self.rows_per_unit

    def video_limits(self) -> video.VideoLimits:
        limits = dataclasses.replace(self.limits(), max_bytes=self.max_video_bytes)
        return video.VideoLimits(limits, self.num_frames, self.frame_sampling, self.min_video_frames)

    def settings(self) -> dict:
        """What shapes the written rows and their layout: recorded with an output, and a re-run
        into it must match. Left out: parallelism, credentials, and the download timeouts and
        retries (a re-run with more patience may finish an output)."""
        data = self.model_dump(
            mode="json",
            exclude={
                "output", "num_workers", "overwrite", "s3_endpoint_url", "aws_access_key_id",
                "aws_secret_access_key", "aws_region", "download",
            },
        )  # fmt: skip
        data["input"] = self.input.rstrip("/")
        data["rows_per_unit"] = self.unit_rows()  # the units' layout, however it was set
        data["download_max_bytes"] = self.download.max_bytes
        data["schema"] = DATA_SCHEMA.names
        return data

    def storage_env(self) -> dict[str, str]:
        """The storage settings every process of the ingest shares, none of them secret: the S3
        endpoint and region of the config, and this process's GCS emulator and retry settings.
        Workers get them in their Ray runtime environment, which the dashboard and `ray job list`
        show: credentials never go there (see `credentials_env`)."""
        env = {
            "AWS_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_DEFAULT_REGION": self.aws_region,
            "AWS_REGION": self.aws_region,
            # A GCS emulator (tests, local development) must reach the workers too.
            "STORAGE_EMULATOR_HOST": os.environ.get("STORAGE_EMULATOR_HOST"),
            **storage.settings_env(),
        }
        return {k: v for k, v in env.items() if v}

    def credentials_env(self) -> dict[str, str]:
        """The AWS keys of the config, for this process's environment only. A local Ray instance
        started after they are set inherits them; on a cluster, workers use their node's own
        credentials (instance role / workload identity, or the node's environment)."""
        env = {
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id.get_secret_value()
            if self.aws_access_key_id
            else None,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key.get_secret_value()
            if self.aws_secret_access_key
            else None,
        }
        return {k: v for k, v in env.items() if v}


def format_validation_error(err: ValidationError) -> str:
    """'key: problem' lines naming each bad key, for CLI errors."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())


# ---- per-record processing ---------------------------------------------------------------------
@dataclasses.dataclass
class UnitCounts:
    read: int = 0
    bytes_read: int = 0
    skipped: int = 0  # json entries not selected by `splits` (not rows of this ingest)
    downloads: Counter = dataclasses.field(default_factory=Counter)


def _content_hash(rec: dict, images: list[bytes], caption: str, question: str | None) -> str:
    """Exact-duplicate identity: every image's bytes, the cleaned text and the task fields."""
    h = hashlib.sha256()
    for image in images:
        h.update(hashlib.sha256(image).digest())
    task = [rec.get(c) for c in ("raw_answers", "bbox", "label")]
    h.update(b"\0" + caption.encode() + b"\0" + (question or "").encode() + b"\0" + json.dumps(task).encode())
    return h.hexdigest()


def _poster(clip: video.ProcessedVideo) -> ProcessedImage:
    """A processed video as its row's primary image: the middle sampled frame."""
    return ProcessedImage(clip.poster, clip.width, clip.height, clip.width / max(1, clip.orig_width),
                          clip.orig_width, clip.orig_height)  # fmt: skip


def _process_cached(data: bytes | None, uri: str | None, limits, cache: dict, process=process_image):
    """`process` (process_image, or video.process_video for a video), once per file and unit
    (COCO: five captions share one image; MSRVTT: twenty one video)."""
    cached = cache.get(uri) if uri else None
    if cached is None:
        try:
            cached = process(data, limits)
        except ImageRejected as err:
            cached = err
        if uri:
            cache[uri] = cached
    if isinstance(cached, ImageRejected):
        raise cached
    return cached


def _finish_record(
    rec: dict, cfg: IngestConfig, limits: ImageLimits, row: int, cache: dict
) -> tuple[dict | None, dict | None]:
    """A raw record → (clean row, None) or (None, reject). Checks run cheapest first."""
    key = str(rec.get("key"))
    if "_reject" in rec:
        reason, detail = rec["_reject"]
        return None, {"key": key, "reason": reason, "detail": detail}
    caption, question = rec.get("caption"), rec.get("question")
    for name, value in (("caption", caption), ("question", question)):
        if value is not None and not isinstance(value, str):
            return None, {
                "key": key,
                "reason": "bad_record",
                "detail": f"{name} is {type(value).__name__}, not text",
            }
    caption = clean_caption(caption or "", cfg.max_words)
    question = clean_caption(question, cfg.max_words) if question else None
    if not caption and not question:
        return None, {"key": key, "reason": "empty_caption", "detail": f"raw caption {rec.get('caption')!r}"}
    # A multi-image row (NLVR2) has `images`; every row has a primary image, the first. A video
    # row's primary image is its middle sampled frame.
    multi = rec.get("images") is not None
    clip = None
    if "video" in rec:
        blobs, uri = [rec["video"]], (rec.get("_image_uris") or [None])[0]
        try:
            clip = _process_cached(rec["video"], uri, cfg.video_limits(), cache, video.process_video)
        except ImageRejected as err:
            return None, {"key": key, "reason": err.reason, "detail": f"{uri or 'video'}: {err.detail}"}
        processed = [_poster(clip)]
    else:
        blobs = rec["images"] if multi else [rec.get("image")]
        uris = rec.get("_image_uris") or [None] * len(blobs)
        processed = []
        for n, (data, uri) in enumerate(zip(blobs, uris)):
            try:
                processed.append(_process_cached(data, uri, limits, cache))
            except ImageRejected as err:
                which = f"image {n} ({uri or 'inline'}): " if multi else ""
                return None, {"key": key, "reason": err.reason, "detail": which + err.detail}
    first = processed[0]
    bbox = rec.get("bbox")
    return {
        "key": key,
        "image": first.jpeg,
        "caption": caption,
        "url": rec.get("url"),
        "width": first.width,
        "height": first.height,
        "image_id": None if rec.get("image_id") is None else str(rec["image_id"]),
        "question": question,
        "answers": rec.get("answers"),
        "answer_weights": rec.get("answer_weights"),
        "bbox": [float(v) * first.scale for v in bbox] if bbox else None,
        "label": None if rec.get("label") is None else str(rec["label"]),
        "orig_width": first.orig_width,
        "orig_height": first.orig_height,
        "raw_answers": rec.get("raw_answers"),
        "dataset": rec.get("dataset"),
        "images": [p.jpeg for p in processed] if multi else None,
        "frames": list(clip.frames) if clip is not None else None,
        "_dedup": _content_hash(rec, blobs, caption, question),
        "_row": row,
    }, None


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _load_image(refs: list[str], max_bytes: int) -> tuple[bytes | None, str, tuple[str, str] | None]:
    """(bytes or None, the URI used, (reject reason, detail) when None) for the first existing of
    the candidate URIs. A file over `max_bytes` is refused after max_bytes + 1 bytes."""
    why = ("missing_image", "")
    for uri in refs:
        try:
            return storage.read_bytes(uri, max_bytes=max_bytes), uri, None
        except FileNotFoundError:
            why = ("missing_image", f"no file at {' or '.join(refs)}")
        except storage.ObjectTooLarge as err:
            return None, uri, ("too_large", f"{err} (max_image_bytes; not read further)")
        except storage.StorageError as err:
            return None, uri, ("storage_error", str(err))
        except OSError as err:  # not a store failure: a local path that is a folder, ...
            return None, uri, ("missing_image", f"{uri}: {type(err).__name__}: {err}")
    return None, refs[0], why


def _annotation_records(unit: readers.Unit, cfg: IngestConfig, counts: UnitCounts) -> Iterator[dict]:
    """Rows of an annotation unit in task-format order, images read concurrently per batch."""

    videos = unit.kind == "video"
    read_entry = video.entry_rows if videos else formats.entry_rows
    root = (cfg.video_root if videos else cfg.image_root) or ""

    def rows() -> Iterator[dict]:
        entries = readers.read_json_unit(unit, cfg.max_annotation_bytes)
        for idx, entry in enumerate(readers.guarded(unit, entries)):
            fallback = f"{unit.unit_id}-{idx:06d}"
            if isinstance(entry, readers.OversizedEntry):
                yield {"key": fallback, "_reject": ("too_large", str(entry))}
            elif isinstance(entry, ValueError):
                yield {"key": fallback, "_reject": ("bad_record", str(entry))}
            elif isinstance(entry, readers.FaultRecord):
                yield dict(entry)
            elif not formats.selected(entry, cfg.splits):
                counts.skipped += 1
            else:
                yield from read_entry(entry, fallback, root, cfg.allow_image_paths_outside_root)

    # Object-store reads are latency bound: fetch a batch's images concurrently. Videos are
    # large: a batch holds as many as there are threads, so memory stays within
    # threads x max_video_bytes.
    size, max_bytes = (cfg.download.threads, cfg.max_video_bytes) if videos else (256, cfg.max_image_bytes)
    with ThreadPoolExecutor(max_workers=cfg.download.threads) as pool:
        for batch in _batches(rows(), size):
            refs = {tuple(r) for rec in batch for r in rec.get("_image_refs", [])}
            loaded = dict(zip(refs, pool.map(lambda r: _load_image(list(r), max_bytes), refs)))
            for rec in batch:
                image_refs = rec.pop("_image_refs", None)
                if image_refs is None:
                    yield rec
                    continue
                results = [loaded[tuple(r)] for r in image_refs]
                why = next((why for data, _, why in results if data is None), None)
                if why is not None:
                    rec["_reject"] = why
                elif videos:
                    rec["video"] = results[0][0]
                elif len(results) > 1:
                    rec["images"] = [data for data, _, _ in results]
                else:
                    rec["image"] = results[0][0]
                rec["_image_uris"] = [uri for _, uri, _ in results]
                yield rec


def _url_records(unit: readers.Unit, cfg: IngestConfig, counts: UnitCounts) -> Iterator[dict]:
    """Rows of a URL-list unit, downloaded a batch at a time (memory stays bounded)."""
    rows = readers.guarded(unit, readers.read_url_unit(unit, cfg.max_annotation_bytes))
    for batch in _batches(rows, max(64, cfg.download.threads * 8)):
        todo = [i for i, r in enumerate(batch) if "_reject" not in r]
        results = fetch_all([batch[i]["url"].strip() for i in todo], cfg.download)
        for i, res in zip(todo, results):
            counts.downloads[res.outcome] += 1
            if res.data is None:
                batch[i]["_reject"] = (res.reason, f"{res.outcome}: {res.detail}")
            else:
                batch[i]["image"] = res.data
        yield from batch


def _raw_records(
    unit: readers.Unit, cfg: IngestConfig, cols: readers.Columns | None, counts: UnitCounts
) -> Iterator[dict]:
    if unit.kind == "parquet":
        assert cols is not None
        yield from readers.guarded(unit, readers.read_parquet_unit(unit, cols))
    elif unit.kind == "webdataset":
        yield from readers.guarded(unit, readers.read_webdataset_unit(unit, cfg.max_image_bytes))
    elif unit.kind in ("json", "video"):
        yield from _annotation_records(unit, cfg, counts)
    elif unit.kind == "video_webdataset":
        records = readers.read_webdataset_unit(
            unit, cfg.max_video_bytes, media_exts=video.WDS_VIDEO_EXTS, limit_name="max_video_bytes"
        )
        for rec in readers.guarded(unit, records):
            if "_reject" not in rec:
                rec["video"] = rec.pop("image")
            yield rec
    elif unit.kind == "urls":
        yield from _url_records(unit, cfg, counts)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}; valid: {INPUT_FORMATS}")


def process_unit_records(
    unit: readers.Unit, cfg: IngestConfig, cols: readers.Columns | None, counts: UnitCounts
) -> Iterator[tuple[dict | None, dict | None]]:
    """Read and clean one unit in this process (no Ray), streaming: (clean row, None) or
    (None, reject) per row read. The body of stage A."""
    limits = cfg.limits()
    cache: dict = {}
    # A bound on memory; rows of one image (video) are usually adjacent. A processed video holds
    # num_frames images.
    cache_size = 1024 // cfg.num_frames if unit.kind.startswith("video") else 1024
    for row, rec in enumerate(_raw_records(unit, cfg, cols, counts)):
        counts.read += 1
        for blob in rec.get("images") or [rec.get("video", rec.get("image"))]:
            counts.bytes_read += len(blob) if isinstance(blob, bytes) else 0
        if len(cache) > cache_size:
            cache.clear()
        yield _finish_record(rec, cfg, limits, row, cache)


# ---- storage layout ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    output: str

    def path(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    def staging(self, unit: str, chunk: int) -> str:
        return self.path("_staging", f"{unit}-{chunk:05d}.parquet")

    def data(self, unit: str, chunk: int) -> str:
        return self.path("data", f"{unit}-{chunk:05d}.parquet")

    def marker(self, stage: str, unit: str) -> str:
        return self.path("_state", stage, f"{unit}.json")

    def hashes(self, part: int, unit: str | None = None) -> str:
        folder = self.path("_state", "hashes", f"p{part:02d}")
        return storage.join(folder, f"{unit}.parquet") if unit else folder

    def dups(self, part: int) -> str:
        return self.path("_state", "dups", f"p{part:02d}.parquet")


# Processed shards are written in row groups of this many rows: the training stream's unit of
# reading (`pipelines/data/order.py`), so a worker reads a group's images, not a whole shard's.
DATA_ROW_GROUP_ROWS = 256


def _write_table(uri: str, table: pa.Table, row_group_size: int | None = None) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(uri, data)
    return len(data)


def _read_table(uri: str) -> pa.Table:
    return pq.read_table(pa.py_buffer(storage.read_bytes(uri)))


def stage_a(unit: readers.Unit, cfg: IngestConfig, cols: readers.Columns | None) -> dict:
    """Process one unit and write its staging, rejects, hash partitions and marker."""
    lay = Layout(cfg.output)
    counts = UnitCounts()
    rejects: list[dict] = []
    hashes: list[dict] = []
    pending: list[dict] = []
    chunks = 0
    # Clean rows are staged already cut into the final shards, written as each fills; `_row` (in
    # the hashes) is a row's position among the unit's clean rows, so stage C knows its shard.
    for clean, reject in process_unit_records(unit, cfg, cols, counts):
        if reject is not None:
            rejects.append(reject)
            continue
        clean["_row"] = len(hashes)
        hashes.append(
            {"key": clean["key"], "_dedup": clean["_dedup"], "_unit": unit.unit_id, "_row": clean["_row"]}
        )
        pending.append(clean)
        if len(pending) == cfg.rows_per_shard:
            _write_table(lay.staging(unit.unit_id, chunks), pa.Table.from_pylist(pending, schema=DATA_SCHEMA),
                         DATA_ROW_GROUP_ROWS)  # fmt: skip
            chunks, pending = chunks + 1, []
    if pending:
        _write_table(lay.staging(unit.unit_id, chunks), pa.Table.from_pylist(pending, schema=DATA_SCHEMA),
                     DATA_ROW_GROUP_ROWS)  # fmt: skip
        chunks += 1
    if rejects:
        _write_table(lay.path("rejects", f"{unit.unit_id}.parquet"), rejects_table(rejects))
    if cfg.dedupe and hashes:
        table = pa.Table.from_pylist(hashes, schema=HASH_SCHEMA)
        part_of = np.array([int(h[0], 16) for h in table.column("_dedup").to_pylist()], dtype=np.int64)
        for part in np.unique(part_of):
            _write_table(lay.hashes(int(part), unit.unit_id), table.filter(pa.array(part_of == part)))
    summary = {
        "unit": unit.unit_id,
        "read": counts.read,
        "good": len(hashes),
        "chunks": chunks,
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "bytes_read": counts.bytes_read,
        "skipped": counts.skipped,
        "downloads": dict(counts.downloads),
    }
    storage.write_text(lay.marker("a", unit.unit_id), json.dumps(summary))  # commit point
    return summary


def stage_b(part: int, cfg: IngestConfig) -> dict:
    """Find exact duplicates within one hash partition; keep the smallest (key, unit, row)."""
    lay = Layout(cfg.output)
    files = storage.list_files(lay.hashes(part), ".parquet")
    tables = [_read_table(f) for f in files]
    table = pa.concat_tables(tables) if tables else HASH_SCHEMA.empty_table()
    table = table.sort_by(
        [("_dedup", "ascending"), ("key", "ascending"), ("_unit", "ascending"), ("_row", "ascending")]
    )
    dedup = table.column("_dedup").to_pylist()
    keys = table.column("key").to_pylist()
    loser_idx: list[int] = []
    kept_keys: list[str] = []
    kept = ""
    for i, h in enumerate(dedup):
        if i and h == dedup[i - 1]:
            loser_idx.append(i)
            kept_keys.append(kept)
        else:
            kept = keys[i]
    losers = table.take(pa.array(loser_idx, type=pa.int64()))
    out = pa.table(
        {
            "_unit": losers.column("_unit"),
            "_row": losers.column("_row"),
            "key": losers.column("key"),
            "kept": pa.array(kept_keys, pa.string()),
        },
        schema=DUP_SCHEMA,
    )
    _write_table(lay.dups(part), out)
    return {"part": part, "duplicates": out.num_rows}


def stage_c(unit_id: str, cfg: IngestConfig) -> dict:
    """Publish one unit's staged shards without its duplicates, and its duplicate rejects.

    A shard with no duplicate is copied as is (a server-side copy on S3: the image bytes are not
    downloaded again); only shards holding a duplicate are read, filtered and rewritten."""
    lay = Layout(cfg.output)
    staged = json.loads(storage.read_text(lay.marker("a", unit_id)))
    dups: dict[int, tuple[str, str]] = {}  # position among clean rows → (its key, key kept)
    if cfg.dedupe:
        for part in range(HASH_PARTITIONS):
            if not storage.exists(lay.dups(part)):
                continue
            table = _read_table(lay.dups(part))
            mine = table.filter(pc.equal(table.column("_unit"), unit_id)).to_pylist()
            dups.update({d["_row"]: (d["key"], d["kept"]) for d in mine})
    if not storage.is_remote(cfg.output):
        storage.ensure_dir(lay.path("data"))  # object stores have no folders to create
    bytes_written = 0
    for chunk in range(staged["chunks"]):
        src, dst = lay.staging(unit_id, chunk), lay.data(unit_id, chunk)
        first = chunk * cfg.rows_per_shard
        drop = [r - first for r in dups if first <= r < first + cfg.rows_per_shard]
        if not drop:
            fs, src_path = storage.pyarrow_fs(src)
            fs.copy_file(src_path, storage.pyarrow_fs(dst)[1])
            bytes_written += fs.get_file_info(src_path).size
            continue
        table = _read_table(src)
        keep = np.ones(table.num_rows, dtype=bool)
        keep[drop] = False
        bytes_written += _write_table(dst, table.filter(pa.array(keep)), DATA_ROW_GROUP_ROWS)
    if dups:
        rejects = [
            {"key": key, "reason": "duplicate", "detail": f"same image and text as key {kept!r}"}
            for _, (key, kept) in sorted(dups.items())
        ]
        _write_table(lay.path("rejects", f"{unit_id}-duplicates.parquet"), rejects_table(rejects))
    summary = {
        "unit": unit_id,
        "written": staged["good"] - len(dups),
        "duplicates": len(dups),
        "bytes_written": bytes_written,
    }
    storage.write_text(lay.marker("c", unit_id), json.dumps(summary))  # commit point
    return summary


# ---- Ray Data drivers of the stages ------------------------------------------------------------
def _stage_a_batch(batch: dict, cfg_json: str, cols_json: str) -> dict:
    cfg = IngestConfig.model_validate_json(cfg_json)
    cols = readers.Columns(**json.loads(cols_json)) if cols_json else None
    out = [json.dumps(stage_a(readers.Unit(**json.loads(u)), cfg, cols)) for u in batch["item"]]
    return {"summary": out}


def _stage_b_batch(batch: dict, cfg_json: str) -> dict:
    cfg = IngestConfig.model_validate_json(cfg_json)
    return {"summary": [json.dumps(stage_b(int(p), cfg)) for p in batch["item"]]}


def _stage_c_batch(batch: dict, cfg_json: str) -> dict:
    cfg = IngestConfig.model_validate_json(cfg_json)
    return {"summary": [json.dumps(stage_c(str(u), cfg)) for u in batch["item"]]}


def _cfg_json(cfg: IngestConfig) -> str:
    # Secrets travel to workers through runtime_env, never inside the config text.
    return cfg.model_dump_json(exclude={"aws_access_key_id", "aws_secret_access_key"})


def _run_stage(
    name: str, items: list, fn, fn_kwargs: dict, workers: int, env: dict[str, str], tasks: int | None = None
) -> list[dict]:
    """One Ray Data pass over `items` in `tasks` tasks (default: one per item), at most `workers`
    at a time; returns the tasks' summaries."""
    import ray

    if not items:
        return []
    tasks = max(1, min(tasks or len(items), len(items)))
    ds = ray.data.from_items(items, override_num_blocks=tasks).map_batches(
        fn,
        batch_size=None,  # one block (= one task's items) per call
        fn_kwargs=fn_kwargs,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(workers, tasks))),
        num_cpus=1,
        # Config credentials reach the workers as environment, never inside the item text. A
        # retried task (Ray Data retries failed tasks) rewrites its unit's outputs identically.
        runtime_env={"env_vars": env} if env else None,
    )
    ds.set_name(f"ingest-{name}")
    return [json.loads(r["summary"]) for r in ds.take_all()]


def list_units(cfg: IngestConfig) -> tuple[list[readers.Unit], readers.Columns | None]:
    """Split the input into units and resolve its columns (driver side, metadata only)."""
    if cfg.format == "parquet":
        units = readers.parquet_units(cfg.input)
        # Columns from the first file whose footer reads; an unreadable file is its unit's fault.
        errors = []
        for unit in units:
            try:
                names = readers.parquet_schema_names(unit.source)
                break
            except readers.READ_ERRORS as err:
                errors.append(f"{unit.source}: {err}")
        else:
            raise ValueError(f"no readable parquet file among the {len(units)} of {cfg.input!r}: {errors[0]}")
        cols = readers.resolve_columns(
            names,
            image=cfg.image_column,
            caption=cfg.caption_column,
            key=cfg.key_column,
            url=cfg.url_column,
            need_image=True,
        )
        return units, cols
    if cfg.format == "webdataset":
        return readers.webdataset_units(cfg.input), None
    if cfg.format == "video":
        return video_units(cfg), None
    if cfg.format == "json":
        if not cfg.image_root:
            raise ValueError(
                "format 'json' needs image_root (--image-root): the URI image paths are relative to"
            )
        units = readers.json_units(
            cfg.input, cfg.rows_per_unit, formats.check_first_entry, cfg.max_annotation_bytes
        )
        return units, None
    return readers.url_units(
        cfg.input, cfg.rows_per_unit, caption=cfg.caption_column, key=cfg.key_column, url=cfg.url_column,
        max_entry_bytes=cfg.max_annotation_bytes,
    ), None  # fmt: skip


def video_units(cfg: IngestConfig) -> list[readers.Unit]:
    """`--format video`: webdataset tars with a video member, or annotation files (JSON / JSON
    Lines) whose video names are relative to `video_root`."""
    tars = cfg.input.rstrip("/").endswith(".tar") or (
        not cfg.input.rstrip("/").endswith(readers.ANNOTATION_SUFFIXES)
        and any(f.endswith(".tar") for f in storage.list_files(cfg.input))
    )
    if tars:
        units = readers.webdataset_units(cfg.input)
        kind = "video_webdataset"
    else:
        if not cfg.video_root:
            raise ValueError(
                "format 'video' with annotation files needs video_root (--video-root): the URI video "
                "names are relative to"
            )
        units = readers.json_units(
            cfg.input, cfg.unit_rows(), video.check_first_entry, cfg.max_annotation_bytes
        )
        kind = "video"
    for unit in units:
        unit.kind = kind
    return units


def _markers(lay: Layout, stage: str) -> dict[str, dict]:
    files = storage.list_files(lay.path("_state", stage), ".json")
    with ThreadPoolExecutor(max_workers=16) as pool:
        return {m["unit"]: m for m in pool.map(lambda f: json.loads(storage.read_text(f)), files)}


def collect_stats(cfg: IngestConfig, units: list[str]) -> dict:
    """Totals from the markers of `units`; raises if the books do not balance."""
    lay = Layout(cfg.output)
    a, c = _markers(lay, "a"), _markers(lay, "c")
    by_reason: Counter = Counter({r: 0 for r in REJECT_REASONS})
    downloads: Counter = Counter()
    read = written = bytes_read = bytes_written = skipped = 0
    for u in units:
        read += a[u]["read"]
        skipped += a[u].get("skipped", 0)
        by_reason.update(a[u]["rejected_by_reason"])
        downloads.update(a[u].get("downloads", {}))
        bytes_read += a[u]["bytes_read"]
        written += c[u]["written"]
        by_reason["duplicate"] += c[u]["duplicates"]
        bytes_written += c[u]["bytes_written"]
    rejected = sum(by_reason.values())
    if read != written + rejected:
        raise RuntimeError(
            f"ingest books do not balance: read={read} != written={written} + rejected={rejected}"
        )
    stats = {
        "read": read,
        "written": written,
        "rejected": rejected,
        "rejected_by_reason": dict(by_reason),
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
        "units": len(units),
    }
    if cfg.splits:
        stats["skipped_by_split"] = skipped
    if cfg.format == "urls":
        stats["downloads"] = dict(downloads)
    return stats


class SettingsMismatch(ValueError):
    """The output was written with other processing settings."""


def prepare_output(cfg: IngestConfig) -> None:
    """Clear the output (`overwrite`), or check that its recorded settings are this run's, or
    record them if it is new. Runs before any unit is written."""
    lay = Layout(cfg.output)
    if cfg.overwrite:
        for part in ("data", "rejects", "_state", "_staging"):
            storage.delete_dir(lay.path(part))
        if storage.exists(lay.path("stats.json")):
            storage.delete_file(lay.path("stats.json"))
    settings_uri = lay.path("_state", "settings.json")
    mine = cfg.settings()
    if storage.exists(settings_uri):
        recorded = json.loads(storage.read_text(settings_uri))
        if recorded != mine:
            diff = [
                f"{k}: {recorded.get(k, '(unset)')!r} there, {mine.get(k, '(unset)')!r} now"
                for k in sorted(set(recorded) | set(mine))
                if recorded.get(k) != mine.get(k)
            ]
            raise SettingsMismatch(
                f"output {cfg.output!r} was written with other settings ({'; '.join(diff)}): "
                "re-run with the same settings to finish it, pass --overwrite to clear it, or "
                "choose another --output"
            )
        return
    if storage.list_files(lay.path("_state"), ".json") or storage.list_files(lay.path("data"), ".parquet"):
        raise SettingsMismatch(
            f"output {cfg.output!r} holds an ingest without recorded settings (an older version): "
            "pass --overwrite to clear it, or choose another --output"
        )
    storage.write_text(settings_uri, json.dumps(mine, indent=1, sort_keys=True))


def _check_worker_credentials(cfg: IngestConfig) -> None:
    """Warn when the config's AWS key id is not the one Ray workers have: they then use their
    node's credentials (the config's keys are never sent to them). Compared by hash, so the key
    itself is not in the probe task either."""
    import ray

    key = cfg.credentials_env().get("AWS_ACCESS_KEY_ID")
    if key is None:
        return

    @ray.remote(num_cpus=0)
    def key_hash() -> str | None:
        theirs = os.environ.get("AWS_ACCESS_KEY_ID")
        return hashlib.sha256(theirs.encode()).hexdigest() if theirs else None

    if ray.get(key_hash.remote()) != hashlib.sha256(key.encode()).hexdigest():
        log.warning(
            "aws_access_key_id/aws_secret_access_key of the ingest config are used by this driver "
            "only: Ray was started without them, and credentials are never put in a task's runtime "
            "environment. Workers use their node's credentials (instance role, or the environment "
            "`ray start` ran in); see docs/faults-and-trust.md"
        )


def run_ingest(config: IngestConfig) -> dict:
    """Run (or finish) an ingest; returns the stats also written to OUTPUT/stats.json."""
    from pipelines.cluster import init_ray

    t0 = time.perf_counter()
    env = config.storage_env()
    # The driver lists and reads markers through the same storage helper; a local Ray instance
    # started below inherits this environment, credentials included.
    os.environ.update(env | config.credentials_env())
    info = init_ray()
    _check_worker_credentials(config)
    cfg = config
    lay = Layout(cfg.output)
    units, cols = list_units(cfg)  # before prepare_output: a bad input changes nothing
    prepare_output(cfg)
    ids = [u.unit_id for u in units]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"input {cfg.input!r} gives two work units the same id; rename files so stems differ"
        )
    workers = cfg.num_workers or max(1, int(info.cpus))
    done_a, done_c = _markers(lay, "a"), _markers(lay, "c")
    # A unit is redone from scratch if stage A is unfinished, or if C is unfinished and its
    # staging file was already cleaned up.
    todo_c = [u for u in ids if u not in done_c]
    todo_a = [
        u
        for u in units
        if u.unit_id not in done_a
        or (
            u.unit_id in todo_c
            and done_a[u.unit_id]["chunks"]
            and not storage.exists(lay.staging(u.unit_id, 0))
        )
    ]
    log.info(
        "ingest %s (%s) → %s: %d units, %d to process, %d workers",
        cfg.input,
        cfg.format,
        cfg.output,
        len(units),
        len(todo_a),
        workers,
    )
    cfg_json = _cfg_json(cfg)
    cols_json = json.dumps(dataclasses.asdict(cols)) if cols else ""
    t_a = time.perf_counter()
    summaries = _run_stage(
        "decode",
        [json.dumps(dataclasses.asdict(u)) for u in todo_a],
        _stage_a_batch,
        {"cfg_json": cfg_json, "cols_json": cols_json},
        workers,
        env,
    )
    t_a = time.perf_counter() - t_a
    rows_this_run = sum(s["read"] for s in summaries)
    if todo_c and cfg.dedupe:
        # Hashes are small next to images: a group of partitions per task, no more tasks than units.
        parts = list(range(HASH_PARTITIONS))
        _run_stage(
            "dedupe",
            parts,
            _stage_b_batch,
            {"cfg_json": cfg_json},
            workers,
            env,
            tasks=min(workers, len(ids)),
        )
    _run_stage("write", todo_c, _stage_c_batch, {"cfg_json": cfg_json}, workers, env)
    stats = collect_stats(cfg, ids)
    storage.delete_dir(lay.path("_staging"))  # every unit is committed; staged images are spent
    elapsed = time.perf_counter() - t0
    stats.update(
        {
            "input": cfg.input,
            "format": cfg.format,
            "units_processed_this_run": len(todo_a),
            "rows_processed_this_run": rows_this_run,
            "elapsed_s": round(elapsed, 3),
            "decode_stage_s": round(t_a, 3),
            "rows_per_s": round(rows_this_run / elapsed, 2) if elapsed > 0 else 0.0,
            "decode_rows_per_s": round(rows_this_run / t_a, 2) if t_a > 0 and rows_this_run else 0.0,
            "workers": workers,
        }
    )
    storage.write_text(lay.path("stats.json"), json.dumps(stats, indent=2))
    log.info(
        "ingest done: read %d, written %d, rejected %d %s",
        stats["read"], stats["written"], stats["rejected"], {k: v for k, v in stats["rejected_by_reason"].items() if v},
    )  # fmt: skip
    return stats
