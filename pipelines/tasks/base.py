"""What a task is: everything that differs between pretraining and a finetuning task.

The training loop (`pipelines/train/loop.py`), the evaluator (`pipelines/eval/`) and Tune know a
task only through this interface, so adding a task touches none of them:

- `columns`: the processed-shard columns its transforms read;
- `transform(train)`: the Ray Data row transform (a class built once per worker process, and its
  keyword arguments) that turns processed rows into fixed-shape training or evaluation rows;
- `build_model()`: its model (shared towers + its heads) from the job's `MPlugConfig`;
  `after_initial_weights(model)`: what it initialises once those weights are in (a new run only);
- `prepare_step` / `loss` / `after_step`: one optimizer step over a list of micro-batches;
- `predict` / `score`: evaluation (model + eval batches -> per-row predictions -> metrics), and
  its `primary_metric` with its `mode`; a task that scores in two stages (retrieval: ITC ranks
  every pair, then ITM re-scores each query's top k) asks for a `second_pass` over some rows and
  scores what `predict_again` returned. Every evaluator (the training loop's, `mplug evaluate`'s,
  the in-process one of the tests) runs these same steps (`pipelines/eval/passes.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from pipelines.data.transforms import Transform

if TYPE_CHECKING:
    from mplug.config import MPlugConfig
    from pipelines.train.config import TrainConfig
    from pipelines.train.init import InitSource


@dataclass(frozen=True)
class EvalSetup:
    """What evaluating on some data needs besides the rows: `keys`, the rows to predict (None:
    all; captioning predicts once per image, not per reference), and `references`, what
    `score` compares predictions with when the rows alone do not carry it (every caption of
    an image)."""

    keys: frozenset[str] | None = None
    references: Any = None
    # The complete evaluation (`mplug evaluate`): metrics too slow for every epoch (METEOR's JVM).
    thorough: bool = False


@dataclass(frozen=True)
class SecondPass:
    """What a two-stage evaluation asks for after the predictions: read the rows whose key is in
    `keys` again and call `Task.predict_again` on them with `payload` (sent to every worker)."""

    keys: frozenset[str]
    payload: Any


@dataclass(frozen=True)
class StepContext:
    """Where training stands, for losses that depend on it (e.g. ITC distillation's ramp)."""

    step: int  # optimizer steps done before this one
    epoch: int
    steps_per_epoch: int


class Task:
    """Base of every task. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    mode: ClassVar[Literal["max", "min"]] = "max"
    # A finetuning task starts from trained weights (`--init` / `model.init`).
    requires_init: ClassVar[bool] = True
    # `mplug infer` serves it: unlabelled images in, `inference_rows` out.
    batch_inference: ClassVar[bool] = False
    columns: ClassVar[tuple[str, ...]] = ("key", "image", "caption")

    def __init__(self, job: TrainConfig, model_config: MPlugConfig) -> None:
        self.job = job
        self.model_config = model_config

    # ---- data -------------------------------------------------------------------------------
    def transform(self, train: bool) -> Transform:
        raise NotImplementedError

    # ---- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def unused_parameters(self) -> bool:
        """Whether a step may leave parameters without a gradient (DDP must then look for them)."""
        return False

    def model_class(self) -> type:
        """The class whose `from_pretrained` loads this task's exported model."""
        raise NotImplementedError

    def after_initial_weights(self, model: nn.Module, init_architecture: str | None = None) -> list[str]:
        """Called once when a run starts (never on resume), after `model.init` and the tower
        sources are loaded: initialise what those weights never trained. `init_architecture` is
        the model class `model.init` holds (None: unknown or no init; read by the plan). Returns
        log lines."""
        return []

    def check_init(self, source: InitSource) -> None:
        """Raise ValueError when this task cannot start from `source` (`model.init`, resolved by
        the plan before Ray starts)."""

    def flops_per_sample(self) -> float:
        """Model FLOPs of one training sample (forward + backward), for MFU."""
        raise NotImplementedError

    def example_batch(self, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
        """A valid training micro-batch in the stream's row format (tests, benchmarks)."""
        raise NotImplementedError

    # ---- one optimizer step -------------------------------------------------------------------
    def prepare_step(self, model: nn.Module, micro_batches: list[dict], ctx: StepContext) -> Any:
        """Work shared by the step's micro-batches, before any of them runs (no grad): e.g. the
        momentum keys of all of them. `model` is the wrapped (DDP/FSDP) model."""
        return None

    def loss(
        self, model: nn.Module, batch: dict, index: int, prepared: Any, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """(loss to backpropagate, detached values to log, the model output) of micro-batch
        `index`. Call the wrapped `model` (gradient sync hooks live on it)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, prepared: Any, last_output: Any) -> None:
        """After `optimizer.step()`, on the unwrapped model (momentum encoders, queues)."""

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_setup(self, data_uris: list[str]) -> EvalSetup:
        """Read on the driver (or rank 0) before evaluating `data_uris`: see `EvalSetup`."""
        return EvalSetup()

    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        """Per-row predictions of an eval batch (host-side dicts: ids, predictions, targets)."""
        raise NotImplementedError

    def second_pass(self, predictions: list[dict], setup: EvalSetup | None = None) -> SecondPass | None:
        """After every prediction is in: the rows to read again and what to compute on them
        (None: the predictions are all `score` needs)."""
        return None

    def predict_again(self, model: nn.Module, batch: dict, payload: Any) -> list[dict]:
        """Second-pass results of a batch of the rows `second_pass` named."""
        raise NotImplementedError(f"task {self.name!r} asked for a second pass it cannot run")

    def score(
        self, predictions: list[dict], setup: EvalSetup | None = None, rescored: list[dict] | None = None
    ) -> dict[str, float]:
        """Metrics of all predictions (gathered from every worker), and of the second pass's
        results when there was one; `primary_metric` among them."""
        raise NotImplementedError

    def submission(self, predictions: list[dict]) -> list[dict] | None:
        """The predictions as the task's official evaluation server takes them (written as
        OUTPUT/submission.json by `mplug evaluate`); None when it has no such format."""
        return None

    def inference_rows(self, predictions: list[dict]) -> list[dict]:
        """`predict`'s rows as `mplug infer` writes them: `key`, `prediction`, and what the
        prediction answers (the question), for tasks with `batch_inference`."""
        raise NotImplementedError(f"task {self.name!r} has no batch inference")

    def baseline(self, predictions: list[dict], setup: EvalSetup | None = None) -> dict[str, float]:
        """What a trivial predictor scores on the same rows (printed beside the metrics)."""
        return {}
