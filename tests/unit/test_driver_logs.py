"""Each worker log line reaches the driver once where several Ray nodes share one log folder
(every node of Ray's fake multi-node autoscaler on one machine): each node's log monitor then
publishes every worker file from its first line, and a job's log showed each line 2-3 times."""

from __future__ import annotations

import random

import pytest

from pipelines.driver_logs import ReplayFilter, install_replay_filter, log_monitors_by_ip

pytestmark = pytest.mark.unit


def published(
    files: dict[tuple, list[str]], joins: list[int], rng: random.Random
) -> list[tuple[float, dict]]:
    """What the driver receives, as Ray's log monitors send it (`ray/_private/log_monitor.py`):
    the files grow a few lines at a time; each monitor polls about every 0.1 s and sends each
    file's lines since its last poll, at most 1,000 a batch; a monitor whose node joins later (at tick `joins[m]`)
    sends each file from its first line. A batch arrives 0-0.2 s after it was sent, a monitor's
    batches in order, monitors mixed. Returns (arrival time in seconds, batch)."""
    monitors = len(joins)
    length = {key: 0 for key in files}
    sent = [{key: 0 for key in files} for _ in range(monitors)]
    in_flight: list[list[tuple[int, dict]]] = [[] for _ in range(monitors)]  # (due tick, batch)
    arrived = []
    tick = 0
    while (
        any(length[k] < len(v) for k, v in files.items())
        or any(sent[m][k] < len(files[k]) for m in range(monitors) for k in files)
        or any(in_flight)
    ):
        for key, lines in files.items():  # the workers write
            length[key] = min(len(lines), length[key] + rng.choice([0, 0, 1, 1, 2, 3, 12]))
        for m in range(monitors):  # the monitors poll
            if tick < joins[m] or rng.random() < 0.3:
                continue
            for (pid, is_err), lines in files.items():
                if sent[m][(pid, is_err)] < length[(pid, is_err)]:
                    start = sent[m][(pid, is_err)]
                    end = sent[m][(pid, is_err)] = min(length[(pid, is_err)], start + 1000)
                    due = max([tick + rng.choice([0, 0, 1, 2])] + [d for d, _ in in_flight[m][-1:]])
                    in_flight[m].append((due, {"ip": "10.0.0.1", "pid": pid, "is_err": is_err, "job": "01000000",
                                               "lines": lines[start:end]}))  # fmt: skip
        ready = [m for m in range(monitors) for due, _ in in_flight[m] if due <= tick]
        for m in rng.sample(ready, len(ready)):  # each monitor's own batches stay in order
            arrived.append((tick * 0.1, in_flight[m].pop(0)[1]))
        tick += 1
    return arrived


def file_lines(pid: int, n: int) -> list[str]:  # noqa: ARG001 - one file per worker
    """A worker's file, with the identical lines real ones hold (a warning's continuation line,
    blank lines) among its step lines."""
    lines = []
    for i in range(n):
        lines.append(f"[mplug] step {i + 1}/{n} loss {10 - i * 0.01:.4f}")
        if i % 7 == 3:
            lines += ["  warnings.warn(", ""]
    return lines


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("monitors", [2, 3])
def test_each_line_is_shown_once_in_its_file_order(seed, monitors):
    rng = random.Random(seed)
    files = {
        (pid, is_err): file_lines(pid, rng.randint(30, 300)) for pid in (101, 102) for is_err in (False, True)
    }
    joins = [0] + [rng.randint(1, 60) for _ in range(monitors - 1)]
    now = [0.0]

    def counted(ip: str | None) -> int:
        """What Ray says: the nodes that have joined so far (an autoscaler adds them mid-run)."""
        return sum(tick * 0.1 <= now[0] for tick in joins) if ip == "10.0.0.1" else 1

    replay = ReplayFilter(counted, clock=lambda: now[0])
    shown: dict[tuple, list[str]] = {key: [] for key in files}
    arrived = 0
    for now[0], batch in published(files, joins, rng):
        arrived += len(batch["lines"])
        for kept in replay.filter(batch):
            shown[(kept["pid"], kept["is_err"])] += kept["lines"]
    for kept in replay.flush():
        shown[(kept["pid"], kept["is_err"])] += kept["lines"]
    assert shown == files
    assert replay.copies_dropped == arrived - sum(len(v) for v in files.values()) > 0


