"""What a search's parent run shows once its trials have ended: the best trial, the trials table, Optuna's
pictures, and the best trial's model registered as a version of ``textclf-<dataset>``."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.storages import RetryHeartbeatStaleTrialCallback  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from textclf.errors import TextclfError  # noqa: E402
from textclf.recipes.search_study import PRUNED_AT, RUNS, SURPLUS, quiet_experimental, retried_numbers, tally  # noqa: E402
from textclf.records import tracking  # noqa: E402

log = logging.getLogger(__name__)

REGISTERED = "textclf.registered"  # study attr: the run whose model was registered, and its version


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial (a surplus one left out): number, state, value, parameters, its runs and metrics.
    A trial that was retried says by which trial (``retried_as``); its retry says ``retry_of``."""
    with quiet_experimental():
        trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]
        retry_of = {t.number: RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
        retried_as = {original: t.number for t in trials for original in
                      RetryHeartbeatStaleTrialCallback.retry_history(t)[-1:]}
    rows = []
    for trial in trials:
        runs = trial.user_attrs.get(RUNS, [])
        row: dict[str, Any] = {
            "trial": trial.number, "state": trial.state.name.lower(), "value": trial.value,
            "retry_of": retry_of[trial.number], "retried_as": retried_as.get(trial.number),
            "pruned_at_step": trial.user_attrs.get(PRUNED_AT),
            "seconds": trial.duration.total_seconds() if trial.duration else None,
            **{f"param.{k}": v for k, v in trial.params.items()},
            "run_ids": ",".join(r["run_id"] for r in runs if r.get("run_id")),
        }
        for metric in ("accuracy", "f1_macro"):  # shown for reading, never used to choose
            values = [r["test"][metric] for r in runs if metric in r.get("test", {})]
            row[f"test.{metric}"] = float(np.mean(values)) if values else None
        rows.append(row)
    return pd.DataFrame(rows)


def log_summary(study: optuna.Study, metric: str) -> FrozenTrial:
    """Log to the active (parent) run: trial counts, the best trial's value, parameters and runs, the trials
    table ``search/trials.json`` and the pictures. Returns the best trial.

    Raises TextclfError when no trial completed (the table and counts are logged first)."""
    counts = tally(study)
    table = trials_table(study)
    tracking.log_metrics({"search/trials_complete": counts.complete, "search/trials_pruned": counts.pruned,
                          "search/trials_failed": counts.failed,
                          "search/trials_retried": len(retried_numbers(study.get_trials(deepcopy=False)))})
    if len(table):
        tracking.log_table_replacing(table.astype(object).where(table.notna(), None), "search/trials.json")
    if not counts.complete:
        raise TextclfError(f"no trial completed ({counts.pruned} pruned, {counts.failed} failed): see the parent "
                           "run's search/trials.json and the failed trials' runs (tag error)")
    best = study.best_trial
    tracking.log_metrics({f"search/best_{metric}": best.value})
    mlflow.set_tags({"best_trial": str(best.number), **{f"best.{k}": str(v) for k, v in best.params.items()}})
    mlflow.log_dict({"trial": best.number, "value": best.value, "metric": f"validation {metric}",
                     "params": best.params, "runs": best.user_attrs.get(RUNS, [])}, "search/best_trial.json")
    log_plots(study, metric)
    return best


def log_plots(study: optuna.Study, metric: str) -> None:
    """Optimization history, parameter importances and the objective against each parameter (Optuna's matplotlib
    plots) as ``search/*.png``. A picture that cannot be drawn (one complete trial has no importances) is
    skipped with a warning: the run is complete without it."""
    from optuna.visualization import matplotlib as plots

    target_name = f"validation {metric}"
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)  # integer choices are drawn as categories
    pictures = {"optimization_history": plots.plot_optimization_history,
                "param_importances": plots.plot_param_importances, "objective_by_param": plots.plot_slice}
    with tempfile.TemporaryDirectory() as tmp:
        for name, draw in pictures.items():
            try:
                with quiet_experimental():
                    axes = draw(study, target_name=target_name)
            except Exception as exc:  # noqa: BLE001 - a missing picture must not fail the search
                log.warning("search/%s.png not drawn: %s", name, exc)
                continue
            all_axes = list(np.ravel(axes))
            for ax in all_axes:
                if ax.get_xscale() == "log":  # Optuna labels every minor tick of a log axis: unreadable
                    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            figure = all_axes[0].figure
            path = Path(tmp) / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            mlflow.log_artifact(str(path), artifact_path="search")


def best_run(trial: FrozenTrial, metric: str, lower_is_better: bool) -> dict[str, Any]:
    """The trial's run with the best validation ``metric`` (its only run unless it trained several seeds)."""
    runs = [r for r in trial.user_attrs.get(RUNS, []) if r.get("run_id") and r.get("model_uri")]
    if not runs:
        raise TextclfError(f"trial {trial.number} logged no model to register")
    sign = 1.0 if lower_is_better else -1.0
    return min(runs, key=lambda r: sign * r["best"][metric])


def register_best(study: optuna.Study, trial: FrozenTrial, config, metric: str, lower_is_better: bool,
                  data: dict[str, str] | None = None) -> str:
    """Register the best trial's model as a version of ``textclf-<dataset>`` tagged with the study and trial
    (``config``: that run's RunConfig; ``data``: textclf.records.registry.data_tags of its rows), once: the same best run
    found again keeps its version."""
    from textclf.records.registry import register_run_model, registered_model_name, version_of_run

    run = best_run(trial, metric, lower_is_better)
    name = registered_model_name(config.dataset_name)
    # Found when this run was registered before: by this study earlier, or by a process that died right after.
    version = version_of_run(name, run["run_id"])
    if version:
        log.info("the best trial's run %s is version %s already", run["run_id"], version)
    else:
        version = register_run_model(run["run_id"], run["model_uri"], config, run["best"], run["test"], data)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, "study", study.study_name)
    client.set_model_version_tag(name, version, "trial", str(trial.number))
    study.set_user_attr(REGISTERED, {"run_id": run["run_id"], "version": version, "trial": trial.number})
    mlflow.set_tag("registered_version", f"{name}/{version}")
    return version


def best_summary(study: optuna.Study) -> dict[str, Any] | None:
    """The best trial as the entry point prints it (None while no trial completed)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    return {"trial": best.number, "value": best.value, "params": best.params}
