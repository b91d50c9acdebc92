"""MLflow for `mplug tune`: one parent run per search, each trial's run nested under it.

The driver opens (or, for a relaunched search, finds again) the parent run before the search
and passes its id to the trials (`run.tracking_parent`); each trial's training logs its own run
from world rank 0 (`pipelines/train/tracking.py`) with the parent tag, its config (the sampled
values included) as params. Logging from inside the trials, rather than with Tune's
MLflowLoggerCallback on the driver, keeps a trial's run the same across a trial restart and a
relaunched driver (the callback keeps its run ids in the driver's memory) and needs no nesting
support the callback does not have. After the search the driver closes the trials' runs with
their outcome (ASHA stops a trial before its loop can), tags the best one, and puts the best
value on the parent.

Tracking never fails a search: an MLflow error here is reported in one line and the search goes
on (trials then log unnested).
"""

from __future__ import annotations

import logging
from typing import Any

from pipelines import storage
from pipelines.train.config import TrainConfig
from pipelines.train.tracking import (
    RUN_KEY_TAG,
    code_and_job_tags,
    ensure_experiment,
    find_run,
    flatten_config,
    log_params,
    run_key,
)

log = logging.getLogger(__name__)

BEST_TAG = "mplug.best_trial"
# A trial's outcome in results.csv → the MLflow run status it ends with.
_STATUS = {"finished": "FINISHED", "stopped early": "KILLED", "error": "FAILED"}


def experiment_name(plan) -> str:
    """The search's experiment: `run.tracking_experiment`, else the search's name."""
    return TrainConfig.model_validate(plan.base).run.tracking_experiment or plan.name


def _uses_mlflow(plan) -> bool:
    return "mlflow" in TrainConfig.model_validate(plan.base).run.tracking


def open_search_run(plan) -> str | None:
    """The search's parent run id (created, or found again by the search folder's key); None
    when the search does not log to MLflow or MLflow fails (said in one line)."""
    if not _uses_mlflow(plan):
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        experiment_id = ensure_experiment(client, experiment_name(plan))
        key = run_key(plan.uri)
        run = find_run(client, experiment_id, key)
        if run is None:
            tags = {
                RUN_KEY_TAG: key,
                "mplug.task": plan.task,
                "mplug.search": plan.name,
                "mplug.run_uri": plan.uri,
            }
            run = client.create_run(experiment_id, run_name=plan.name, tags={**tags, **code_and_job_tags()})
        search = {
            "num_samples": plan.num_samples, "scheduler": plan.scheduler, "search": plan.search,
            "metric": plan.metric, "mode": plan.mode, "max_epochs": plan.max_epochs, "space": plan.space_source,
        }  # fmt: skip
        log_params(client, run.info.run_id, flatten_config({"search": search, **plan.base}), run.data.params)
        return run.info.run_id
    except Exception as err:  # any MLflow error: tracking never fails the search
        log.warning(f"[mplug] tracking: mlflow could not open the search's run ({type(err).__name__}: {err}); "
                    "trials log without a parent")  # fmt: skip
        return None


def close_search_run(plan, parent_run_id: str | None, rows: list[dict[str, Any]], best: dict | None) -> None:
    """End each trial's run with its outcome and tag the best trial; the parent gets the best
    value, which trial it was and where results.csv / best.yaml are."""
    if parent_run_id is None:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        experiment_id = ensure_experiment(client, experiment_name(plan))
        best_run_id = None
        for row in rows:
            run = find_run(client, experiment_id, run_key(storage.join(plan.uri, row["trial"])))
            if run is None:  # a trial that failed before its first step
                continue
            run_id = run.info.run_id
            client.set_tag(run_id, "mplug.trial_status", row["status"])
            is_best = best is not None and row["trial"] == best["trial"]
            client.set_tag(run_id, BEST_TAG, str(is_best).lower())
            if is_best:
                best_run_id = run_id
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, _STATUS.get(row["status"], "FINISHED"))
        if best is not None:
            client.log_metric(parent_run_id, f"best_{plan.metric}", float(best[f"best_{plan.metric}"]))
            client.set_tag(parent_run_id, BEST_TAG, best["trial"])
            if best_run_id is not None:
                client.set_tag(parent_run_id, "mplug.best_run_id", best_run_id)
        client.set_tag(parent_run_id, "mplug.results", storage.join(plan.uri, "results.csv"))
        client.set_tag(parent_run_id, "mplug.best_config", storage.join(plan.uri, "best.yaml"))
        client.set_terminated(parent_run_id, "FINISHED")
    except Exception as err:  # any MLflow error: the search's results are written already
        log.warning(
            f"[mplug] tracking: mlflow could not close the search's runs ({type(err).__name__}: {err})"
        )