def test_nothing_is_filtered_where_each_node_has_its_own_log_folder():
    replay = ReplayFilter(lambda ip: 1)
    batch = {"ip": "10.0.0.1", "pid": 7, "is_err": False, "lines": ["same", "same"]}
    for _ in range(3):  # a worker that prints the same lines again: every copy is its own
        assert replay.filter(batch) == [batch] and replay.filter(batch)[0] is batch
    assert replay.copies_dropped == 0


@pytest.mark.parametrize("monitors", [1, 2])
def test_a_step_line_that_arrives_again_as_new_is_shown_once(monitors):
    """The loop's step and evaluation lines name their step, so a second copy from the same
    worker file is a copy even where the readings took it for new (the last step line of a
    submitted run once came twice); other repeated lines (a warning's, a blank) stay."""
    replay = ReplayFilter(lambda ip: monitors)
    last = ["[mplug] step 4/4 loss 9.9700", "[mplug] eval vqa_acc 0.500 (step 4)", "  warnings.warn(", ""]
    shown = []
    for lines in (["[mplug] step 3/4 loss 9.9800"], last, last[::-1]):  # reversed: no monitor's next
        for kept in replay.filter({"ip": "10.0.0.1", "pid": 7, "is_err": True, "lines": lines}):
            shown += kept["lines"]
    shown += [line for kept in replay.flush() for line in kept["lines"]]
    assert [ln for ln in shown if ln.startswith("[mplug]")] == ["[mplug] step 3/4 loss 9.9800", *last[:2]]
    assert shown.count("  warnings.warn(") == shown.count("") == 2
    assert replay.copies_dropped >= 2


def test_log_monitors_are_counted_per_ip_and_session_folder():
    def node(ip: str, session: str, alive: bool = True) -> dict:
        return {
            "NodeManagerAddress": ip,
            "Alive": alive,
            "RayletSocketName": f"/tmp/ray/{session}/sockets/raylet",
        }

    nodes = [node("10.0.0.1", "session_a"), node("10.0.0.1", "session_a"), node("10.0.0.1", "session_a", False),
             node("10.0.0.2", "session_a"), node("10.0.0.3", "session_b"), node("10.0.0.3", "session_c")]  # fmt: skip
    assert log_monitors_by_ip(nodes) == {"10.0.0.1": 2, "10.0.0.2": 1, "10.0.0.3": 1}


def test_the_filter_sits_in_front_of_rays_driver_log_handlers():
    """Pins the Ray internals it relies on: the driver's log thread hands every batch to
    `global_worker_stdstream_dispatcher.emit`, whose handlers print it."""
    from ray._private import worker

    dispatcher = worker.global_worker_stdstream_dispatcher
    saved_emit, saved = dispatcher.emit, getattr(dispatcher, "mplug_replay_filter", None)
    received = []
    try:
        replay = install_replay_filter()
        assert install_replay_filter() is replay  # once per process
        replay._monitors = lambda ip: 2
        dispatcher.add_handler("test_driver_logs", received.append)
        batch = {"ip": "10.0.0.9", "pid": 5, "is_err": True, "lines": ["a", "b"]}
        worker.global_worker_stdstream_dispatcher.emit(batch)
        worker.global_worker_stdstream_dispatcher.emit(dict(batch, lines=["a"]))  # the second monitor's copy
        worker.global_worker_stdstream_dispatcher.emit(dict(batch, lines=["b", "c"]))
        replay.flush_to_driver(0.0)  # what the flush thread and exit do with held batches
    finally:
        dispatcher.remove_handler("test_driver_logs")
        dispatcher.emit = saved_emit
        if saved is None:
            del dispatcher.mplug_replay_filter
    assert [b["lines"] for b in received] == [["a", "b"], ["c"]]
