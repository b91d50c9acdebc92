"""`mplug tune`: hyperparameter search over a task's finetuning, on Ray Tune + Ray Train V2.

Ray 2.60 refuses `Tuner(TorchTrainer)`; each trial is a Tune *function* that builds its own
trainer through the training core (`plan_run` → `build_trainer` with the trial's sampled
overrides → `fit`), passes Train's reports to Tune with Ray's `TuneReportCallback`, and names its
Train run after the trial id (no timestamp), so a restarted trial resumes from its own
checkpoints. ASHA stops weak trials on the task's primary metric with the *epoch* as its time
(Tune's iteration count restarts at 1 after a restore); Optuna can propose the samples.

Layout of STORAGE/SEARCH/: Tune's experiment state and trial folders, each trial's Train run
(`<trial id>/`: checkpoints, metrics.csv, curves.png, final/), and after the search
`results.csv`, `best.yaml` (a complete config for `mplug finetune --config`) and `search.png`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import yaml

from pipelines import storage
from pipelines.train.config import ConfigError, TrainConfig
from pipelines.tune.space import SearchSpace, apply_sample, validate_space

SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")


@dataclass(frozen=True)
class SearchPlan:
    """Everything the search needs, validated before Ray starts."""

    task: str
    base: dict  # TrainConfig.model_dump(mode="json")
    space_source: str
    storage: str
    name: str
    num_samples: int
    max_concurrent: int | None  # None: what the cluster holds (worked out once Ray is up)
    scheduler: str
    search: str
    metric: str  # the reported key, e.g. "eval_vqa_accuracy"
    mode: str
    max_epochs: int
    trial_cpus: float
    trial_gpus: float
    trial_retries: int
    transform_tasks: int = 1  # per trial's stream; set from the cluster when the search starts
    # The search's MLflow run, set when it starts (pipelines/tune/tracking.py).
    tracking_parent: str | None = None

    @property
    def uri(self) -> str:
        return storage.join(self.storage, self.name)


def _epochs_of(job: TrainConfig, plan) -> int:
    return max(1, math.ceil(plan.total_steps / plan.steps_per_epoch))


def plan_search(
    base: TrainConfig,
    space: SearchSpace,
    *,
    storage_uri: str,
    name: str,
    num_samples: int = 4,
    max_concurrent: int | None = None,
    scheduler: str = "asha",
    search: str = "random",
    trial_retries: int = 1,
) -> SearchPlan:
    """Validate the base job, the space against it, the data and the search options."""
    from pipelines.tasks import task_class
    from pipelines.train.launch import absolute_paths, plan_run

    base = absolute_paths(base)  # trials plan in their own folders: relative paths mean this one's
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {scheduler!r}: choose one of {SCHEDULERS}")
    if search not in SEARCHERS:
        raise ConfigError(f"--search {search!r}: choose one of {SEARCHERS}")
    if num_samples < 1:
        raise ConfigError(f"--num-samples {num_samples}: must be >= 1")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {max_concurrent}: must be >= 1")
    if not base.data.eval_uris:
        raise ConfigError(
            "tune scores every trial on held-out data: pass --eval-data URI (or set data.eval_uris)"
        )
    validate_space(space, base)
    if search == "optuna":
        if any(p.kind == "grid" for p in space.parameters):
            raise ConfigError(
                "--search optuna samples its own values: use choice instead of grid in the space"
            )
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("--search optuna needs Optuna: pip install 'mplug-ray[tune]'") from None
    # The base and the extremes of every range must plan (data, batch, steps) as trials will.
    plans = [plan_run(base)]
    for param in space.parameters:
        for value in param.checked_values():
            plans.append(plan_run(apply_sample(base, {param.key: value})))
    task = task_class(base.task)
    lo, hi = (
        (base.scaling.num_workers, base.scaling.num_workers)
        if isinstance(base.scaling.num_workers, int)
        else base.scaling.num_workers
    )
    return SearchPlan(
        task=base.task,
        base=base.model_dump(mode="json"),
        space_source=space.source,
        storage=storage.absolute(storage_uri),
        name=name,
        num_samples=num_samples,
        max_concurrent=max_concurrent,
        scheduler=scheduler,
        search=search,
        metric=f"eval_{task.primary_metric}",
        mode=task.mode,
        max_epochs=max(_epochs_of(base, p) for p in plans),
        trial_cpus=hi * base.scaling.cpus_per_worker,
        trial_gpus=float(hi) if base.scaling.use_gpu else 0.0,
        trial_retries=trial_retries,
    )


def cluster_max_concurrent(plan: SearchPlan, resources: dict[str, float]) -> int:
    """Trials the cluster holds at once: its CPUs (less one per trial's data stream and one for
    the driver side) over a trial's worker CPUs, and its GPUs over a trial's GPUs. Trials that
    cannot be placed would wait forever, silently: never start more."""
    cpus = resources.get("CPU", 0)
    fit_cpu = int((cpus - 1) // (plan.trial_cpus + 1))
    fit = fit_cpu
    if plan.trial_gpus:
        fit = min(fit, int(resources.get("GPU", 0) // plan.trial_gpus))
    if fit < 1:
        raise ConfigError(
            f"one trial needs {plan.trial_cpus:g} CPUs (+1 for its data) and {plan.trial_gpus:g} GPUs; the cluster has "
            f"{cpus:g} CPUs and {resources.get('GPU', 0):g} GPUs: lower scaling.num_workers / cpus_per_worker"
        )
    return fit


def describe_search(plan: SearchPlan, space: SearchSpace, max_concurrent: int) -> str:
    lines = [
        f"== search {plan.name!r}: task {plan.task}, {plan.num_samples} sample(s)"
        + (f" × {space.grid_size()} grid points" if space.grid_size() > 1 else "")
        + f", at most {max_concurrent} at a time → {plan.uri}",
        f"  metric      {plan.metric} ({plan.mode}), scheduler {plan.scheduler}"
        + (
            f" (epochs as time, max {plan.max_epochs}, grace 1, reduction 2)"
            if plan.scheduler == "asha"
            else ""
        )
        + f", search {plan.search}",
        f"  per trial   {plan.trial_cpus:g} CPU + {plan.trial_gpus:g} GPU of Train workers, retried {plan.trial_retries}×",
    ]
    lines += [f"  space       {p.describe()}" for p in space.parameters]
    return "\n".join(lines)


# ---- the trial ----------------------------------------------------------------------------------
def trial_function(config: dict[str, Any], search: dict | None = None, env: dict | None = None) -> None:
    """One trial: the base job with this trial's values, trained by the training core. `env`:
    the search driver's storage endpoints and tracking destination (`forwarded_env`), which the
    trial's process on the cluster did not inherit."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.launch import build_trainer, plan_run
    from pipelines.tune.tracking import experiment_name

    os.environ.update(env or {})
    plan = SearchPlan(**search)
    trial_id = tune.get_context().get_trial_id()
    sample = {k: v for k, v in config.items()}
    job = apply_sample(TrainConfig.model_validate(plan.base), sample)
    # Named from the trial id (a restarted trial resumes its own run); evaluated at the start so
    # every report carries the metric ASHA and Optuna read.
    job = job.model_copy(
        update={
            "run": job.run.model_copy(
                update={
                    "name": trial_id,
                    "storage": plan.uri,
                    "eval_at_start": True,
                    # Each trial's tracked run nests under the search's.
                    "tracking_experiment": experiment_name(plan),
                    "tracking_parent": plan.tracking_parent,
                }
            )
        }
    )
    train_plan = plan_run(job)
    trainer = build_trainer(
        train_plan, callbacks=[TuneReportCallback()], transform_tasks=plan.transform_tasks
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


# ---- the search ---------------------------------------------------------------------------------
def run_search(plan: SearchPlan, space: SearchSpace, *, address: str | None = None):
    """Run the search, or finish it when STORAGE/SEARCH holds an interrupted one (unfinished and
    errored trials continue from their checkpoints; finished ones are not run again). Writes
    results.csv, best.yaml, search.png and prints the summary; returns Tune's ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipelines.cluster import init_ray
    from pipelines.train.launch import forwarded_env
    from pipelines.tune.tracking import close_search_run, open_search_run

    init_ray(address)
    resources = ray.cluster_resources()
    max_concurrent = plan.max_concurrent or cluster_max_concurrent(plan, resources)
    # CPUs left beside every running trial's workers feed the trials' data streams.
    spare = resources.get("CPU", 1) - max_concurrent * plan.trial_cpus
    base_tasks = TrainConfig.model_validate(plan.base).data.transform_tasks
    plan = replace(plan, transform_tasks=base_tasks or max(1, int(spare // max_concurrent)))
    plan = replace(plan, tracking_parent=open_search_run(plan))
    print(describe_search(plan, space, max_concurrent), flush=True)
    fs, root = storage.pyarrow_fs(plan.storage)
    tune_path, tune_fs = (
        (f"{root}/{plan.name}", fs)
        if storage.is_remote(plan.storage)
        else (storage.local_path(plan.uri), None)
    )
    trainable = tune.with_parameters(trial_function, search=asdict(plan), env=forwarded_env())
    # The trial function only waits on its trainer; its workers hold the resources.
    trainable = tune.with_resources(trainable, {"CPU": 0.001})
    restored = tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs)
    if restored:
        print(f"  resuming the search found in {plan.uri}", flush=True)
        tuner = tune.Tuner.restore(
            tune_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=tune_fs,
        )
    else:
        scheduler = (
            ASHAScheduler(time_attr="epoch", max_t=plan.max_epochs, grace_period=1, reduction_factor=2)
            if plan.scheduler == "asha"
            else FIFOScheduler()
        )
        search_alg, trials_at_once = search_algorithm(plan, max_concurrent)
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=plan.metric, mode=plan.mode, num_samples=plan.num_samples,
                max_concurrent_trials=trials_at_once, scheduler=scheduler, search_alg=search_alg,
            ),
            run_config=tune.RunConfig(
                name=plan.name, storage_path=root, storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=plan.trial_retries), verbose=1,
            ),
        )  # fmt: skip
    started = time.perf_counter()
    grid = (restored and _ended_search(tuner, plan.num_samples * space.grid_size())) or tuner.fit()
    rows = trial_rows(grid, plan, space)
    write_results(plan, rows)
    close_search_run(plan, plan.tracking_parent, rows, best_row(plan, rows))
    print(summary(plan, rows, time.perf_counter() - started))
    return grid


def search_algorithm(plan: SearchPlan, max_concurrent: int):
    """Tune's search algorithm for the plan, seeded by the job's `run.seed`, and the
    `max_concurrent_trials` to pass beside it. Tune's default random search draws from numpy's
    global generator: the same command sampled other values at each run (the demo's search did).
    Tune ignores `max_concurrent_trials` for a generator passed in, so ours limits itself."""
    seed = plan.base["run"]["seed"]  # a TrainConfig dump: every key is there
    if plan.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed), max_concurrent
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed), None


def _ended_search(tuner, planned_trials: int):
    """A restored search's results when every planned trial had ended before its driver died
    (the relaunch has nothing to run: Tune's `fit` waited forever on it); else None."""
    grid = tuner.get_results()
    if len(grid) >= planned_trials and grid.num_terminated == len(grid):
        print("  every trial of the search had ended: writing its results", flush=True)
        return grid
    return None


# ---- results ------------------------------------------------------------------------------------
def trial_rows(grid, plan: SearchPlan, space: SearchSpace) -> list[dict[str, Any]]:
    """One row per trial: id, sampled values, best metric (and at which epoch), epochs run,
    status (finished, stopped early by ASHA, error), and the metric per epoch."""
    rows = []
    better = max if plan.mode == "max" else min
    for result in grid:
        df = _reports(result, plan)
        history = evaluations(df, plan.metric)
        epochs = float(df["epoch"].max()) if df is not None and "epoch" in df and len(df) else 0.0
        best = better(history, key=lambda h: h[1]) if history else (float("nan"), float("nan"))
        status = "error" if result.error is not None else _ended(df, epochs, plan)
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        rows.append({
            "trial": trial_id,
            **{k: result.config.get(k) for k in space.keys},
            "best_" + plan.metric: best[1], "best_epoch": best[0], "epochs_run": epochs, "status": status,
            "error": str(result.error).splitlines()[0] if result.error is not None else "",
            "history": history,
        })  # fmt: skip
    return rows


def _reports(result, plan: SearchPlan):
    """A trial's reports. Tune reads them from storage and, when that read fails, logs a warning
    and hands over an empty table: the trial would show no metric at all (in CI a storage fault
    did that to two of four trials). Read again through our storage layer; failing that, the last
    report Tune received in memory stands in, and the summary says so."""
    import pandas as pd

    df = result.metrics_dataframe
    if (df is not None and len(df)) or not (result.metrics or {}).get("training_iteration"):
        return df
    uri = storage.join(plan.uri, result.path.rstrip("/").rsplit("/", 1)[-1], "result.json")
    try:
        lines = storage.read_text(uri).splitlines()
        return pd.json_normalize([json.loads(line) for line in lines if line.strip()], sep="/")
    except (OSError, ValueError) as exc:
        print(f"  trial {result.metrics.get('trial_id', uri)}: its reports could not be read ({uri}: "
              f"{str(exc).splitlines()[0]}); its row holds its last report only", flush=True)  # fmt: skip
        return pd.json_normalize([result.metrics], sep="/")


def _ended(df, epochs: float, plan: SearchPlan) -> str:
    """ "finished" for a trial that trained all its steps (each report says how many it plans: a
    `--max-steps` run ends inside an epoch), else "stopped early"; by whole epochs for reports
    written before `total_steps` was reported."""
    if df is not None and "total_steps" in df and "step" in df and len(df):
        last = df.loc[df["step"].astype(float).idxmax()]  # an elastic run re-plans its steps
        return "finished" if float(last["step"]) >= float(last["total_steps"]) else "stopped early"
    return "stopped early" if epochs + 1e-6 < plan.max_epochs else "finished"


def evaluations(df, metric: str) -> list[tuple[float, float]]:
    """(epoch it was made at, value) of each evaluation a trial reported, once each, by epoch.
    Every report carries the newest evaluation (`eval_epoch` says when it was made), so one
    evaluation appears in many rows; a trial restarted from scratch may report one twice."""
    if df is None or metric not in df:
        return []
    scored = df.dropna(subset=[metric])
    when = scored["eval_epoch"] if "eval_epoch" in scored else scored["epoch"]  # runs before eval_epoch
    made: dict[float, float] = {}
    for epoch, value in zip(when.astype(float), scored[metric].astype(float)):
        made.setdefault(epoch, value)
    return sorted(made.items())


def ranked_rows(plan: SearchPlan, rows: list[dict]) -> list[dict]:
    """Trials with a metric, best first; of tied ones, the one that ran the most epochs first.
    ASHA stops a trial tied with the cut at its rung as it stops a worse one, and only a trial
    that ran to the end exports `final/`: a tie must not pick a trial that left no model."""
    key = "best_" + plan.metric
    scored = [r for r in rows if r[key] not in (None, "") and float(r[key]) == float(r[key])]  # not NaN
    sign = 1.0 if plan.mode == "max" else -1.0
    return sorted(
        scored, key=lambda r: (sign * float(r[key]), float(r.get("epochs_run") or 0.0)), reverse=True
    )


def best_row(plan: SearchPlan, rows: list[dict]) -> dict | None:
    ranked = ranked_rows(plan, rows)
    return ranked[0] if ranked else None


def write_results(plan: SearchPlan, rows: list[dict]) -> None:
    columns = [k for k in rows[0] if k != "history"] if rows else ["trial"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(plan.uri, "results.csv"), buf.getvalue())
    best = best_row(plan, rows)
    if best is not None:
        space_keys = [
            k
            for k in columns
            if k not in ("trial", "best_" + plan.metric, "best_epoch", "epochs_run", "status", "error")
        ]
        job = apply_sample(TrainConfig.model_validate(plan.base), {k: best[k] for k in space_keys})
        job = job.model_copy(update={"run": job.run.model_copy(update={"name": f"{plan.name}-best"})})
        header = (f"# Best trial {best['trial']} of search {plan.name!r}: {plan.metric} {best['best_' + plan.metric]:.4f}\n"
                  f"# at epoch {best['best_epoch']:g}. Train it in full: mplug finetune --task {plan.task} --config best.yaml\n")  # fmt: skip
        storage.write_text(
            storage.join(plan.uri, "best.yaml"),
            header + yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False),
        )
    storage.write_bytes(storage.join(plan.uri, "search.png"), plot_search(plan, rows))


def most_important(rows: list[dict], keys: list[str], metric_key: str) -> str | None:
    """The searched key whose values rank-correlate most (in absolute value) with the metric."""
    import numpy as np

    scored = [r for r in rows if r[metric_key] == r[metric_key]]
    best_key, best_corr = None, -1.0
    for key in keys:
        values = [r[key] for r in scored]
        if len(set(map(str, values))) < 2 or not all(isinstance(v, int | float) for v in values):
            continue
        x = np.argsort(np.argsort(values)).astype(float)
        y = np.argsort(np.argsort([r[metric_key] for r in scored])).astype(float)
        corr = abs(float(np.corrcoef(x, y)[0, 1])) if len(scored) > 2 else 1.0
        if corr > best_corr:
            best_key, best_corr = key, corr
    return best_key or (keys[0] if keys else None)


def plot_search(plan: SearchPlan, rows: list[dict]) -> bytes:
    """Left: each trial's metric per epoch (early-stopped trials dashed, errors dotted); right:
    the best metric against the most important hyperparameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_key = "best_" + plan.metric
    keys = [
        k
        for k in (rows[0] if rows else {})
        if k not in ("trial", metric_key, "best_epoch", "epochs_run", "status", "error", "history")
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = {"finished": "-", "stopped early": "--", "error": ":"}
    for r in rows:
        if r["history"]:
            epochs, values = zip(*r["history"])
            left.plot(epochs, values, styles[r["status"]], marker="o", label=f"{r['trial']} ({r['status']})")
    left.set_xlabel("epoch")
    left.set_ylabel(plan.metric)
    left.set_title(f"{plan.name}: {plan.metric} per epoch")
    left.grid(alpha=0.3)
    if rows:
        left.legend(fontsize=7)
    key = most_important(rows, keys, metric_key)
    if key is not None:
        pts = [
            (r[key], r[metric_key])
            for r in rows
            if r[metric_key] == r[metric_key] and isinstance(r[key], int | float)
        ]
        if pts:
            right.scatter(*zip(*pts))
            values = [p[0] for p in pts]
            if min(values) > 0 and max(values) / min(values) > 20:
                right.set_xscale("log")
        right.set_xlabel(key)
        right.set_ylabel(f"best {plan.metric}")
        right.set_title(f"best {plan.metric} against {key} (the most important)")
        right.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def summary(plan: SearchPlan, rows: list[dict], elapsed_s: float) -> str:
    metric_key = "best_" + plan.metric
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped early", "error")}
    lines = [
        "",
        f"== search {plan.name!r} done in {elapsed_s / 60:.1f} min: {len(rows)} trials "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
    ]
    for r in sorted(
        rows,
        key=lambda r: (
            r[metric_key] != r[metric_key],
            -r[metric_key] if plan.mode == "max" else r[metric_key],
        ),
    ):
        values = ", ".join(f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                           for k in r if k not in ("trial", metric_key, "best_epoch", "epochs_run", "status", "error", "history"))  # fmt: skip
        lines.append(
            f"  {r['trial']:<14} {plan.metric} {r[metric_key]:7.3f}  epochs {r['epochs_run']:g}  {r['status']:<13} {values}"
        )
    best = best_row(plan, rows)
    if best is not None:
        lines += [
            f"  best trial   {best['trial']}: {plan.metric} {best[metric_key]:.3f} (epoch {best['best_epoch']:g})",
            f"  its model    {storage.join(plan.uri, best['trial'], 'final')}",
        ]
    lines.append(f"  results      {storage.join(plan.uri, 'results.csv')}, best.yaml, search.png")
    return "\n".join(lines)


def best_trial_model(plan: SearchPlan) -> str:
    """`final/` of the best trial that exported one (from results.csv): a trial stopped early
    keeps only its checkpoints, so when the best one was stopped (its best epoch came before
    its rung) the model is the next best's, and this says so."""
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(plan.uri, "results.csv")))))
    ranked = ranked_rows(plan, rows)
    for row in ranked:
        final = storage.join(plan.uri, row["trial"], "final")
        if storage.exists(storage.join(final, "config.json")):
            if row is not ranked[0]:
                print(f"  best trial {ranked[0]['trial']} ({ranked[0].get('status')}) exported no model; "
                      f"using {row['trial']}, the best one that did: {final}", flush=True)  # fmt: skip
            return final
    if not ranked:
        raise ValueError(
            f"search {plan.name!r} has no trial with a {plan.metric}: see {plan.uri}/results.csv"
        )
    raise FileNotFoundError(
        f"no trial of search {plan.name!r} exported a model under {plan.uri} (trials stopped early keep only "
        f"their checkpoints): train best.yaml in full"
    )
