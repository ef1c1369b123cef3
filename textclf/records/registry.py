"""Model registry: one registered model ``textclf-<dataset>``, one version per finished training,
and promotion of the best version by validation metric (never by test) to alias ``champion``."""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from textclf.config import BEST_METRICS
from textclf.errors import TextclfError
from textclf.records.server_errors import connection_error
from textclf.records.store import sqlite_lock

log = logging.getLogger(__name__)

CHAMPION = "champion"
PRODUCTION = "Production"
LOWER_IS_BETTER = frozenset({"loss"})  # every other metric in BEST_METRICS: higher is better
ATTEMPTS = 5  # promotions retried after a conflict with a concurrent writer
LOCK_TIMEOUT_S = 120
# Not a conflict: retrying cannot help.
_FINAL_CODES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_PARAMETER_VALUE"}


def registered_model_name(dataset: str) -> str:
    return f"textclf-{dataset}"


def data_tags(splits) -> dict[str, str]:
    """What a version was trained and validated on (``splits``: textclf.components.data.LabeledSplits): the dataset's digest
    (its files, whatever part a run used) and the validation rows' digest and count. Versions are compared only
    when validated on the same rows, and a dataset never joins a registered model of another one."""
    return {"dataset_digest": splits.dataset_digest, "validation_digest": splits.digests()["validation"],
            "validation_rows": str(len(splits.validation))}


def register_run_model(run_id: str, model_uri: str, config, best: dict, test: dict,
                       data: dict[str, str] | None = None) -> str:
    """Register the run's pyfunc model as a new version tagged with what promotion and users need.

    Every validation metric of the selected checkpoint is tagged (``validation_<metric>``), not only
    the one that selected it (``validation_metric``), so the version competes on any metric; ``data`` is
    :func:`data_tags`. Raises TextclfError when the registered model holds versions of another dataset."""
    tags = {"seed": str(config.seed), "mode": config.mode, "base_model": config.model.base_model,
            "validation_metric": config.training.metric_for_best, **(data or {})}
    name = registered_model_name(config.dataset_name)
    version = register_version(run_id, model_uri, name, tags, best, test)
    MlflowClient().update_model_version(name, version, description=model_card(name, version, run_id, config, best, test))
    return version


def version_of_run(name: str, run_id: str) -> str | None:
    """The version of ``name`` registered from run ``run_id``, if any: a registration repeated after a failure
    (a sync, a continued search) finds it instead of adding a second version of the same model."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(min(int(v.version) for v in found)) if found else None


def register_version(run_id: str, model_uri: str, name: str, tags: dict[str, str], validation: dict,
                     test: dict) -> str:
    """Register ``model_uri`` as a version of ``name`` with ``tags``, the run id and every validation and test
    metric (``validation_<metric>``, ``test_<metric>``); return its number. Raises TextclfError when ``name``
    holds versions of another dataset (:func:`check_same_dataset`)."""
    check_same_dataset(name, tags.get("dataset_digest"))
    tags = {"run_id": run_id, **tags,
            **{f"validation_{k}": repr(float(v)) for k, v in validation.items() if k != "step"},
            **{f"test_{k}": repr(float(v)) for k, v in test.items()}}
    return str(mlflow.register_model(model_uri, name, tags=tags).version)


def check_same_dataset(name: str, dataset_digest: str | None) -> None:
    """Raises TextclfError when registered model ``name`` holds versions trained on another dataset than the one
    of ``dataset_digest`` (two data folders of the same name, or files changed since): their scores would be
    ranked as one. Versions that recorded no digest (older ones) are not compared."""
    if not dataset_digest:
        return
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    others: dict[str, list[str]] = {}
    for version in versions:
        recorded = version.tags.get("dataset_digest")
        if recorded and recorded != dataset_digest:
            others.setdefault(recorded, []).append(str(version.version))
    if others:
        found = "; ".join(f"versions {', '.join(sorted(v, key=int))} of dataset {d}" for d, v in others.items())
        raise TextclfError(
            f"registered model {name!r} holds {found}, and this data is dataset {dataset_digest} (another folder "
            "of the same name, or its files changed): rename the data folder to register it as a model of its own, "
            "or pass register=false")


def model_card(name: str, version: str, run_id: str, config, best: dict, test: dict) -> str:
    """The version's description in the registry UI: what it is, how well it does, how to load it."""
    def table(metrics: dict) -> str:
        return ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items() if k != "step") or "n/a"

    return (
        f"**{name} version {version}**: a {config.mode} fine-tune of `{config.model.base_model}` on "
        f"`{config.dataset_name}`, seed {config.seed}, from run `{run_id}`.\n\n"
        f"- validation (selected checkpoint, by {config.training.metric_for_best}): {table(best)}\n"
        f"- test: {table(test)}\n\n"
        f"Load: `mlflow.pyfunc.load_model(\"models:/{name}/{version}\").predict(pd.DataFrame({{\"text\": [...]}}))` "
        f"returns label, label_id, score and prob_<class> per text. "
        f"Serve: `mlflow models serve -m models:/{name}/{version} --env-manager local`."
    )


