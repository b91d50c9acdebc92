"""`run_ingest`: raw image-text pairs in object storage → clean training shards, on Ray Data.

Three stages, each a Ray Data `map_batches` over small work items (the data itself never passes
through the driver; workers read and write storage directly):

A. per *unit* (one input file, or one chunk of an annotation/URL list): read, (download),
   decode, validate, resize, clean captions. Writes the unit's clean rows, cut into shards of
   ≤ rows_per_shard rows, to `_staging/{unit}-{n:05d}.parquet`, its rejects to `rejects/{unit}.parquet`, the (key, content hash) of
   each clean row into 16 hash partitions `_state/hashes/p{h}/{unit}.parquet`, and last a marker
   `_state/a/{unit}.json` with its counts.
B. per hash partition: exact duplicates (same image bytes, same cleaned caption and question)
   meet in one partition; the smallest (key, unit, row) is kept, the others are listed in
   `_state/dups/p{h}.parquet`. A global step without a full shuffle: only hashes move.
C. per unit: publish each staged shard to `data/{unit}-{n:05d}.parquet` — copied as is (server-side
   on S3) unless it holds a listed duplicate, then filtered and rewritten — write
   `rejects/{unit}-duplicates.parquet`, then the marker `_state/c/{unit}.json`.

Every output name is a function of the unit id and every stage is deterministic, so a re-run
of an interrupted ingest skips units whose markers exist, redoes the rest, overwrites partial
files with identical content, and never duplicates a row. Counts come only from the markers:
`read == written + rejected` is checked before `stats.json` is written.
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
from pipelines.data import readers
from pipelines.data.download import DownloadConfig, fetch_all
from pipelines.data.image import ImageLimits, ImageRejected, process_image
from pipelines.data.records import DATA_SCHEMA, REJECT_REASONS, clean_caption, rejects_table

log = logging.getLogger(__name__)

INPUT_FORMATS = ("parquet", "webdataset", "json", "urls")
HASH_PARTITIONS = 16  # one per leading hex digit of the content hash
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
    format: Literal["parquet", "webdataset", "json", "urls"]
    output: str = Field(description="output URI; gets data/, rejects/, stats.json")
    image_root: str | None = Field(None, description="json: URI the annotation's image paths are relative to")
    image_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    url_column: str | None = None
    image_size: int = Field(256, gt=0, description="shorter side of the stored images, in pixels")
    min_image_size: int = Field(32, gt=0)
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    max_image_pixels: int = Field(25_000_000, gt=0, description="decompression-bomb guard")
    max_image_bytes: int = Field(20_000_000, gt=0)
    jpeg_quality: int = Field(95, ge=1, le=100)
    max_words: int = Field(30, gt=0, description="captions are cut to this many words")
    dedupe: bool = True
    rows_per_shard: int = Field(10_000, gt=0, description="rows per output data file")
    rows_per_unit: int = Field(1_000, gt=0, description="json/urls: annotation rows per work unit")
    num_workers: int | None = Field(
        None, gt=0, description="concurrent ingest tasks; default: every cluster CPU"
    )
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    # Storage access; default is the usual environment. Secrets are never printed.
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

    def storage_env(self) -> dict[str, str]:
        env = {
            "AWS_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id.get_secret_value()
            if self.aws_access_key_id
            else None,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key.get_secret_value()
            if self.aws_secret_access_key
            else None,
            "AWS_DEFAULT_REGION": self.aws_region,
            "AWS_REGION": self.aws_region,
        }
        return {k: v for k, v in env.items() if v}


def format_validation_error(err: ValidationError) -> str:
    """'key: problem' lines naming each bad key, for CLI errors."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())


# ---- per-record processing ---------------------------------------------------------------------
@dataclasses.dataclass
class UnitResult:
    good: list[dict]
    rejects: list[dict]
    read: int
    bytes_read: int
    downloads: Counter


def _content_hash(image: bytes, caption: str, question: str | None) -> str:
    h = hashlib.sha256(hashlib.sha256(image).digest())
    h.update(b"\0" + caption.encode() + b"\0" + (question or "").encode())
    return h.hexdigest()


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
    image = rec.get("image")
    # One image file with several captions (COCO) is decoded once per unit.
    cache_key = rec.get("_image_uri")
    try:
        cached = cache.get(cache_key) if cache_key else None
        if isinstance(cached, ImageRejected):
            raise cached
        processed = cached or process_image(image, limits)
        if cache_key:
            cache[cache_key] = processed
    except ImageRejected as err:
        if cache_key:
            cache[cache_key] = err
        return None, {"key": key, "reason": err.reason, "detail": err.detail}
    bbox = rec.get("bbox")
    return {
        "key": key,
        "image": processed.jpeg,
        "caption": caption,
        "url": rec.get("url"),
        "width": processed.width,
        "height": processed.height,
        "image_id": rec.get("image_id"),
        "question": question,
        "answers": rec.get("answers"),
        "answer_weights": rec.get("answer_weights"),
        "bbox": [float(v) * processed.scale for v in bbox] if bbox else None,
        "label": rec.get("label"),
        "_dedup": _content_hash(image, caption, question),
        "_row": row,
    }, None


