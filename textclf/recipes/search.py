"""Hyper-parameter search on Optuna: one study, whose every trial is an ordinary textclf training run.

A study has one parent run (named after it) and one nested child run per trial and seed, tagged ``study``,
``trial`` and ``trial_state`` (complete, pruned, failed). The objective is the selected checkpoint's validation
``metric_for_best``; a trial reports it at each evaluation, and one the pruner stops still ends as a complete
run (curves, test report, model). Trials never register; the best one's model is registered at the end.

Several processes, on one machine (the journal file under the study's folder) or several (a PostgreSQL
storage), share a study by running the same command. The parent run is owned by one process at a time: the one
that created the study, or, once that one is gone, the next start that claims it (recorded in the study's
``textclf.owner``). The owner logs the summary once every trial has ended; the other workers only run trials,
which they attach to the parent with the ``mlflow.parentRunId`` tag. textclf/recipes/search_study.py counts and recovers
trials; textclf/recipes/search_report.py writes the summary; textclf/recipes/search_space.py reads and checks the space.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from textclf.components import checkpoints
from textclf.config import DEFAULT_MODE, PARAM_VALUE_LIMIT, build_config, parse_seed, run_parameters
from textclf.errors import TextclfError, TrainingInterrupted
from textclf.process import signals
from textclf.recipes.search_report import best_summary, log_summary, register_best, trials_table
from textclf.recipes.search_space import SearchSpace, check_trial_configs, describe
from textclf.recipes.search_study import (
    OWNER,
    PROCESS,
    PRUNED_AT,
    RUNS,
    SURPLUS,
    PruningCallback,
    Tally,
    claim_owner,
    is_surplus,
    make_pruner,
    make_sampler,
    open_storage,
    owner_alive,
    owner_holds,
    owner_record,
    process_record,
    quiet_experimental,
    recover_dead_trials,
    release_owner,
    retry,
    tally,
)
from textclf.recipes.search_workers import worker_processes
from textclf.recipes.training import run_training
from textclf.records import tracking
from textclf.records.registry import LOWER_IS_BETTER
from textclf.records.server_errors import redact

log = logging.getLogger(__name__)

# Study user attributes.
RECIPE = "textclf.recipe"  # what the study's trials train: a rerun with another recipe is refused
PARENT = "textclf.parent_run_id"
SUMMARY = "textclf.summary"  # written by the owner after logging the summary: {counted, parent_run_id, version}

PARENT_WAIT_SECONDS = 120  # how long a worker waits for the study's first process to start the parent run
POLL_SECONDS = 2.0  # the owner, waiting for other workers' last trials


@dataclass(frozen=True)
class SearchSettings:
    space: SearchSpace
    n_trials: int = 20
    timeout_minutes: float | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    pruner_startup_trials: int = 5
    study: str | None = None
    storage: str | None = None
    workers: int = 1
    seeds: tuple[int, ...] = ()  # several: every configuration trains once per seed, objective = their mean
    worker_args: tuple[str, ...] = ()  # the entry point's options, to start worker processes with


@dataclass
class SearchResult:
    study: str
    parent_run_id: str | None
    counts: Tally
    table: pd.DataFrame
    best: dict[str, Any] | None = None
    registered_version: str | None = None
    already_finished: bool = False  # recognised from an earlier run: nothing was trained now
    owner: bool = True  # False: this process only ran trials; the owner of the parent logs the summary
    worker_exit_codes: list[int] = field(default_factory=list)


DEADLINE = "textclf.deadline"  # study attr: the wall-clock time after which no trial starts (None: no limit)


class SurplusTrial(Exception):
    """Started by a worker after n_trials places were taken (a race between workers): failed, never counted."""


def run_search(mode: str | None, overrides: dict[str, Any], settings: SearchSettings) -> SearchResult:
    """Run (or continue, or join) the study: trials until ``n_trials`` have ended in all or ``timeout_minutes``
    passed, then, in the process that owns the parent run, the summary and the best model's registration.

    ``overrides``: the training parameters given (None: the preset). Raises TextclfError, before any trial or
    run starts, for an invalid parameter, space or study name, a rerun whose recipe differs from the study's,
    or a storage that cannot be opened; and when no trial completed (the parent run then ends FAILED). An
    interrupt ends the current trial's run and the parent KILLED (the trial is retried by the next start)."""
    return _Search(mode, overrides, settings).run()


