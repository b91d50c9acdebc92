"""Experiment tracking (`run.tracking`, `--tracking`): MLflow, TensorBoard and W&B, logged from
world rank 0 inside the training loop, as Ray recommends for Train V2.

One `Tracker` holds the chosen backends; the loop calls it at four points: `start` (once per
worker group, after a resume too), `log_metrics` (every logged row: losses, lr, throughput and,
at the steps that evaluated, the `eval_*` metrics), `log_final_model` (the exported final/ URI)
and `finish`.

Restarts. A run's identity is its run folder: `run_key(STORAGE/RUN)`, a hash of the URI, is the
W&B run id and an MLflow tag (MLflow makes its own run ids), so a restarted worker group or a
relaunched driver finds the same tracked run again. A resumed run restarts at its checkpoint's
step, and the lost attempt may already have logged steps after it: each backend says which step
it already holds last (MLflow: the run's `epoch` history, logged with every row; TensorBoard: the
event files under STORAGE/RUN/tensorboard/) and only rows above it are logged (`new_rows`), so
every step is logged once, its first time. W&B offline cannot be asked: every row from the
checkpoint on is written, and W&B keeps the first value of a step when the attempts' folders are
synced in order (it drops a step below the run's current one).

Failures. Tracking never fails a run: a backend that raises is reported in one log line, its
rows are kept and retried every `retry_s` seconds, and sent in order when it answers again.

Packages (`pip install 'mplug-ray[tracking]'`) are imported only when their backend is chosen;
`check_tracking` refuses a missing one, or an MLflow without a tracking URI, before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.train.config import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("mlflow", "tensorboard", "wandb")
EXTRA = "pip install 'mplug-ray[tracking]'"
# The module each backend imports (its PyPI package has the same name).
_MODULES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}
RUN_KEY_TAG = "mplug.run_key"
FINAL_MODEL_TAG = "mplug.final_model"
# MLflow's own tag for the code version: its UI shows it on the run page.
GIT_COMMIT_TAG = "mlflow.source.git.commit"
PARENT_TAG = "mlflow.parentRunId"
_PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value
# A dead server must not hold every logged row for minutes: MLflow's defaults retry 7 times with
# backoff and wait 120 s a request. A user's own settings win.
_MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class TrackingError(ConfigError):
    """A tracking backend that cannot be used as configured (a missing package, no URI)."""


def missing_package_message(backend: str) -> str:
    return f"--tracking {backend} needs the {_MODULES[backend]} package: {EXTRA}"


def check_tracking(backends: Iterable[str], environ: dict[str, str] | None = None) -> None:
    """Refuse, before Ray starts, a backend whose package is missing, or MLflow without a tracking
    URI the workers can reach (`MLFLOW_TRACKING_URI`: a server, or an absolute `sqlite:`/`file:`
    store; MLflow's default is a folder in each worker's own working directory)."""
    import importlib.util

    env = os.environ if environ is None else environ
    for backend in backends:
        if backend not in BACKENDS:
            raise TrackingError(f"run.tracking: {backend!r} is not one of {BACKENDS}")
        if importlib.util.find_spec(_MODULES[backend]) is None:
            raise TrackingError(missing_package_message(backend))
        if backend == "mlflow":
            uri = env.get("MLFLOW_TRACKING_URI", "")
            if not uri:
                raise TrackingError(
                    "--tracking mlflow: set MLFLOW_TRACKING_URI (a server, http://HOST:5000, or a store every "
                    "worker reaches, e.g. sqlite:////abs/path/mlflow.db)"
                )
            if _relative_store(uri):
                raise TrackingError(
                    f"MLFLOW_TRACKING_URI={uri!r} is a relative path: Ray workers run in folders of their own; "
                    "give an absolute one (sqlite:////abs/path/mlflow.db, file:///abs/path/mlruns)"
                )


def _relative_store(uri: str) -> bool:
    """A local MLflow store given as a relative path (each worker would read it in its own folder)."""
    if uri.startswith("sqlite:///"):
        return not uri[len("sqlite:///") :].startswith("/")
    if uri.startswith("file:"):
        return not uri.startswith("file:/")
    if ":" not in uri and not uri.startswith("databricks"):  # a plain path
        return not uri.startswith("/")
    return False


# ---- what every backend logs -----------------------------------------------------------------------
def flatten_config(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and string values (`optim.lr` → "0.0001"): MLflow params,
    W&B config. Lists and empty sections are JSON; a value longer than MLflow's limit is cut,
    saying so."""
    out: dict[str, str] = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, dotted))
            continue
        text = json.dumps(value) if isinstance(value, dict | list | tuple) else str(value)
        if len(text) > _PARAM_MAX_CHARS:
            text = text[: _PARAM_MAX_CHARS - 20] + " …(cut)"
        out[dotted] = text
    return out


