"""Read processed parquet shards as Ray Data blocks: the stream's first stage.

Kept apart from `stream.py` on purpose: Ray imports a task function's module in every worker
process that runs it, and this stage needs only pyarrow. Reader processes then skip the
torch/torchvision/transformers imports (~10 s of CPU each on a small machine), which the
transform stage pays once per warm worker.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage

STREAM_COLUMNS = ("key", "image", "caption", "question")


def read_shard_rows(
    batch: dict[str, np.ndarray],
    rows_per_block: int,
    columns: tuple[str, ...] = STREAM_COLUMNS,
    keep_keys: frozenset[str] | None = None,
) -> Iterator[pa.Table]:
    """Stream `columns` of each listed parquet shard as blocks of `rows_per_block` (only rows
    whose `key` is in `keep_keys`, when given). A column a shard lacks (written before the
    column existed) comes as nulls of its schema type, so every block has the same columns."""
    from pipelines.data.records import DATA_SCHEMA

    wanted = pa.array(sorted(keep_keys), pa.string()) if keep_keys is not None else None
    for uri in batch["path"]:
        with storage.open_input_file(str(uri)) as f:
            shard = pq.ParquetFile(f)
            present = [c for c in columns if c in shard.schema_arrow.names]
            missing = [c for c in columns if c not in present]
            for record_batch in shard.iter_batches(batch_size=rows_per_block, columns=present):
                table = pa.Table.from_batches([record_batch])
                if wanted is not None:
                    table = table.filter(pc.is_in(table.column("key"), value_set=wanted))
                    if table.num_rows == 0:
                        continue
                for name in missing:
                    kind = DATA_SCHEMA.field(name).type if name in DATA_SCHEMA.names else pa.null()
                    table = table.append_column(name, pa.nulls(table.num_rows, kind))
                yield table.select(list(columns))


def read_columns(data_uris: list[str], columns: tuple[str, ...]) -> pa.Table:
    """`columns` of every processed shard of the given ingest outputs, as one table (read on the
    caller: for small text columns such as captions and image ids, never images)."""
    from pipelines.data.records import DATA_SCHEMA

    tables = []
    for uri in data_uris:
        for shard in storage.list_files(storage.join(uri, "data"), ".parquet"):
            with storage.open_input_file(shard) as f:
                parquet = pq.ParquetFile(f)
                present = [c for c in columns if c in parquet.schema_arrow.names]
                table = parquet.read(columns=present)
            for name in columns:
                if name not in present:
                    kind = DATA_SCHEMA.field(name).type if name in DATA_SCHEMA.names else pa.null()
                    table = table.append_column(name, pa.nulls(table.num_rows, kind))
            tables.append(table.select(list(columns)))
    if not tables:
        raise FileNotFoundError(f"no processed shards under {data_uris}: run `mplug ingest` first")
    return pa.concat_tables(tables)


def _read_group(path: str, group: int, columns: tuple[str, ...]) -> pa.Table:
    from pipelines.data.records import DATA_SCHEMA

    with storage.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        table = parquet.read_row_group(group, columns=present)
    for name in columns:
        if name not in present:
            kind = DATA_SCHEMA.field(name).type if name in DATA_SCHEMA.names else pa.null()
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
    return table.select(list(columns))


def read_window_rows(
    batch: dict[str, np.ndarray], rows_per_block: int, columns: tuple[str, ...], seed: int, epoch: int
) -> Iterator[pa.Table]:
    """The training stream's reader (`pipelines/data/order.py`): each item is one `Window`
    (JSON); its chunks are read, their rows permuted by the window's seed, the first `skip` rows
    dropped, and every row given `_seed`, its augmentation seed for this epoch."""
    import json

    from pipelines.data.order import row_seed

    groups: dict[tuple[str, int], pa.Table] = {}  # a row group read once for all its chunks
    for item in batch["window"]:
        window = json.loads(str(item))
        parts = []
        for c in window["chunks"]:
            where = (c["path"], c["group"])
            if where not in groups:
                groups[where] = _read_group(c["path"], c["group"], columns)
            parts.append(groups[where].slice(c["start"], c["rows"]))
        table = pa.concat_tables(parts)
        order = np.random.default_rng(window["permutation_seed"]).permutation(table.num_rows)[
            window["skip"] :
        ]
        table = table.take(pa.array(order, pa.int64()))
        seeds = [row_seed(seed, epoch, str(k)) for k in table.column("key").to_pylist()]
        table = table.append_column("_seed", pa.array(seeds, pa.int64()))
        for start in range(0, table.num_rows, rows_per_block):
            yield table.slice(start, rows_per_block)
