"""A task's evaluation as every evaluator runs it, whatever the task: predict every row, gather the
predictions on rank 0, let the task ask for a second pass over some rows (`Task.second_pass`),
run it where the rows are, gather its results, score on rank 0.

The training loop runs it over its ranks' eval shards (`TorchCollective`), the tests in one
process (`Collective`); `mplug evaluate` runs the same steps with Ray Data actors in place of
ranks (`pipelines/eval/evaluate.py`). Rows are read again for the second pass rather than kept:
a worker holds one batch of images at a time, whatever the size of the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pipelines.batches import select_rows
from pipelines.distributed import Collective
from pipelines.tasks.base import EvalSetup, SecondPass, Task

T = TypeVar("T")


def on_root(comm: Collective, work: Callable[[], T]) -> T:
    """`work()` on rank 0, its result on every rank. An error there is raised on every rank
    (the others would otherwise wait in the next collective until it times out)."""
    outcome: tuple[str, Any] | None = None
    if comm.rank == 0:
        try:
            outcome = ("ok", work())
        except Exception as err:  # re-raised below, on every rank
            outcome = ("error", err)
    kind, value = comm.broadcast(outcome)
    if kind == "error":
        if comm.rank == 0:
            raise value
        raise RuntimeError(f"evaluation failed on rank 0: {type(value).__name__}: {value}")
    return value


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # the same on every rank
    predictions: list[dict] | None  # every rank's predictions on rank 0; None elsewhere


def evaluate_batches(
    task: Task,
    model: Any,
    batches: Callable[[], Iterable[dict]],
    comm: Collective,
    setup: EvalSetup | None,
) -> Evaluation:
    """The task's metrics on the rows `batches()` yields on each rank (called once per pass:
    each call iterates the rows anew). Call it under `torch.no_grad()` with the model in eval
    mode."""
    predictions = [row for batch in batches() for row in task.predict(model, batch)]
    parts = comm.gather(predictions)
    everything: list[dict] = [row for part in parts for row in part] if parts is not None else []

    def plan_second() -> SecondPass | None:
        if not everything:
            raise ValueError("no rows to evaluate: the evaluation data is empty")
        return task.second_pass(everything, setup)

    second = on_root(comm, plan_second)
    rescored = None
    if second is not None:
        mine = []
        for batch in batches():
            part = select_rows(batch, second.keys)
            if part is not None:
                mine.extend(task.predict_again(model, part, second.payload))
        parts = comm.gather(mine)
        rescored = [row for part in parts for row in part] if parts is not None else None
    metrics = on_root(comm, lambda: task.score(everything, setup, rescored))
    return Evaluation(metrics, everything if comm.rank == 0 else None)