def run_key(run_uri: str) -> str:
    """The tracked run's identity: the same for every attempt of the run in STORAGE/RUN (a worker
    restart, a relaunch), different for any other run folder. 32 hex digits (a W&B run id)."""
    uri = storage.absolute(run_uri).rstrip("/")  # file:///a/b and /a/b are one folder
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def new_rows(rows: Iterable[tuple[int, dict[str, float]]], last_logged: int):
    """The (step, row) pairs a backend that already holds steps up to `last_logged` must still
    get: those above it, once each (-1: it holds none)."""
    for step, row in rows:
        if step > last_logged:
            last_logged = step
            yield step, row


def metric_values(row: dict[str, float]) -> dict[str, float]:
    """A row's values to log at its step (the step itself is the x axis, not a metric), under
    names every backend accepts (MLflow's: letters, digits, `_ - . / :` and spaces)."""
    return {re.sub(r"[^\w.\-/: ]", "_", k): float(v) for k, v in row.items() if k != "step"}


@dataclass(frozen=True)
class RunInfo:
    """What the backends name and tag a run with, from the plan (see `RunInfo.from_plan`)."""

    run_uri: str
    run_name: str
    task: str
    experiment: str
    params: dict[str, str]
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None  # a Tune trial: its search's MLflow run

    @property
    def key(self) -> str:
        return run_key(self.run_uri)

    @classmethod
    def from_plan(cls, plan) -> RunInfo:
        """`plan`: the loop's TrainPlan (its `job` is the full resolved config)."""
        run = plan.job["run"]
        tags = {"mplug.task": plan.task, "mplug.run_name": run["name"], "mplug.run_uri": plan.run_uri}
        tags.update(code_and_job_tags())
        return cls(
            run_uri=plan.run_uri,
            run_name=run["name"],
            task=plan.task,
            experiment=run.get("tracking_experiment") or run["name"],
            params=flatten_config(plan.job),
            tags=tags,
            parent_run_id=run.get("tracking_parent"),
        )


def code_and_job_tags() -> dict[str, str]:
    """The git commit of the code this process runs (when it runs from a git checkout), and the
    Ray job: its id, and the submission id of a job sent with `mplug submit` / the Jobs API."""
    tags: dict[str, str] = {}
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            )
            if done.returncode == 0:
                tags[GIT_COMMIT_TAG] = done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass  # no git on this node: the tag is left out
    try:
        import ray

        if ray.is_initialized():
            tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
            # The Jobs API keeps the submission id in the job's metadata (no public getter).
            config = ray._private.worker.global_worker.core_worker.get_job_config()
            submission = dict(config.metadata).get("job_submission_id")
            if submission:
                tags["ray.submission_id"] = submission
    except (ImportError, AttributeError, RuntimeError, TypeError, ValueError):
        pass  # not in a Ray process, or Ray keeps the job's metadata elsewhere: no Ray tags
    return tags


# ---- backends ---------------------------------------------------------------------------------------
class Backend(ABC):
    """One tracker. Every method may raise (a server gone away): `Tracker` catches and retries."""

    name: str

    @abstractmethod
    def start(self, info: RunInfo) -> int:
        """Open (or find again) the run; return the last step it already holds (-1: none)."""

    @abstractmethod
    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Log each row's values at its step, in order."""

    @abstractmethod
    def log_final_model(self, uri: str) -> None: ...

    @abstractmethod
    def finish(self) -> None: ...


