"""The training order: which rows each worker reads in each epoch, in which order, and which
augmentation draws they get — a function of (seed, epoch, worker count) and the data alone.

The unit of order is a *chunk*: consecutive rows of one parquet row group of a processed shard
(ingest writes groups of 256 rows). Chunks are whole groups on large data; on small data they
are cut finer (`chunk_rows`), so every rank gets at least 16 and the ranks' shares stay within
one chunk of each other. Each epoch:

1. the chunks are permuted with a generator seeded by (seed, epoch) and dealt, in that order, each
   to the rank holding the fewest rows so far (ties: the lowest rank), so the ranks' shares stay
   within one chunk of each other;
2. a rank reads its chunks in that order, `window` chunks at a time, and permutes the rows of each
   window with a generator seeded by (seed, epoch, rank, window index): a shuffle buffer of
   `window` × 256 rows whose content and order are fixed;
3. every row carries a seed hashed from (seed, epoch, key) that the row transform uses for its
   random crop, flip and RandAugment, so the same row is augmented the same way in every run
   and differently in every epoch.

So the rows a rank sees in an epoch form a fixed sequence; a run resumed from a checkpoint taken
after k optimizer steps of an epoch skips the first k × batch × accumulation rows of each rank's
sequence (row granularity) and continues exactly there: no row is seen twice or skipped in that
epoch. This holds when the run resumes with the same worker count; after an elastic resize the
interrupted epoch restarts from its first row on the new ranks.

Pure Python + pyarrow + numpy: the driver plans, Ray Data reader tasks execute.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from pipelines import storage

ROWS_PER_CHUNK = 256


def chunk_rows(total_rows: int, workers: int) -> int:
    """Rows per chunk: a whole row group (256) unless that leaves a rank fewer than 16 chunks
    (a rank reads a chunk's whole group, so finer chunks cost reads, never correctness)."""
    return int(min(ROWS_PER_CHUNK, max(8, total_rows // max(1, 16 * workers))))


@dataclass(frozen=True)
class Chunk:
    """Rows `start` .. `start + rows` of `path`'s row group `group`."""

    path: str
    group: int
    start: int
    rows: int


def _chunks_of(path: str, rows_per_chunk: int) -> list[Chunk]:
    with storage.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    out = []
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        out.extend(Chunk(path, g, s, min(rows_per_chunk, n - s)) for s in range(0, n, rows_per_chunk))
    return out


def plan_chunks(files: list[str], rows_per_chunk: int = ROWS_PER_CHUNK, threads: int = 16) -> list[Chunk]:
    """Every row of the shards as chunks, in file order (footers only: no image is read)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        per_file = list(pool.map(lambda f: _chunks_of(f, rows_per_chunk), files))
    chunks = [c for groups in per_file for c in groups if c.rows > 0]
    if not chunks:
        raise ValueError(f"the {len(files)} processed shards hold no rows")
    return chunks


def row_seed(seed: int, epoch: int, key: str) -> int:
    """A row's augmentation seed for an epoch: the same in every process and every run."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class Window:
    """What one reader task reads: chunks, the seed of its row permutation, and how many rows of
    the permuted window to skip (a resumed epoch's first window)."""

    chunks: tuple[Chunk, ...]
    permutation_seed: tuple[int, ...]
    skip: int = 0

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks) - self.skip


def rank_windows(
    chunks: list[Chunk], *, seed: int, epoch: int, rank: int, world: int, window: int, skip_rows: int = 0
) -> list[Window]:
    """Rank `rank`'s reading plan for `epoch`, its first `skip_rows` rows left out."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is not in [0, {world})")
    order = np.random.default_rng([seed, epoch]).permutation(len(chunks))
    held = [0] * world
    mine = []
    for i in order:
        to = held.index(min(held))
        held[to] += chunks[i].rows
        if to == rank:
            mine.append(chunks[i])
    windows = []
    for n, start in enumerate(range(0, len(mine), window)):
        group = tuple(mine[start : start + window])
        size = sum(c.rows for c in group)
        if skip_rows >= size:  # the whole window was read before the checkpoint
            skip_rows -= size
            continue
        windows.append(Window(group, (seed, epoch, rank, n), skip_rows))
        skip_rows = 0
    return windows


def rank_rows(chunks: list[Chunk], *, seed: int, epoch: int, rank: int, world: int, window: int) -> int:
    """Rows rank `rank` reads in `epoch` (the same for every epoch: one chunk more or less than its peers)."""
    return sum(
        w.rows for w in rank_windows(chunks, seed=seed, epoch=epoch, rank=rank, world=world, window=window)
    )