def _raw_records(
    unit: readers.Unit, cfg: IngestConfig, cols: readers.Columns | None, downloads: Counter
) -> Iterator[dict]:
    if unit.kind == "parquet":
        assert cols is not None
        yield from readers.read_parquet_unit(unit, cols)
    elif unit.kind == "webdataset":
        yield from readers.read_webdataset_unit(unit)
    elif unit.kind == "json":
        pairs = list(readers.json_records(unit, cfg.image_root or ""))
        uris = sorted({u for _, u in pairs if u})

        def load(uri: str) -> bytes | None:
            try:
                return storage.read_bytes(uri)
            except FileNotFoundError:
                return None

        # Object-store reads are latency bound: fetch the chunk's images concurrently.
        with ThreadPoolExecutor(max_workers=cfg.download.threads) as pool:
            blobs = dict(zip(uris, pool.map(load, uris)))
        for rec, uri in pairs:
            if uri is not None and "_reject" not in rec:
                rec["image"] = blobs[uri]
                rec["_image_uri"] = uri
                if rec["image"] is None:
                    rec["_reject"] = ("missing_image", f"no file at {uri}")
            yield rec
    elif unit.kind == "urls":
        entries = list(unit.entries or [])
        todo = [i for i, e in enumerate(entries) if isinstance(e.get("url"), str) and e["url"].strip()]
        results = dict(zip(todo, fetch_all([entries[i]["url"].strip() for i in todo], cfg.download)))
        for i, entry in enumerate(entries):
            rec = dict(entry)
            if i not in results:
                rec["_reject"] = ("bad_record", f"no URL in row (url={entry.get('url')!r})")
            else:
                res = results[i]
                downloads[res.outcome] += 1
                if res.data is None:
                    rec["_reject"] = (res.reason, f"{res.outcome}: {res.detail}")
                else:
                    rec["image"] = res.data
            yield rec
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}; valid: {INPUT_FORMATS}")


def process_unit_records(unit: readers.Unit, cfg: IngestConfig, cols: readers.Columns | None) -> UnitResult:
    """Read and clean one unit in this process (no Ray): the body of stage A."""
    limits = cfg.limits()
    good, rejects, downloads = [], [], Counter()
    read = bytes_read = 0
    cache: dict = {}
    for row, rec in enumerate(_raw_records(unit, cfg, cols, downloads)):
        read += 1
        image = rec.get("image")
        bytes_read += len(image) if isinstance(image, bytes) else 0
        clean, reject = _finish_record(rec, cfg, limits, row, cache)
        if clean is not None:
            good.append(clean)
        else:
            rejects.append(reject)
    return UnitResult(good=good, rejects=rejects, read=read, bytes_read=bytes_read, downloads=downloads)


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


def _write_table(uri: str, table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(uri, data)
    return len(data)


def _read_table(uri: str) -> pa.Table:
    return pq.read_table(pa.py_buffer(storage.read_bytes(uri)))


def stage_a(unit: readers.Unit, cfg: IngestConfig, cols: readers.Columns | None) -> dict:
    """Process one unit and write its staging, rejects, hash partitions and marker."""
    lay = Layout(cfg.output)
    res = process_unit_records(unit, cfg, cols)
    # Clean rows are staged already cut into the final shards; `_row` (in the hashes) is a row's
    # position among the unit's clean rows, so stage C knows which shard holds a duplicate.
    for position, row in enumerate(res.good):
        row["_row"] = position
    staged = pa.Table.from_pylist(res.good, schema=DATA_SCHEMA)
    chunks = 0
    for chunks, start in enumerate(range(0, staged.num_rows, cfg.rows_per_shard), start=1):
        _write_table(lay.staging(unit.unit_id, chunks - 1), staged.slice(start, cfg.rows_per_shard))
    if res.rejects:
        _write_table(lay.path("rejects", f"{unit.unit_id}.parquet"), rejects_table(res.rejects))
    if cfg.dedupe:
        hashes = pa.Table.from_pylist(
            [
                {"key": r["key"], "_dedup": r["_dedup"], "_unit": unit.unit_id, "_row": r["_row"]}
                for r in res.good
            ],
            schema=HASH_SCHEMA,
        )
        part_of = np.array([int(h[0], 16) for h in hashes.column("_dedup").to_pylist()], dtype=np.int64)
        for part in np.unique(part_of):
            _write_table(lay.hashes(int(part), unit.unit_id), hashes.filter(pa.array(part_of == part)))
    summary = {
        "unit": unit.unit_id,
        "read": res.read,
        "good": len(res.good),
        "chunks": chunks,
        "rejected_by_reason": dict(Counter(r["reason"] for r in res.rejects)),
        "bytes_read": res.bytes_read,
        "downloads": dict(res.downloads),
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
        bytes_written += _write_table(dst, table.filter(pa.array(keep)))
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
        names = readers.parquet_schema_names(units[0].source)
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
    if cfg.format == "json":
        if not cfg.image_root:
            raise ValueError(
                "format 'json' needs image_root (--image-root): the URI image paths are relative to"
            )
        return readers.json_units(cfg.input, cfg.rows_per_unit), None
    return readers.url_units(
        cfg.input, cfg.rows_per_unit, caption=cfg.caption_column, key=cfg.key_column, url=cfg.url_column
    ), None


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
    read = written = bytes_read = bytes_written = 0
    for u in units:
        read += a[u]["read"]
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
    if cfg.format == "urls":
        stats["downloads"] = dict(downloads)
    return stats


def run_ingest(config: IngestConfig) -> dict:
    """Run (or finish) an ingest; returns the stats also written to OUTPUT/stats.json."""
    from pipelines.cluster import init_ray

    t0 = time.perf_counter()
    env = config.storage_env()
    os.environ.update(env)  # the driver lists and reads markers through the same storage helper
    info = init_ray()
    cfg = config
    lay = Layout(cfg.output)
    units, cols = list_units(cfg)
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