class MLflowBackend(Backend):
    """MLflow through `MlflowClient` (no global active run): the tracking URI as MLflow reads it
    (`MLFLOW_TRACKING_URI`), the experiment `run.tracking_experiment` (default: the run name), one
    run per run folder found again by its `mplug.run_key` tag."""

    name = "mlflow"

    def __init__(self) -> None:
        for key, value in _MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.run_id: str | None = None

    def start(self, info: RunInfo) -> int:
        experiment_id = ensure_experiment(self.client, info.experiment)
        run = find_run(self.client, experiment_id, info.key)
        if run is None:
            tags = {**info.tags, RUN_KEY_TAG: info.key}
            if info.parent_run_id:
                tags[PARENT_TAG] = info.parent_run_id
            run = self.client.create_run(experiment_id, run_name=info.run_name, tags=tags)
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, info.params, run.data.params)
        history = self.client.get_metric_history(self.run_id, "epoch")
        return max((m.step for m in history), default=-1)

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, row in rows for k, v in metric_values(row).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_final_model(self, uri: str) -> None:
        self.client.set_tag(self.run_id, FINAL_MODEL_TAG, uri)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


def ensure_experiment(client, name: str) -> str:
    """The experiment's id, created when missing (two processes may race to create it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_run(client, experiment_id: str, key: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    return runs[0] if runs else None


def log_params(client, run_id: str, params: dict[str, str], existing: dict[str, str]) -> None:
    """Log the params the run does not hold yet (MLflow refuses to change a logged param: a
    relaunch with other settings keeps the first launch's, and says which differ)."""
    from mlflow.entities import Param

    todo = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(todo), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=todo[i : i + 100])
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.info(
            f"[mplug] mlflow: run {run_id} keeps its first launch's params; this launch differs in "
            + ", ".join(changed)
        )


