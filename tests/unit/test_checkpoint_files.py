"""A checkpoint is written, verified, then marked complete (its manifest, written last); one that
is not complete, or whose files changed after writing, is refused when read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.distributed import Collective
from pipelines.train.checkpoint import CheckpointError, upload_checkpoint, verify_checkpoint

pytestmark = pytest.mark.unit


def _local_checkpoint(tmp_path: Path) -> Path:
    local = tmp_path / "local"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"weights" * 100)
    (local / "train_state.json").write_text(json.dumps({"step": 3}))
    return local


def test_a_written_checkpoint_carries_a_manifest_of_every_file(tmp_path) -> None:
    target = tmp_path / "runs" / "checkpoint_00000003"
    upload_checkpoint(_local_checkpoint(tmp_path), str(target), Collective())
    manifest = json.loads((target / "manifest.json").read_text())["files"]
    assert manifest["model.safetensors"]["bytes"] == 700 and set(manifest) == {
        "model.safetensors",
        "train_state.json",
    }
    verify_checkpoint(target)  # complete


def test_an_incomplete_or_altered_checkpoint_is_refused(tmp_path) -> None:
    target = tmp_path / "checkpoint_00000003"
    upload_checkpoint(_local_checkpoint(tmp_path), str(target), Collective())
    (target / "model.safetensors").write_bytes(b"weights" * 99)  # a file cut short
    with pytest.raises(CheckpointError, match="model.safetensors differs"):
        verify_checkpoint(target)
    (target / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        verify_checkpoint(target)
    (target / "manifest.json").unlink()  # the writing stopped before its end
    with pytest.raises(CheckpointError, match="not written completely"):
        verify_checkpoint(target)


def test_a_checkpoint_that_cannot_be_written_fails_in_one_line_naming_it(tmp_path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run folder should be")
    target = str(blocked / "checkpoint_00000003")
    with pytest.raises(CheckpointError) as err:
        upload_checkpoint(_local_checkpoint(tmp_path), target, Collective())
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint {target}: ") and "\n" not in message


class _WritesAFile:
    """Unpickling this calls `pathlib.Path.write_text`: what a hostile checkpoint would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.write_text, (pathlib.Path(self.path), "pwned")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_rank0.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, name) -> None:
    """Whoever can write the bucket can rewrite the manifest too: the loads themselves
    (`weights_only=True`) are what keeps a pickled payload from running on resume."""
    import pickle

    import torch

    from pipelines.train.checkpoint import MANIFEST_FILE, TrainState, file_digest, load_state, save_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    local = tmp_path / "local"
    save_state(local, rank=0, model_state=model.state_dict(), optim_state={"optimizer": opt.state_dict()},
               state=TrainState(step=2))  # fmt: skip
    target = tmp_path / "checkpoint_00000002"
    upload_checkpoint(local, str(target), Collective())
    load_state(target, rank=0)  # as written, it loads

    marker = tmp_path / "pwned.txt"
    torch.save({"payload": _WritesAFile(str(marker))}, target / name)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["files"][name] = file_digest(target / name)
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state(target, rank=0)
    assert not marker.exists()


class _Download:
    """A registered checkpoint as Ray hands it to a resume: `as_directory()` downloads it; the
    first `bad` downloads come back with train_state.json altered (what a faulty store did)."""

    def __init__(self, stored: Path, tmp: Path, bad: int) -> None:
        self.path, self.tmp, self.bad, self.downloads = str(stored), tmp, bad, 0

    def as_directory(self):
        import contextlib
        import shutil

        @contextlib.contextmanager
        def download():
            self.downloads += 1
            local = self.tmp / f"download{self.downloads}"
            shutil.copytree(self.path, local)
            if self.downloads <= self.bad:
                (local / "train_state.json").write_text(json.dumps({"step": 999}))
            yield str(local)

        return download()


@pytest.mark.parametrize("bad", [1, 3])
def test_a_resume_reads_a_checkpoint_again_when_the_download_differs(tmp_path, bad) -> None:
    import torch

    from pipelines.train.checkpoint import TrainState, save_state
    from pipelines.train.loop import RESUME_READS, _read_checkpoint

    model = torch.nn.Linear(2, 2)
    local = tmp_path / "local"
    save_state(local, rank=0, model_state=model.state_dict(), optim_state={}, state=TrainState(step=2))
    stored = tmp_path / "checkpoint_00000002"
    upload_checkpoint(local, str(stored), Collective())
    checkpoint = _Download(stored, tmp_path, bad)
    if bad < RESUME_READS:
        assert _read_checkpoint(checkpoint, rank=0).state.step == 2 and checkpoint.downloads == bad + 1
    else:  # the same difference every time: refused, naming the file
        with pytest.raises(CheckpointError, match="train_state.json differs"):
            _read_checkpoint(checkpoint, rank=0)
        assert checkpoint.downloads == RESUME_READS
