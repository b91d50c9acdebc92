"""Training state in and out of a Ray Train checkpoint directory.

Layout of one checkpoint (Ray merges every rank's directory into one):
  model.safetensors     full model state: towers, momentum encoders, ITC queues, temperature
  config.json           the model's config, its class in `architectures` (as `save_pretrained`)
  optimizer.pt          optimizer + scheduler state (rank 0)
  train_state.json      step, epoch, samples seen, world size
  metrics.csv           the logged curve up to this step, so a resumed run continues it
  rng_rank{R}.pt        each rank's torch / numpy / python RNG state

Checkpoints live in shared storage that others can write: everything here loads with
`torch.load(weights_only=True)` (tensors, numbers, strings, lists and dicts; nothing that runs
code when unpickled), safetensors, JSON and CSV.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    # The step the current epoch began at: a resumed run skips the rows of the steps since.
    epoch_start_step: int = 0
    samples_seen: int = 0
    world_size: int = 1
    # "ddp" or "fsdp": the optimizer state's layout differs between them.
    strategy: str = "ddp"
    # Steps this run resumed from (after a worker failure or a relaunch), oldest first.
    resumed_from: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


def rng_state() -> dict:
    """This process's torch / CUDA / numpy / python random states as tensors and plain values
    (what `torch.load(weights_only=True)` accepts)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }  # fmt: skip


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))  # fmt: skip
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def history_to_csv(history: list[dict[str, float]]) -> str:
    if not history:
        return ""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def history_from_csv(text: str) -> list[dict[str, float]]:
    rows = csv.DictReader(io.StringIO(text))
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]


def save_state(
    directory: Path,
    *,
    rank: int,
    model_state: dict[str, torch.Tensor] | None,
    optim_state: dict | None,
    state: TrainState,
    model_config: str | None = None,
) -> None:
    """Write this rank's part. Rank 0 passes the full model state, the optimizer/scheduler state
    and the model's config.json text."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    # Tied weights share storage; safetensors refuses aliases, so store independent copies.
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}, directory / MODEL_FILE
    )
    torch.save(optim_state, directory / OPTIM_FILE)
    if model_config is not None:
        (directory / CONFIG_FILE).write_text(model_config)
    meta = {k: v for k, v in asdict(state).items() if k != "history"}
    (directory / STATE_FILE).write_text(json.dumps(meta, indent=1))
    (directory / METRICS_FILE).write_text(history_to_csv(state.history))


@dataclass
class LoadedCheckpoint:
    model_state: dict[str, torch.Tensor]
    optim_state: dict
    state: TrainState
    rng: dict | None  # this rank's random states (None: a rank the checkpoint did not have)


def load_state(directory: Path, *, rank: int) -> LoadedCheckpoint:
    """Read a checkpoint (nothing in it can run code: see the module docstring). The caller
    applies the model/optimizer state and restores the RNG (`set_rng_state`) when it is ready to
    continue drawing from it."""
    model_state = load_file(directory / MODEL_FILE)
    optim_state = torch.load(directory / OPTIM_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((directory / STATE_FILE).read_text())
    metrics = directory / METRICS_FILE
    history = history_from_csv(metrics.read_text()) if metrics.exists() else []
    rng_file = directory / f"rng_rank{rank}.pt"
    # After an elastic resize a new rank has no saved RNG; it keeps its fresh seed.
    rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
    return LoadedCheckpoint(model_state, optim_state, TrainState(history=history, **meta), rng)


def checkpointed_strategy(run_uri: str) -> str | None:
    """`scaling.strategy` of the latest checkpoint under `run_uri` (a run folder), or None when
    the run has none yet. Checkpoint folders are `checkpoint_<step, 8 digits>`: names sort by step."""
    from pipelines import storage

    states = [
        uri
        for uri in storage.list_files(run_uri, "/" + STATE_FILE)
        if uri.rsplit("/", 2)[-2].startswith("checkpoint_")
    ]
    if not states:
        return None
    latest = max(states, key=lambda uri: uri.rsplit("/", 2)[-2])
    return json.loads(storage.read_text(latest)).get("strategy", "ddp")
