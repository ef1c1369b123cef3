"""Model registry: one registered model ``textclf-<dataset>``, one version per finished training,
and promotion of the best version by validation metric (never by test) to alias ``champion``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from textclf.errors import TextclfError

log = logging.getLogger(__name__)

CHAMPION = "champion"


def registered_model_name(dataset: str) -> str:
    return f"textclf-{dataset}"


def register_run_model(run_id: str, model_uri: str, config, best: dict, test: dict) -> str:
    """Register the run's pyfunc model as a new version tagged with what promotion and users need."""
    metric = config.training.metric_for_best
    tags = {
        "run_id": run_id,
        "seed": str(config.seed),
        "mode": config.mode,
        "base_model": config.model.base_model,
        "validation_metric": metric,
        f"validation_{metric}": repr(float(best[metric])) if metric in best else "",
        **{f"test_{k}": repr(float(v)) for k, v in test.items()},
    }
    version = mlflow.register_model(model_uri, registered_model_name(config.dataset_name), tags=tags)
    return str(version.version)


@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    metric: str
    value: float
    changed: bool
    reason: str


def _validation_value(version: ModelVersion, metric: str) -> float | None:
    raw = version.tags.get(f"validation_{metric}")
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def promote(dataset: str, metric: str = "f1_macro", use_stage: bool = True, client: MlflowClient | None = None) -> Promotion:
    """Point alias ``champion`` at the version with the best validation ``metric``; optionally move it
    to stage Production (archiving the former one). Ties go to the oldest version (lowest number), so
    repeated calls choose the same version. Raises TextclfError when there is nothing to promote."""
    client = client or MlflowClient()
    name = registered_model_name(dataset)
    versions = client.search_model_versions(f"name = '{name}'")
    candidates = [(v, _validation_value(v, metric)) for v in versions]
    candidates = [(v, value) for v, value in candidates if value is not None]
    if not candidates:
        raise TextclfError(f"registered model {name!r} has no version with a validation_{metric} tag to promote")
    best, value = min(candidates, key=lambda item: (-item[1], int(item[0].version)))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    changed = current is None or current.version != best.version
    client.set_registered_model_alias(name, CHAMPION, best.version)
    if use_stage and best.current_stage != "Production":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still used by many UIs
            client.transition_model_version_stage(name, best.version, "Production", archive_existing_versions=True)
    runner_up = sorted((val for v, val in candidates if v.version != best.version), reverse=True)
    reason = (
        f"version {best.version} (run {best.run_id}, seed {best.tags.get('seed')}) has the best validation "
        f"{metric} = {value:.4f} among {len(candidates)} versions"
        + (f"; next best {runner_up[0]:.4f}" if runner_up else "")
    )
    return Promotion(name, str(best.version), best.run_id, metric, value, changed, reason)
