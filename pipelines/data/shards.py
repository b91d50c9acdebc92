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
import pyarrow.parquet as pq

from pipelines import storage

STREAM_COLUMNS = ["key", "image", "caption", "question"]


def read_shard_rows(batch: dict[str, np.ndarray], rows_per_block: int) -> Iterator[pa.Table]:
    """Stream the `STREAM_COLUMNS` of each listed parquet shard as blocks of `rows_per_block`."""
    for uri in batch["path"]:
        fs, path = storage.pyarrow_fs(str(uri))
        with fs.open_input_file(path) as f:
            shard = pq.ParquetFile(f)
            columns = [c for c in STREAM_COLUMNS if c in shard.schema_arrow.names]
            for record_batch in shard.iter_batches(batch_size=rows_per_block, columns=columns):
                yield pa.Table.from_batches([record_batch])