@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    metric: str
    value: float
    changed: bool
    reason: str
    skipped: list[str] = field(default_factory=list)  # versions without a validation_<metric> tag


class _Conflict(Exception):
    """The registry did not end in the state this promotion wrote: another writer was at work."""


def promote(dataset: str, metric: str = "f1_macro", use_stage: bool = True,
            registry_uri: str | None = None, validation_digest: str | None = None) -> Promotion:
    """Point alias ``champion`` at the version with the best validation ``metric`` (lowest ``loss``,
    highest of the others); with ``use_stage`` also make it the one version in stage Production
    (archiving the former one). Ties go to the oldest version (lowest number), so repeated calls
    choose the same version and change nothing.

    Only versions validated on the same rows are compared (tag ``validation_digest``): when the candidates
    were validated on different rows, ``validation_digest`` (or its first characters; ``unrecorded`` for
    versions without the tag) names the group to rank.

    Safe to run concurrently: on a sqlite store promotions take a file lock beside the database;
    on any store a write that conflicts, or a final state that is not the one written, is retried
    after re-reading the registry.

    Raises TextclfError for an unknown metric, when no version has the tag, when a version's tag is
    not a number (the ranking would be a guess), when the candidates were validated on different rows and
    ``validation_digest`` does not pick one group, when the tracking server cannot be reached, and
    when concurrent writers keep changing the champion.
    """
    if metric not in BEST_METRICS:
        raise TextclfError(
            f"unknown metric {metric!r} for promote: choose one of {', '.join(BEST_METRICS)} (validation metrics)"
        )
    uri = registry_uri or mlflow.get_registry_uri()
    client = MlflowClient(registry_uri=uri)
    name = registered_model_name(dataset)
    try:
        with _serialized(uri):
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    return _promote_once(client, name, metric, use_stage, validation_digest)
                except (MlflowException, _Conflict) as exc:
                    if attempt == ATTEMPTS or not _retryable(exc):
                        raise
                    log.warning("promotion of %s conflicted with another writer (%s); retrying",
                                name, str(exc).splitlines()[0][:200])
                    time.sleep(0.2 * attempt + random.random() * 0.3)
    except _Conflict as exc:
        raise TextclfError(f"could not promote in {name!r}: {exc} (after {ATTEMPTS} attempts)") from exc
    except MlflowException as exc:
        cause = connection_error(exc)
        if cause is None:
            raise
        raise TextclfError(
            f"cannot reach the tracking server at {uri} ({type(cause).__name__}); start it or set "
            "MLFLOW_TRACKING_URI to a running one"
        ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _promote_once(client: MlflowClient, name: str, metric: str, use_stage: bool,
                  validation_digest: str | None) -> Promotion:
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    finished, unfinished = _of_finished_runs(client, versions, name)
    candidates, skipped = _rank(finished, name, metric, unfinished)
    candidates, validated_on = _comparable(candidates, name, validation_digest)
    best, value = candidates[0]
    version = str(best.version)
    aliases = client.get_registered_model(name).aliases
    alias_moves = str(aliases.get(CHAMPION)) != version
    if alias_moves:
        client.set_registered_model_alias(name, CHAMPION, version)
    stage_moves = use_stage and [str(v.version) for v in versions if v.current_stage == PRODUCTION] != [version]
    if stage_moves:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still used by many UIs
            # Archived one by one rather than with archive_existing_versions=True, which MLflow 3.17.2 breaks on
            # PostgreSQL ("operator does not exist: integer <> character varying", mlflow/mlflow#24592).
            # _confirm and the retry cover the moment two versions are in Production.
            client.transition_model_version_stage(name, version, PRODUCTION, archive_existing_versions=False)
            for other in versions:
                if str(other.version) != version and other.current_stage == PRODUCTION:
                    client.transition_model_version_stage(name, other.version, "Archived")
    _confirm(client, name, version, use_stage)
    n = len(candidates)
    reason = (
        f"version {version} (run {_run_id(best)}, seed {best.tags.get('seed')}) has the best validation {metric} "
        f"= {value:.4f} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better) "
        f"among {n} version{'' if n == 1 else 's'} validated on {validated_on}"
        + (f"; next best {candidates[1][1]:.4f}" if n > 1 else "")
        + (f"; skipped version{'' if len(skipped) == 1 else 's'} {', '.join(skipped)} (no validation_{metric} tag)"
           if skipped else "")
        + (f"; left out {', '.join(unfinished)} (only versions of finished runs compete)" if unfinished else "")
    )
    return Promotion(name, version, _run_id(best), metric, value, alias_moves or bool(stage_moves), reason, skipped)


def _of_finished_runs(client: MlflowClient, versions: list[ModelVersion],
                      name: str) -> tuple[list[ModelVersion], list[str]]:
    """The versions whose registration completed and whose training run ended FINISHED, and the others, each
    with its cause.

    A run registers its model before it ends: one killed or failed in between leaves a version with every tag,
    and its rerun registers the same model again from a run that finished. Only a finished run's version may be
    crowned (a tie would otherwise go to the older, failed one). A run still RUNNING may be training yet, or waiting
    for `textclf sync`. A version whose run cannot be read (gone from the store, or not readable by this user on a
    team server) keeps its place: nothing says that run did not finish."""
    kept, left_out = [], []
    for version in versions:
        cause = None if version.status == "READY" else f"registration {version.status}"
        if cause is None and _run_id(version):
            try:
                status = client.get_run(_run_id(version)).info.status
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"):
                    raise
                status = None
            cause = None if status in (None, "FINISHED") else f"run {status}"
        if cause is None:
            kept.append(version)
        else:
            left_out.append(f"version {version.version} ({cause})")
    if left_out:
        log.warning("%s: %s not candidates: only versions of runs that ended FINISHED compete", name,
                    ", ".join(left_out) + (" is" if len(left_out) == 1 else " are"))
    return kept, left_out


def _rank(versions: list[ModelVersion], name: str, metric: str,
          unfinished: list[str]) -> tuple[list[tuple[ModelVersion, float]], list[str]]:
    """Candidates best first (ties: lowest version number) and the versions without the tag (``unfinished``: the
    versions already left out, named in the error when none is left).

    A tag that is present but not a finite number is refused rather than skipped: that version may
    well be the best one, and crowning another in silence would be a wrong promotion nobody sees."""
    tag = f"validation_{metric}"
    candidates, skipped = [], []
    for version in versions:
        raw = version.tags.get(tag)
        if raw is None or raw.strip() == "":
            skipped.append(str(version.version))
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise TextclfError(
                f"cannot rank {name!r} by validation {metric}: version {version.version} has tag {tag} = {raw!r}, "
                f"not a finite number; set it to the right value (MlflowClient().set_model_version_tag) or delete "
                f"the tag to leave that version out"
            )
        candidates.append((version, value))
    if not candidates:
        raise TextclfError(f"registered model {name!r} has no version with a {tag} tag to promote"
                          + (f" among the versions of finished runs ({', '.join(unfinished)} left out)" if unfinished else ""))
    if skipped:
        log.warning("%s: versions %s have no %s tag and are not candidates", name, ", ".join(skipped), tag)
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    candidates.sort(key=lambda item: (sign * item[1], int(item[0].version)))
    return candidates, skipped


UNRECORDED = "unrecorded"  # the group of versions registered before textclf tagged their validation rows


def _comparable(candidates: list[tuple[ModelVersion, float]], name: str,
                validation_digest: str | None) -> tuple[list[tuple[ModelVersion, float]], str]:
    """The candidates validated on the same rows (one ``validation_digest`` group), and those rows in words.

    Raises TextclfError when they were validated on different rows and ``validation_digest`` picks no group
    (a score on 300 rows and one on 872 do not rank two models), naming every group."""
    groups: dict[str, list[tuple[ModelVersion, float]]] = {}
    for version, value in candidates:
        groups.setdefault(version.tags.get("validation_digest") or UNRECORDED, []).append((version, value))

    def described(digest: str) -> str:
        rows = groups[digest][0][0].tags.get("validation_rows")
        return "rows not recorded" if digest == UNRECORDED else f"{rows} rows (digest {digest})"

    chosen = list(groups)
    if validation_digest:
        chosen = [digest for digest in groups if digest.startswith(validation_digest)]
    if len(chosen) != 1:
        numbers = {d: sorted(int(v.version) for v, _ in g) for d, g in groups.items()}
        listing = "; ".join(f"version{'s' if len(n) > 1 else ''} {', '.join(map(str, n))} on {described(d)}"
                            for d, n in sorted(numbers.items(), key=lambda item: item[1]))
        hint = (f"no group's digest starts with {validation_digest!r}" if validation_digest
                else "pass validation_digest=<digest> to rank one group")
        raise TextclfError(f"cannot rank {name!r}: its versions were validated on different rows ({listing}); {hint}")
    return groups[chosen[0]], described(chosen[0])


def _confirm(client: MlflowClient, name: str, version: str, use_stage: bool) -> None:
    """Re-read the registry: the alias (and the one Production version) must be what was written."""
    champion = str(client.get_registered_model(name).aliases.get(CHAMPION))
    if champion != version:
        raise _Conflict(f"alias {CHAMPION} points at version {champion}, expected {version}")
    if use_stage:
        production = [str(v.version) for v in client.search_model_versions(f"name = '{name}'")
                      if v.current_stage == PRODUCTION]
        if production != [version]:
            raise _Conflict(f"versions in stage {PRODUCTION}: {production or 'none'}, expected only {version}")


def _run_id(version: ModelVersion) -> str:
    return version.tags.get("run_id") or version.run_id


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _Conflict):
        return True
    return connection_error(exc) is None and getattr(exc, "error_code", None) not in _FINAL_CODES


def _serialized(uri: str):
    """On a sqlite store, one promotion at a time (textclf.records.store); any other store relies on the retry in
    :func:`promote`. A promotion also waits for a first contact that is creating the database."""
    return sqlite_lock(uri, timeout=LOCK_TIMEOUT_S)
