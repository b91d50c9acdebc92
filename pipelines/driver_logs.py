"""Worker log lines reach the driver once, even where several Ray nodes share one log folder.

Every raylet runs a log monitor that publishes each worker log file of its session's `logs/`
folder to the drivers, from the file's first line. A node that joins on the head's machine
without a `--temp-dir` of its own uses the head's folder (Ray's fake multi-node autoscaler does
so for every node it launches; so does a second `ray start --address` on one host), and then
each of the N monitors publishes every line of every worker: a driver, and so a job's log that
`mplug submit --wait` streams, showed each `[mplug] step` line N times. Ray's own deduplication
lets them through, since the copies come from the same (ip, pid).

`ReplayFilter` keeps one copy. A monitor sends each file in order, in batches of consecutive
lines, so every batch is what comes next for one monitor: copies of lines already shown when
that monitor is behind, new lines when it is ahead. Where a file repeats lines (blank ones, a
warning's continuation line) a batch can be read both ways; the filter holds it (at most HOLD_S)
until later batches say which. It only engages at a node IP where several live nodes share one
session folder; on a cluster whose nodes each have their own machine it passes every batch on at
once and remembers nothing. On simulated monitors (`tests/unit/test_driver_logs.py`), 600 runs
of 2-3 monitors delivering 0-0.2 s apart came out exact; with deliveries up to 0.9 s apart, one
run in 600 showed two repeated lines once more than the file holds.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# How long the count of log monitors per node IP is reused before Ray is asked again.
MONITOR_COUNT_TTL_S = 10.0
# Readings of who sent what that are kept while later batches tell them apart, and how far (in
# lines taken for new) a reading may trail the best before it is dropped.
BEAM = 8
MARGIN_LINES = 12
# A batch whose reading is still open is shown after this long by the best reading.
HOLD_S = 1.0
# A monitor behind is looked for this many lines around its place, at this cost in lines, where
# repeated lines were read the wrong way once.
RESYNC_LINES = 32
RESYNC_COST = 4
# The training loop's step and evaluation lines (`[mplug] step 3/10 …`, `[mplug] eval … (step
# 4)`) name their step: one worker's file never holds the same one twice.
STEP_LINE = re.compile(r"\[mplug\] (step|eval) ")


@dataclass(frozen=True)
class _Reading:
    """One account of which monitor sent each held batch: where each monitor is in the file,
    the lines taken for new (after those shown), and per held batch how many leading lines
    were copies. `cost`: lines taken for new; the account with the fewest is the likeliest."""

    cost: int
    monitors: tuple[int, ...]
    new: tuple[int, ...]
    copied: tuple[int, ...]


@dataclass
class _Stream:
    """One worker log file (ip, pid, stdout or stderr) as the driver has received it."""

    shown: array = field(default_factory=lambda: array("q"))  # hashes of the lines shown, in order
    readings: list[_Reading] = field(default_factory=lambda: [_Reading(0, (), (), ())])
    held: list[tuple[float, dict, tuple[int, ...]]] = field(default_factory=list)  # (arrived, batch, hashes)
    steps: set = field(default_factory=set)  # hashes of the step lines shown


class ReplayFilter:
    """Drops the copies of worker log lines that further log monitors publish.

    Each monitor sends a file's lines in order, so the lines of a file shown so far and each
    monitor's place in them explain every batch as either what comes next for one monitor (a
    copy), a new monitor's start (a copy from the first line), or new lines. Where lines repeat
    (blank lines, a warning's continuation line) a batch can be read more than one way; those
    readings are kept while later batches tell them apart (the reading that takes the fewest
    lines for new wins), and the batch is shown once they agree, or after HOLD_S.

    `monitors(ip)` says how many log monitors read the log folder of the node at `ip` (1 on any
    ordinary cluster: then every batch passes at once, untouched, and nothing is remembered)."""

    def __init__(
        self, monitors: Callable[[str | None], int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._monitors = monitors
        self._clock = clock
        self._streams: dict[tuple, _Stream] = {}
        self._lock = threading.Lock()
        self._told = False
        self.copies_dropped = 0
        # Shows the held batches older than a given age on the driver (set by install_replay_filter).
        self.flush_to_driver: Callable[[float], None] | None = None

    def filter(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The batches to show now: this one (less its copies) and any held ones now settled."""
        lines = batch.get("lines") or []
        ip = batch.get("ip")
        if not lines:
            return [batch]
        # Every file is followed even while one monitor reads it (a batch then passes at once,
        # whole): a node that joins later replays the files from their first lines.
        readers = max(1, self._monitors(ip))
        key = (ip, batch.get("pid"), bool(batch.get("is_err")))
        with self._lock:
            stream = self._streams.setdefault(key, _Stream())
            hashes = tuple(hash(line) for line in lines)
            stream.held.append((self._clock(), batch, hashes))
            stream.readings = self._read(stream, hashes, readers)
            out = self._settle(stream, hold_s=HOLD_S)
            for other in self._streams.values():
                if other is not stream:
                    out += self._settle(other, hold_s=HOLD_S)
        if self.copies_dropped and not self._told:
            self._told = True
            log.warning(
                "%d Ray nodes at %s share one log folder, so each worker line reaches this driver %d times: "
                "showing it once",
                readers, ip, readers,
            )  # fmt: skip
        return out

    def flush(self, hold_s: float = 0.0) -> list[dict[str, Any]]:
        """Held batches older than `hold_s`, by their best reading (0: all of them)."""
        with self._lock:
            return [b for stream in self._streams.values() for b in self._settle(stream, hold_s)]

    @staticmethod
    def _read(stream: _Stream, batch: tuple[int, ...], readers: int) -> list[_Reading]:
        shown, n = stream.shown, len(batch)
        found: dict[tuple, _Reading] = {}
        for r in stream.readings:
            size = len(shown) + len(r.new)

            def lines(pos: int, count: int, r: _Reading = r) -> list[int]:
                head = list(shown[pos : pos + count]) if pos < len(shown) else []
                start = max(0, pos - len(shown))
                return head + list(r.new[start : start + count - len(head)])

            def reading(
                monitor: int | None, pos: int, copied: int, r: _Reading = r, penalty: int = 0
            ) -> _Reading:
                places = list(r.monitors)
                if monitor is None:
                    places.append(pos + n)
                else:
                    places[monitor] = pos + n
                cost = r.cost + n - copied + penalty
                return _Reading(cost, tuple(places), r.new + batch[copied:], r.copied + (copied,))

            options = []
            for i, pos in enumerate(r.monitors):  # what comes next for a monitor behind
                copied = min(n, size - pos)
                if copied >= 1 and lines(pos, copied) == list(batch[:copied]):
                    options.append(reading(i, pos, copied))
                elif pos < size:  # or a little off, where repeated lines were once read the wrong way
                    for near in range(max(0, pos - RESYNC_LINES), min(size, pos + RESYNC_LINES)):
                        copied = min(n, size - near)
                        if lines(near, copied) == list(batch[:copied]):
                            options.append(reading(i, near, copied, penalty=RESYNC_COST))
                            break
            copied = min(n, size)  # a monitor not seen before, from the first line
            if len(r.monitors) < readers and copied >= 1 and lines(0, copied) == list(batch[:copied]):
                options.append(reading(None, 0, copied))
            ahead = [i for i, pos in enumerate(r.monitors) if pos == size]  # new lines
            if ahead:
                options.append(reading(ahead[0], size, 0))
            elif len(r.monitors) < readers:
                options.append(reading(None, size, 0))
            else:  # no monitor was at the end: the counts were off; the furthest one sent it
                options.append(reading(max(range(len(r.monitors)), key=r.monitors.__getitem__), size, 0))
            for o in options:
                state = (tuple(sorted(o.monitors)), o.new)
                if state not in found or o.cost < found[state].cost:
                    found[state] = o
        # Fewest lines taken for new first; of equal ones, the reading in which identical content
        # was new where it came first (the monitor ahead sends a line before the others).
        ranked = sorted(found.values(), key=lambda o: (o.cost, o.copied))
        return [o for o in ranked if o.cost <= ranked[0].cost + MARGIN_LINES][:BEAM]

    def _settle(self, stream: _Stream, hold_s: float) -> list[dict[str, Any]]:
        """Show the oldest held batches whose reading is settled (every reading agrees on it, or
        it has waited `hold_s`: then the best reading's)."""
        out = []
        now = self._clock()
        while stream.held:
            arrived, batch, hashes = stream.held[0]
            best = stream.readings[0]
            if any(r.copied[0] != best.copied[0] for r in stream.readings) and now - arrived < hold_s:
                break
            copied = best.copied[0]
            fresh = len(hashes) - copied
            stream.readings = [
                _Reading(r.cost, r.monitors, r.new[fresh:], r.copied[1:])
                for r in stream.readings
                if r.copied[0] == copied
            ]
            stream.shown.extend(hashes[copied:])
            stream.held.pop(0)
            self.copies_dropped += copied
            lines = _unseen_step_lines(stream, batch["lines"][copied:], hashes[copied:])
            self.copies_dropped += fresh - len(lines)
            if lines:
                out.append(batch if len(lines) == len(batch["lines"]) else {**batch, "lines": lines})
        return out


def _unseen_step_lines(stream: _Stream, lines: list[str], hashes: tuple[int, ...]) -> list[str]:
    """`lines` less the loop's step and evaluation lines this stream has shown already: a second
    one is a monitor's copy whatever the readings made of it (the last step line of a 4-step
    run got through twice once, in test_submit)."""
    kept = []
    for line, h in zip(lines, hashes, strict=True):
        if STEP_LINE.search(line):
            if h in stream.steps:
                continue
            stream.steps.add(h)
        kept.append(line)
    return kept


def log_monitors_by_ip(nodes: list[dict[str, Any]]) -> dict[str, int]:
    """For each node IP, how many live nodes there share one session folder (the most, where
    there are several folders): the log monitors that read each of those nodes' files."""
    groups: Counter = Counter()
    for node in nodes:
        if node.get("Alive"):
            folder = os.path.dirname(
                os.path.dirname(node.get("RayletSocketName") or "")
            )  # session/sockets/raylet
            groups[(node.get("NodeManagerAddress"), folder)] += 1
    by_ip: dict[str, int] = {}
    for (ip, _), count in groups.items():
        by_ip[ip] = max(by_ip.get(ip, 0), count)
    return by_ip


class _CachedMonitorCount:
    """`log_monitors_by_ip(ray.nodes())`, asked again at most every MONITOR_COUNT_TTL_S."""

    def __init__(self) -> None:
        self._by_ip: dict[str, int] = {}
        self._asked = -MONITOR_COUNT_TTL_S

    def __call__(self, ip: str | None) -> int:
        import ray

        now = time.monotonic()
        if now - self._asked > MONITOR_COUNT_TTL_S:
            try:
                self._by_ip = log_monitors_by_ip(ray.nodes())
                self._asked = now
            except Exception as err:  # noqa: BLE001 - a GCS hiccup must not stop the driver's log thread
                self._asked = now - MONITOR_COUNT_TTL_S + 1.0  # ask again in a second
                log.debug("could not count the log monitors per node: %s", err)
        return self._by_ip.get(ip or "", 1)


def install_replay_filter() -> ReplayFilter:
    """Pass the worker log batches this driver prints through a ReplayFilter (once per process).

    Ray's driver hands each batch its log subscriber receives to the handlers of
    `ray._private.worker.global_worker_stdstream_dispatcher` (Ray 2.60; `tests/unit/
    test_driver_logs.py` pins it); the filter sits in front of them."""
    from ray._private import worker

    dispatcher = worker.global_worker_stdstream_dispatcher
    installed = getattr(dispatcher, "mplug_replay_filter", None)
    if installed is not None:
        return installed
    replay = ReplayFilter(_CachedMonitorCount())
    emit = dispatcher.emit

    exiting: list[bool] = []

    def filtered_emit(data: dict[str, Any]) -> None:
        if not exiting:  # registered after ray.init registered its shutdown: at exit, runs first
            exiting.append(True)
            atexit.register(flush_held, 0.0)
        for kept in replay.filter(data):
            emit(kept)

    def flush_held(hold_s: float) -> None:
        for kept in replay.flush(hold_s):
            emit(kept)

    def flush_loop() -> None:  # held batches are shown even when no later batch comes
        while True:
            time.sleep(HOLD_S / 2)
            flush_held(HOLD_S)

    threading.Thread(target=flush_loop, name="mplug_log_replay_flush", daemon=True).start()
    replay.flush_to_driver = flush_held
    dispatcher.emit = filtered_emit
    dispatcher.mplug_replay_filter = replay
    return replay
