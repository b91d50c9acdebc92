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
import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
MANIFEST_FILE = "manifest.json"  # written last: the checkpoint is complete


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
    verify_checkpoint(directory)
    model_state = load_file(directory / MODEL_FILE)
    optim_state = torch.load(directory / OPTIM_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((directory / STATE_FILE).read_text())
    metrics = directory / METRICS_FILE
    history = history_from_csv(metrics.read_text()) if metrics.exists() else []
    rng_file = directory / f"rng_rank{rank}.pt"
    # After an elastic resize a new rank has no saved RNG; it keeps its fresh seed.
    rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
    return LoadedCheckpoint(model_state, optim_state, TrainState(history=history, **meta), rng)


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written completely, or one read back that is incomplete."""


def file_digest(path: Path) -> dict[str, int | str]:
    """{"bytes": size, "sha256": hex digest} of a local file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def upload_checkpoint(local: Path, uri: str, comm) -> None:
    """Write this rank's files of one checkpoint from `local` to `uri`, verify each one's size in
    the store, and once every rank's files are in, have rank 0 write `manifest.json` (every
    file's size and sha256) last: the mark of a complete checkpoint, which `load_state` checks.
    A write that fails after the storage client's retries fails on every rank together (a rank
    alone would leave the others waiting) with one line naming the checkpoint's URI."""
    from pipelines import storage

    mine: dict[str, dict] = {}
    failure = None
    try:
        fs, root = storage.pyarrow_fs(uri)
        if not storage.is_remote(uri):  # object stores need no folders
            storage.ensure_dir(uri)
        for path in sorted(p for p in local.iterdir() if p.is_file()):
            mine[path.name] = file_digest(path)
            target = storage.join(uri, path.name)
            with storage.guard(target, "write"):
                pafs.copy_files(str(path), f"{root}/{path.name}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)  # fmt: skip
            written = storage.file_size(target)
            if written != mine[path.name]["bytes"]:
                raise CheckpointError(f"{target} holds {written} bytes of {mine[path.name]['bytes']}")
    except Exception as err:  # reported below, on every rank
        failure = f"{type(err).__name__}: {_first_line(err)}"
    parts = comm.gather((mine, failure))
    verdict = None
    if parts is not None:  # rank 0: every rank's files are in (or one failed)
        failures = [f for _, f in parts if f]
        if not failures:
            files = {name: digest for part, _ in parts for name, digest in part.items()}
            try:
                storage.write_text(storage.join(uri, MANIFEST_FILE), json.dumps({"files": files}, indent=1))
            except Exception as err:  # reported below, on every rank
                failures.append(f"{type(err).__name__}: {_first_line(err)}")
        verdict = failures[0] if failures else None
    verdict = comm.broadcast(verdict)
    if verdict is not None:
        raise CheckpointError(f"could not write checkpoint {uri}: {verdict}")


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else ""


def verify_checkpoint(directory: Path) -> None:
    """Refuse a checkpoint that is not complete: no manifest (its writing stopped before the
    end), or a file missing or unlike what the manifest says."""
    manifest = directory / MANIFEST_FILE
    if not manifest.exists():
        raise CheckpointError(
            f"checkpoint {directory} has no {MANIFEST_FILE}: it was not written completely (or predates "
            "manifests); start a new run with another --name, or delete this checkpoint folder"
        )
    for name, expected in json.loads(manifest.read_text())["files"].items():
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"checkpoint {directory}: {name} is missing")
        if file_digest(path) != expected:
            raise CheckpointError(f"checkpoint {directory}: {name} differs from what was written")


def checkpointed_strategy(run_uri: str) -> str | None:
    """`scaling.strategy` of the latest complete checkpoint under `run_uri` (a run folder), or None
    when the run has none yet. Checkpoint folders are `checkpoint_<step, 8 digits>`: names sort
    by step; one without its manifest was never completed and is not the run's."""
    from pipelines import storage

    complete = [
        uri.rsplit("/", 1)[0]
        for uri in storage.list_files(run_uri, "/" + MANIFEST_FILE)
        if uri.rsplit("/", 2)[-2].startswith("checkpoint_")
    ]
    if not complete:
        return None
    latest = max(complete, key=lambda uri: uri.rsplit("/", 1)[-1])
    return json.loads(storage.read_text(storage.join(latest, STATE_FILE))).get("strategy", "ddp")