class _Search:
    def __init__(self, mode: str | None, overrides: dict[str, Any], settings: SearchSettings):
        self.settings, space = settings, settings.space
        given = {k: v for k, v in overrides.items() if v is not None}
        if "seed" in given:
            given["seed"] = parse_seed(given["seed"])  # click reads it as text ("42.0" under `mlflow run`)
        if given.get("run_name"):
            raise TextclfError("search names its runs after the study: pass study, not run_name")
        _refuse_set_and_searched(space, {**given, **({"mode": mode} if mode else {})})
        if settings.seeds and "seed" in space:
            raise TextclfError("seed is searched: drop seeds (or drop seed from the space)")
        if settings.seeds and given.get("seed") not in (None, _declared("seed").default):
            raise TextclfError(f"seeds ({','.join(map(str, settings.seeds))}) replace seed ({given['seed']}): drop one")
        self.overrides = {k: v for k, v in given.items() if k not in space}
        self.mode = mode or DEFAULT_MODE
        if settings.seeds:
            self.overrides.pop("seed", None)
        self.base = build_config(mode=self.mode, **self.overrides)
        check_trial_configs(space, self.mode, self.overrides)
        self.grid = space.grid() if settings.sampler == "grid" else None
        self.n_total = min(settings.n_trials, int(np.prod([len(v) for v in self.grid.values()]))) if self.grid \
            else settings.n_trials
        self.metric = self.base.training.metric_for_best
        self.lower_is_better = self.metric in LOWER_IS_BETTER
        default_name = f"{self.base.dataset_name}-{'search' if 'mode' in space else self.mode + '-search'}"
        self.name = settings.study or default_name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise TextclfError(f"invalid study name {self.name!r}: letters, digits, '.', '_' and '-' only")
        self.study_dir = Path(self.base.output_dir) / self.name
        self.recipe = checkpoints.recipe(self.base, space=str(space), seeds=",".join(map(str, settings.seeds)))
        self.data_tags: dict[str, str] = {}  # what the registered best version learnt and was validated on
        self.owner_token: str | None = None  # this process's claim on the study, when it owns it

    # -- the study and who owns its parent run -------------------------------------------------------------

    def run(self) -> SearchResult:
        storage = open_storage(self.settings.storage, self.study_dir, self.on_dead)
        sampler, pruner = make_sampler(self.settings.sampler, self.grid), make_pruner(self.settings.pruner,
                                                                                       self.settings.pruner_startup_trials)
        try:
            study = optuna.create_study(storage=storage, study_name=self.name, sampler=sampler, pruner=pruner,
                                        direction="minimize" if self.lower_is_better else "maximize")
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.name, storage=storage, sampler=sampler, pruner=pruner)
        else:
            record = owner_record()
            study.set_user_attr(OWNER, record)  # first: a study with a recipe always has an owner
            self.owner_token = record["token"]
            study.set_user_attr(RECIPE, self.recipe)
            return self.run_as_owner(study, parent_run_id=None)
        parent_run_id, claimed = self.wait_for_parent(study)
        self.check_recipe(study)
        summary = self.finished(study)
        if summary is not None:
            tracking.discard_attached_run(f"study {self.name} had already finished as parent run "
                                          f"{summary['parent_run_id']}")
            log.info("study %s already finished (%d trials): nothing to run", self.name, summary["counted"])
            return SearchResult(self.name, summary["parent_run_id"], tally(study), trials_table(study),
                                best_summary(study), summary.get("version"), already_finished=True)
        if claimed or self.take_over(study, parent_run_id):
            return self.run_as_owner(study, parent_run_id)
        return self.run_as_worker(study, parent_run_id)

    def wait_for_parent(self, study: optuna.Study) -> tuple[str | None, bool]:
        """The parent run's id once the study's creator has started it; (None, True) when the creator died or gave
        the study up first and this process claimed it (it then starts the parent). Raises TextclfError on timeout."""
        deadline = time.monotonic() + PARENT_WAIT_SECONDS
        while True:
            attrs = study.user_attrs
            if attrs.get(PARENT) and attrs.get(RECIPE):
                return attrs[PARENT], False
            owner = attrs.get(OWNER)
            if owner and (owner.get("ended") or not owner_alive(owner)):  # it gave the study up before its parent
                self.owner_token = claim_owner(study)
                if self.owner_token:
                    return None, True
            if time.monotonic() > deadline:
                raise TextclfError(f"study {self.name}: its first process has not started the parent run within "
                                   f"{PARENT_WAIT_SECONDS} s (owner: {owner}); if that process is gone, choose "
                                   "another study name")
            time.sleep(1.0)

    def check_recipe(self, study: optuna.Study) -> None:
        recorded = study.user_attrs.get(RECIPE)
        if recorded is None:  # its creator died before recording it, and this process claimed the study
            study.set_user_attr(RECIPE, self.recipe)
            return
        changed = checkpoints.differences(recorded, self.recipe)
        if changed:
            raise TextclfError(f"study {self.name} searches with other parameters ({'; '.join(changed)}); "
                               "choose another study name (or output_dir / storage)")

    def finished(self, study: optuna.Study) -> dict[str, Any] | None:
        """The study's summary when it is complete and summarized (nothing left to run or log)."""
        summary, counts = study.user_attrs.get(SUMMARY), tally(study)
        if (summary and counts.counted >= self.n_total and summary["counted"] == counts.counted
                and not counts.running and not counts.waiting):
            return summary
        return None

    def take_over(self, study: optuna.Study, parent_run_id: str) -> bool:
        """Whether this process now owns the parent run: its owner ended (or died: its run is ended KILLED
        first) and this process's claim held. A live owner, or one on another host, keeps it."""
        client = mlflow.MlflowClient()
        run = client.get_run(parent_run_id)
        if run.info.lifecycle_stage == "deleted":
            raise TextclfError(f"study {self.name}: its parent run {parent_run_id} was deleted; choose another "
                               "study name")
        owner = study.user_attrs.get(OWNER)
        if owner_holds(owner, parent_running=run.info.status == "RUNNING"):
            return False
        self.owner_token = claim_owner(study)
        if not self.owner_token:
            return False
        if run.info.status == "RUNNING":
            client.set_tag(parent_run_id, "error", f"owner process {owner and owner.get('pid')} died; taken over")
            client.set_terminated(parent_run_id, "KILLED")
        log.info("study %s: this process takes over parent run %s (was %s)", self.name, parent_run_id,
                 run.info.status)
        return True

    def run_as_owner(self, study: optuna.Study, parent_run_id: str | None) -> SearchResult:
        """Run trials as the study's owner, in its parent run; then give the ownership up, so that a later start
        may continue the study (whether this one finished, failed or was interrupted)."""
        try:
            return self._run_as_owner(study, parent_run_id)
        finally:
            release_owner(study, self.owner_token)

    def _run_as_owner(self, study: optuna.Study, parent_run_id: str | None) -> SearchResult:
        if self.base.register:  # before any trial: a best model that could not be registered would be wasted
            self.check_registrable()
        timeout = self.settings.timeout_minutes
        study.set_user_attr(DEADLINE, time.time() + timeout * 60 if timeout else None)  # this start's time budget
        tags = {"dataset": self.base.dataset_name, "mode": "searched" if "mode" in self.settings.space else self.mode,
                "base_model": self.base.model.base_model, "search": "parent", "study": self.name,
                "output_dir": str(self.study_dir.resolve())}
        if parent_run_id is not None:  # reopen the study's parent: tracked_run attaches to it as to `mlflow run`'s
            tracking.discard_attached_run(f"study {self.name} continues in its parent run {parent_run_id}")
            mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id)
            os.environ["MLFLOW_RUN_ID"] = parent_run_id
        with tracking.tracked_run(self.base.experiment_name, self.name, tags) as parent:
            parent_run_id = parent.info.run_id
            if study.user_attrs.get(PARENT) != parent_run_id:
                tracking.log_config(self.base, searched={d.name: str(d) for d in self.settings.space.dimensions})
                study.set_user_attr(PARENT, parent_run_id)
            self.log_settings()
            with worker_processes(self.settings.worker_args, self.settings.workers) as workers:
                self.trial_loop(study, parent_run_id, owner=True)
            best = log_summary(study, self.metric)
            version = None
            if self.base.register:
                config = self.trial_config(best.params, best.number, _seed_of_best(best, self.metric,
                                                                                   self.lower_is_better))
                version = register_best(study, best, config, self.metric, self.lower_is_better, self.data_tags)
            counts = tally(study)
            study.set_user_attr(SUMMARY, {"counted": counts.counted, "parent_run_id": parent_run_id,
                                          "version": version, "best_trial": best.number})
        return SearchResult(self.name, parent_run_id, counts, trials_table(study), best_summary(study), version,
                            worker_exit_codes=workers)

    def check_registrable(self) -> None:
        """Refuse data whose registered model holds versions of another dataset, and keep what the best version
        will be tagged with. The owner's job alone, once a finished study has been recognised: a rerun of a
        finished search says so whatever the data became, and workers do not load the data twice."""
        from textclf.components.data import load_splits
        from textclf.records.registry import data_tags

        splits = load_splits(self.base.data)  # every trial trains on these rows: data is not searched
        tracking.check_registrable(self.base.dataset_name, splits.dataset_digest)
        self.data_tags = data_tags(splits)

    def run_as_worker(self, study: optuna.Study, parent_run_id: str) -> SearchResult:
        parent = mlflow.MlflowClient().get_run(parent_run_id)
        experiment = mlflow.MlflowClient().get_experiment(parent.info.experiment_id)
        if experiment.name != self.base.experiment_name:
            raise TextclfError(f"study {self.name}'s parent run is in experiment {experiment.name!r}, this worker "
                               f"logs to {self.base.experiment_name!r}: start it with that experiment")
        tracking.discard_attached_run(f"a worker of study {self.name}: its trials are children of {parent_run_id}")
        os.environ.pop("MLFLOW_RUN_ID", None)  # trials start runs of their own, not `mlflow run`'s
        log.info("study %s: joining as a worker; parent run %s is owned by %s", self.name, parent_run_id,
                 study.user_attrs.get(OWNER))
        with signals.interrupts_raise(), worker_processes(self.settings.worker_args, self.settings.workers) as workers:
            self.trial_loop(study, parent_run_id, owner=False)
        return SearchResult(self.name, parent_run_id, tally(study), trials_table(study), best_summary(study),
                            owner=False, worker_exit_codes=workers)

    def log_settings(self) -> None:
        settings = self.settings
        params = {"search.study": self.name, "search.space": str(settings.space)[:PARAM_VALUE_LIMIT],
                  "search.n_trials": str(self.n_total), "search.sampler": settings.sampler,
                  "search.pruner": settings.pruner, "search.pruner_startup_trials": str(settings.pruner_startup_trials),
                  "search.metric": f"validation {self.metric}",
                  "search.direction": "minimize" if self.lower_is_better else "maximize",
                  "search.storage": redact(settings.storage or str(self.study_dir / "optuna.journal")),
                  "search.seeds": ",".join(map(str, settings.seeds)),
                  "search.timeout_minutes": str(settings.timeout_minutes or "")}
        tracking.log_process_params(params)  # a rerun may change n_trials or timeout: the new value goes to a tag
        mlflow.log_text(describe(settings.space), "search/space.json")

    # -- trials ---------------------------------------------------------------------------------------------

    def trial_loop(self, study: optuna.Study, parent_run_id: str, owner: bool) -> None:
        """Run trials while places among n_trials are free (or retries wait) and time is left. The owner then
        waits for the other workers' trials, recovering those whose process dies (and running their retries)."""
        settings = self.settings
        while True:
            recover_dead_trials(study, self.on_dead)
            counts = tally(study)
            # The owner's deadline binds every process, and a worker stops once the owner has ended the parent run:
            # a trial started later would be missing from the summary.
            deadline = study.user_attrs.get(DEADLINE)
            time_left = deadline is None or time.time() < deadline
            if not owner and (study.user_attrs.get(OWNER) or {}).get("ended"):
                return
            free = counts.waiting or counts.counted + counts.running < self.n_total
            if time_left and counts.counted < self.n_total and free:
                study.optimize(lambda trial: self.objective(trial, parent_run_id, nested=owner), n_trials=1,
                               catch=(Exception,), gc_after_trial=True)
            elif owner and counts.running:
                time.sleep(POLL_SECONDS)
            else:
                return

    def objective(self, trial: optuna.Trial, parent_run_id: str, nested: bool) -> float:
        if is_surplus(trial.study, trial.number, self.n_total):
            trial.set_user_attr(SURPLUS, True)
            raise SurplusTrial(f"trial {trial.number}: {self.n_total} trials were already started")
        trial.set_user_attr(PROCESS, process_record(trial.number))
        params = self.settings.space.suggest(trial)
        with quiet_experimental():
            history = RetryHeartbeatStaleTrialCallback.retry_history(_frozen(trial.study, trial.number))
        # A retry trains in the first attempt's folder: it resumes from that one's last complete checkpoint.
        place = history[0] if history else trial.number
        tags = {"study": self.name, "trial": str(trial.number), "trial_state": "running", "search_parent": parent_run_id,
                **({"retry_of": str(history[-1])} if history else {}),
                **({} if nested else {"mlflow.parentRunId": parent_run_id})}
        runs, values = [], []
        for index, seed in enumerate(self.settings.seeds or (None,)):
            config = self.trial_config(params, place, seed)
            pruning = (PruningCallback(trial, self.metric, by_evaluation=bool(config.training.evaluations))
                       if index == 0 and self.settings.pruner != "none" else None)
            try:
                result = run_training(config, nested=nested, extra_tags=tags,
                                      extra_callbacks=[pruning] if pruning else None)
            except (TrainingInterrupted, KeyboardInterrupt) as exc:
                self.end_interrupted(trial)
                if isinstance(exc, KeyboardInterrupt):  # Optuna would catch it and tell the trial a second time
                    raise TrainingInterrupted("SIGINT") from None
                raise
            except Exception:
                self.tag_runs(trial.number, "failed")
                raise
            runs.append({"run_id": result.run_id, "seed": config.seed, "model_uri": result.model_uri,
                         "output_dir": str(config.run_output_dir), "best": result.best_metrics,
                         "test": result.test_metrics})
            trial.set_user_attr(RUNS, runs)
            if pruning is not None and pruning.pruned_at is not None:
                trial.set_user_attr(PRUNED_AT, pruning.pruned_at)
                self.tag_runs(trial.number, "pruned", [r["run_id"] for r in runs])
                raise optuna.TrialPruned(f"validation {self.metric} at step {pruning.pruned_at}")
            values.append(float(result.best_metrics[self.metric]))
        self.tag_runs(trial.number, "complete", [r["run_id"] for r in runs])
        return float(np.mean(values))

    def trial_config(self, params: dict[str, Any], place: int, seed: int | None):
        """The RunConfig of a trial: the search's parameters with the trial's values, in its own folder
        ``<output_dir>/<study>/<study>-trial<N>[-seed<S>]``, never registered, always resuming."""
        values = {**self.overrides, **{k: v for k, v in params.items() if k != "mode"}}
        if seed is not None:
            values["seed"] = seed
        name = f"{self.name}-trial{place}" + (f"-seed{seed}" if len(self.settings.seeds) > 1 else "")
        # resume: a retry continues its first attempt's folder (a user's resume=false is for a `train` folder).
        values.update(run_name=name, output_dir=str(self.study_dir), register=False, resume=True)
        return build_config(mode=params.get("mode", self.mode), **values)

    def end_interrupted(self, trial: optuna.Trial) -> None:
        """An interrupted trial (its run already ended KILLED): failed in the study and queued again, so that
        the next start runs it (resuming from its last checkpoint)."""
        self.tag_runs(trial.number, "failed")
        with contextlib.suppress(Exception):  # the storage may be what failed; a later start recovers the trial
            trial.study.tell(trial, state=TrialState.FAIL)
            retry(trial.study, _frozen(trial.study, trial.number))

    def on_dead(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose process died (failed in the study already): its runs still RUNNING end KILLED, and it
        is queued again (or, after MAX_RETRIES attempts, counts as failed)."""
        client = mlflow.MlflowClient()
        for run in self.runs_of(trial.number):
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "error", f"the process of trial {trial.number} died without "
                               "ending the run; ended by another worker of the study")
                client.set_terminated(run.info.run_id, "KILLED")
        self.tag_runs(trial.number, "failed")
        retry(study, trial)

    def runs_of(self, number: int) -> list:
        return mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.study = '{self.name}' and tags.trial = '{number}'")

    def tag_runs(self, number: int, state: str, run_ids: list[str] | None = None) -> None:
        """Tag ``trial_state`` on the trial's runs (found by their tags unless given: a failed run's id is not
        returned to the caller)."""
        client = mlflow.MlflowClient()
        for run_id in run_ids if run_ids is not None else [r.info.run_id for r in self.runs_of(number)]:
            if run_id:
                with contextlib.suppress(Exception):  # a tag must not turn a finished trial into a failed one
                    client.set_tag(run_id, "trial_state", state)


def _refuse_set_and_searched(space: SearchSpace, given: dict[str, Any]) -> None:
    """A parameter both searched and given another value than its default is a mistake: refuse it. (Under
    `mlflow run` every parameter arrives, at its MLproject default; a preset's default arrives as "" = None.)"""
    for name in space.names:
        if name not in given:
            continue
        default = None if _declared(name).follows_mode else _declared(name).default
        if given[name] != default:
            raise TextclfError(f"{name} is both set ({given[name]}) and searched ({name}="
                               f"{next(d for d in space.dimensions if d.name == name)}): drop one")


def _declared(name: str):
    return next(p for p in run_parameters() if p.name == name)


def _frozen(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=True) if t.number == number)


def _seed_of_best(trial: FrozenTrial, metric: str, lower_is_better: bool) -> int | None:
    from textclf.recipes.search_report import best_run

    return best_run(trial, metric, lower_is_better).get("seed")