class _MirroredDir:
    """A local folder a writer appends to, and its copy at STORAGE/RUN/<name>/: the folder itself
    when the run folder is local, else a temporary one uploaded file by file (changed files
    only) at each `sync`."""

    def __init__(self, run_uri: str, name: str) -> None:
        self.remote = storage.join(run_uri, name)
        self.uploads = storage.is_remote(run_uri)
        if self.uploads:
            self.local = os.path.join(tempfile.mkdtemp(prefix="mplug-tracking-"), name)
        else:
            self.local = storage.local_path(self.remote)
        os.makedirs(self.local, exist_ok=True)
        self._sent: dict[str, tuple[int, int]] = {}

    def sync(self) -> None:
        if not self.uploads:
            return
        for path in sorted(Path(self.local).rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            stat = path.stat()
            mark = (stat.st_size, stat.st_mtime_ns)
            rel = path.relative_to(self.local).as_posix()
            if self._sent.get(rel) != mark:
                storage.write_bytes(storage.join(self.remote, rel), path.read_bytes())
                self._sent[rel] = mark


class TensorBoardBackend(Backend):
    """Event files under STORAGE/RUN/tensorboard/ (one file per attempt, as TensorBoard names
    them), written by torch's SummaryWriter and uploaded after every row on object storage."""

    name = "tensorboard"

    def __init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard

        self._writer_class = SummaryWriter
        self.writer = None
        self.dir: _MirroredDir | None = None

    def start(self, info: RunInfo) -> int:
        last = last_event_step(storage.join(info.run_uri, "tensorboard"))
        self.dir = _MirroredDir(info.run_uri, "tensorboard")
        self.writer = self._writer_class(log_dir=self.dir.local)
        self.written = last
        if last < 0:
            table = "\n".join(f"| {k} | {v} |" for k, v in info.params.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)
        self._flush()
        return last

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, row in rows:
            if step > self.written:  # written already when only the upload failed
                for key, value in metric_values(row).items():
                    self.writer.add_scalar(key, value, step)
                self.written = step
        self._flush()

    def log_final_model(self, uri: str) -> None:
        self.writer.add_text("final_model", uri)
        self._flush()

    def finish(self) -> None:
        self.writer.close()
        self.dir.sync()

    def _flush(self) -> None:
        self.writer.flush()
        self.dir.sync()


def last_event_step(uri: str) -> int:
    """The last step of any scalar in the TensorBoard event files under `uri` (-1: none), read
    with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = [f for f in storage.list_files(uri) if "tfevents" in f.rsplit("/", 1)[-1]]
    last = -1
    for uri_ in files:
        with tempfile.TemporaryDirectory() as tmp:
            if storage.is_remote(uri_):
                path = os.path.join(tmp, uri_.rsplit("/", 1)[-1])
                Path(path).write_bytes(storage.read_bytes(uri_))
            else:
                path = storage.local_path(uri_)
            for event in EventFileLoader(path).Load():
                if any(_is_scalar(v) for v in event.summary.value):
                    last = max(last, event.step)
    return last


def _is_scalar(value) -> bool:
    return value.HasField("simple_value") or value.metadata.plugin_data.plugin_name == "scalars"


class WandbBackend(Backend):
    """W&B: project `run.tracking_experiment` (default: the run name), run id `run_key` (a resumed
    run continues it), offline when there is no login (`WANDB_MODE` decides when set): the run
    folder then holds wandb/offline-run-*/ for `wandb sync`."""

    name = "wandb"

    def __init__(self) -> None:
        import wandb

        self.wandb = wandb
        self.run = None
        self.dir: _MirroredDir | None = None

    def start(self, info: RunInfo) -> int:
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        self.dir = _MirroredDir(info.run_uri, "wandb")
        self.run = self.wandb.init(
            project=info.experiment, name=info.run_name, id=info.key, resume="allow",
            job_type=info.task, config=info.params, tags=[info.task], dir=os.path.dirname(self.dir.local),
            mode=mode, reinit="create_new", settings=self.wandb.Settings(console="off", silent=True),
        )  # fmt: skip
        self.dir.sync()
        if mode == "offline":
            log.info(
                f"[mplug] wandb: offline (no login here); `wandb sync` uploads {self.dir.remote}/offline-run-*"
            )
        # Resumed online, W&B says where the run's history ends; offline it cannot tell.
        self.written = self.run.step - 1 if self.run.resumed else -1
        return self.written

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, row in rows:
            if step > self.written:  # written already when only the upload failed
                self.run.log(metric_values(row), step=step)
                self.written = step
        self.dir.sync()

    def log_final_model(self, uri: str) -> None:
        self.run.summary["final_model"] = uri

    def finish(self) -> None:
        self.run.finish()
        self.dir.sync()


def wandb_logged_in() -> bool:
    """A W&B API key is at hand: WANDB_API_KEY, or a netrc entry for the W&B host."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def make_backend(name: str) -> Backend:
    """The backend `name`, its package imported now; a missing one raises naming the extra."""
    classes = {"mlflow": MLflowBackend, "tensorboard": TensorBoardBackend, "wandb": WandbBackend}
    try:
        return classes[name]()
    except ModuleNotFoundError as err:
        raise TrackingError(missing_package_message(name)) from err


# ---- the tracker the loop holds ----------------------------------------------------------------------
class _Guarded:
    """One backend behind a fence: its first failure is reported in one line, the rows it could
    not take are kept (up to `max_pending`, in order) and it is tried again `retry_s` seconds
    later; rows go one call each, so a retry never repeats a row the backend took."""

    def __init__(
        self, backend: Backend, retry_s: float, clock: Callable[[], float], max_pending: int
    ) -> None:
        self.backend, self.retry_s, self.clock, self.max_pending = backend, retry_s, clock, max_pending
        self.started = False
        self.last_logged = -1
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.final_model: str | None = None
        self.failed_at: float | None = None  # when the last call failed; None: the backend answers
        self.dropped = 0

    def call(self, what: str, fn: Callable[[], Any], force: bool = False) -> bool:
        """Run `fn` unless the backend is down and not due for a retry (`force`: try anyway);
        False when it did not run or failed."""
        now = self.clock()
        if self.failed_at is not None and not force and now - self.failed_at < self.retry_s:
            return False
        try:
            fn()
        except Exception as err:  # any backend error: tracking never fails the run
            if self.failed_at is None:  # once per outage
                text = str(err).strip()
                log.warning(
                    f"[mplug] tracking: {self.backend.name} failed to {what} ({type(err).__name__}: "
                    f"{text.splitlines()[0][:300] if text else ''}); training goes on, and the rows it "
                    "misses (all in metrics.csv) are sent if it answers again before the run ends"
                )
            self.failed_at = now
            return False
        if self.failed_at is not None:
            log.info(f"[mplug] tracking: {self.backend.name} answers again")
            self.failed_at = None
        return True

    def start(self, info: RunInfo, force: bool = False) -> None:
        def go() -> None:
            self.last_logged = self.backend.start(info)

        self.started = self.call("start the run", go, force)

    def offer(self, info: RunInfo, step: int, row: dict[str, float]) -> None:
        if len(self.pending) >= self.max_pending:
            self.pending.pop(0)
            self.dropped += 1
        self.pending.append((step, row))
        self.flush(info)

    def flush(self, info: RunInfo, force: bool = False) -> bool:
        """Send what is pending; True when nothing is left."""
        if not self.started:
            self.start(info, force)
            if not self.started:
                return False
        for step, row in list(new_rows(self.pending, self.last_logged)):
            if not self.call("log metrics", lambda s=step, r=row: self.backend.log_metrics([(s, r)]), force):
                return False
            self.last_logged = step
            force = False  # one forced try, then the backend's answers decide
        self.pending = []
        if self.final_model is not None:
            if not self.call(
                "log the final model", lambda: self.backend.log_final_model(self.final_model), force
            ):
                return False
            self.final_model = None
        return True


class Tracker:
    """The chosen backends of one run, on world rank 0 (see the module docstring)."""

    def __init__(
        self, backends: list[Backend], *, retry_s: float = 120.0, clock: Callable[[], float] = time.monotonic,
        max_pending: int = 100_000,
    ) -> None:  # fmt: skip
        self.guarded = [_Guarded(b, retry_s, clock, max_pending) for b in backends]
        self.info: RunInfo | None = None

    @classmethod
    def for_plan(cls, plan) -> Tracker | None:
        """The tracker of `plan.job["run"]["tracking"]`, None when no backend is chosen. A package
        missing on this worker is reported and that backend left out."""
        backends = []
        for name in plan.job["run"].get("tracking") or []:
            try:
                backends.append(make_backend(name))
            except TrackingError as err:
                log.warning(f"[mplug] tracking: {err}; training goes on without it")
        return cls(backends) if backends else None

    def start(self, plan_or_info, resumed_from_step: int | None = None) -> None:
        """Open every backend's run (found again after a restart). `resumed_from_step`: the
        checkpoint's step on a resume, None on a fresh start (the backends' own last step decides
        what is logged; it is said in the log)."""
        self.info = plan_or_info if isinstance(plan_or_info, RunInfo) else RunInfo.from_plan(plan_or_info)
        for g in self.guarded:
            g.start(self.info)
            if g.started and resumed_from_step is not None and g.last_logged > resumed_from_step:
                log.info(
                    f"[mplug] tracking: {g.backend.name} already holds steps up to {g.last_logged} (logged before "
                    f"the restart from step {resumed_from_step}): logging from step {g.last_logged + 1} on"
                )

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        clean = {k: v for k, v in row.items() if isinstance(v, int | float) and not math.isnan(v)}
        for g in self.guarded:
            g.offer(self.info, step, clean)

    def log_final_model(self, uri: str) -> None:
        for g in self.guarded:
            g.final_model = uri
            g.flush(self.info)

    def finish(self) -> None:
        """Send what is still pending (one more try, whatever the retry clock says) and close
        every backend's run."""
        for g in self.guarded:
            if g.flush(self.info, force=True):
                g.call("close the run", g.backend.finish, force=True)
            if g.dropped:
                log.warning(f"[mplug] tracking: {g.backend.name} missed {g.dropped} older row(s) while down")
