"""The Optuna side of a search: the study's storage, samplers and pruners, how trials are counted, and what
becomes of a trial whose process died.

Counting: ``n_trials`` is the number of trials that ended (complete, pruned or failed) across every worker and
rerun. A trial that was interrupted or whose process died is failed in the study and retried as a new trial with
the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``); the retry takes its place in the count, so
it is neither lost nor counted twice. Optuna's ``MaxTrialsCallback`` counts by state only (the dead trial and its
retry would both count) and only after a trial ends (two workers finishing together would each start one more):
hence :func:`tally` and :func:`is_surplus`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from transformers import TrainerCallback

from textclf.errors import TextclfError
from textclf.records.server_errors import redact

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
JOURNAL_FILE = "optuna.journal"
MAX_RETRIES = 3  # a configuration whose process dies this often is counted as failed
HEARTBEAT_SECONDS = 60  # RDB storages: a trial without a heartbeat for GRACE_SECONDS is failed and retried
GRACE_SECONDS = 180
STORAGE_ATTEMPTS = 3
UNCLAIMED_SECONDS = 300  # a RUNNING trial that never recorded its process (killed within ms of starting)

# Trial user attributes written by textclf.
PROCESS = "textclf.process"  # who runs the trial: host, pid, pid start time, the trial's number
RUNS = "textclf.runs"  # the training runs of the trial: run id, seed, model URI, validation and test metrics
SURPLUS = "textclf.surplus"  # started by a worker after n_trials were taken: failed at once, counted nowhere
PRUNED_AT = "textclf.pruned_at_step"
# Study user attribute: the process that owns the parent run (see textclf.recipes.search).
OWNER = "textclf.owner"
CLAIM_SECONDS = 1.0  # a claim of the parent is kept if no other process overwrote it within this time


@contextlib.contextmanager
def quiet_experimental():
    """Optuna's heartbeat, retry callback and plots are marked experimental: the warning says nothing to a user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def open_storage(url: str | None, study_dir: Path, on_stale: Callable[[optuna.Study, FrozenTrial], None]):
    """Optuna's journal file ``<study_dir>/optuna.journal`` (several processes on one machine) when ``url`` is
    empty or a file path; an RDB storage (``postgresql+psycopg://user@host:port/db``: several machines) when it
    is a URL, with heartbeats so that a trial whose machine died is failed and ``on_stale`` is called for it.

    Raises TextclfError when the storage cannot be opened (the URL is shown without its password)."""
    if not url or "://" not in url:
        path = Path(url) if url else study_dir / JOURNAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    # Two workers that open a new database at once both create Optuna's tables, and one fails on a duplicate
    # key (measured on PostgreSQL 15): the tables exist when it tries again.
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            with quiet_experimental():  # heartbeats are experimental since Optuna 2.9
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                                  heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                                  heartbeat_stale_trial_callback=on_stale)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors have no common base
            if attempt < STORAGE_ATTEMPTS:
                log.info("opening the study storage failed (%s); trying again", type(exc).__name__)
                time.sleep(attempt)
                continue
            first_line = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise TextclfError(f"cannot open the study storage {redact(url)}: {first_line}") from None


def make_sampler(name: str, grid: dict[str, list] | None):
    """TPE (the default), random, or grid (every combination of ``grid``). Unseeded: workers that share a
    study must not propose the same values at once (the grid assigns its points by trial number)."""
    if name == "grid":
        return optuna.samplers.GridSampler(grid)
    if name == "random":
        return optuna.samplers.RandomSampler()
    return optuna.samplers.TPESampler()


def make_pruner(name: str, startup_trials: int):
    """Median (a trial worse than the median of the finished ones at the same step stops), Hyperband, or none.
    ``startup_trials``: trials that finish before the median pruner prunes anything."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


@dataclass
class Tally:
    counted: int  # ended trials that count toward n_trials
    running: int
    waiting: int  # retries (and enqueued trials) not yet started
    complete: int
    pruned: int
    failed: int


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were retried (their retry holds their place)."""
    with quiet_experimental():
        return {number for t in trials for number in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Every trial that holds a place among n_trials, in any state: not a surplus one, not one that was retried."""
    retried = retried_numbers(trials)
    return [t for t in trials if not t.user_attrs.get(SURPLUS) and t.number not in retried]


def tally(study: optuna.Study) -> Tally:
    with quiet_experimental():
        trials = counted_trials(study.get_trials(deepcopy=False))
    states = [t.state for t in trials]
    complete, pruned, failed = (states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return Tally(complete + pruned + failed, states.count(TrialState.RUNNING), states.count(TrialState.WAITING),
                 complete, pruned, failed)


def place_of(trial: FrozenTrial) -> int:
    """The trial's place in the study: a retry takes the place of the trial it retries (trial 0 included)."""
    retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if retried is None else retried


def is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether trial ``number`` (just started) is beyond the first ``n_trials`` places. A retry takes the place
    of the trial it retries; otherwise the lower number wins: every worker reaches the same answer."""
    with quiet_experimental():
        trials = counted_trials(study.get_trials(deepcopy=False))
        order = sorted(trials, key=lambda t: (place_of(t), t.number))
    numbers = [t.number for t in order]
    return number not in numbers or numbers.index(number) >= n_trials


def process_record(number: int) -> dict[str, Any]:
    """Who runs trial ``number``: recorded as its first act, so that a worker on this host can tell when it died."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_started": f"{psutil.Process().create_time():.2f}", "trial": number}


def recover_dead_trials(study: optuna.Study, on_dead: Callable[[optuna.Study, FrozenTrial], None]) -> list[int]:
    """Fail the RUNNING trials whose process is gone and hand each to ``on_dead`` (which ends its MLflow runs and
    retries it). On this host a trial's process is checked directly (any storage: the journal file has no
    heartbeat); on an RDB storage Optuna's heartbeat also fails trials of other hosts (calling the same
    ``on_dead``). A trial another worker fails first is left to that worker. Returns the numbers failed here."""
    from textclf.records.tracking import process_is_alive

    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        record = trial.user_attrs.get(PROCESS)
        if record is None or record.get("trial") != trial.number:  # not yet claimed (a retry carries its
            started = trial.datetime_start.timestamp() if trial.datetime_start else now  # original's record)
            if now - started < UNCLAIMED_SECONDS:
                continue
        elif record["host"] != socket.gethostname() or process_is_alive(int(record["pid"]), record["pid_started"]):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError, ValueError):
            continue  # another worker failed it first (or it ended meanwhile)
        log.warning("trial %d: its process (%s) is gone; failed and retried", trial.number,
                    f"pid {record['pid']}" if record else "never started")
        on_dead(study, trial)
        failed.append(trial.number)
    return failed


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a new trial with ``trial``'s parameters (and reported values, for the pruner), unless the
    configuration was already retried MAX_RETRIES times: then the failure counts."""
    with quiet_experimental():
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)(study, trial)


class PruningCallback(TrainerCallback):
    """Reports the validation metric to the trial at every evaluation; when the pruner says so, training stops
    after saving that step, so the run still picks its best checkpoint, is tested and logged in full.
    Added to ``run_training(extra_callbacks=...)``; the caller raises ``optuna.TrialPruned`` once the run is logged.

    Optuna's pruners compare trials at the same reported step. A trial evaluated a number of times
    (``by_evaluation``: the ``evaluations`` parameter) evaluates at steps of its own, so it reports its k-th
    evaluation as step k."""

    def __init__(self, trial: optuna.Trial, metric: str, by_evaluation: bool = False):
        self.trial, self.key, self.pruned_at = trial, f"eval_{metric}", None
        self.by_evaluation = by_evaluation

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.key)
        if value is None or not state.is_world_process_zero:
            return
        # The Trainer has logged this evaluation before calling back (a resumed run's earlier ones too).
        evaluated = {entry["step"] for entry in state.log_history if self.key in entry}
        self.trial.report(float(value), len(evaluated) if self.by_evaluation else state.global_step)
        if self.pruned_at is None and self.trial.should_prune():
            log.info("trial %d pruned at step %d (%s %.4f)", self.trial.number, state.global_step, self.key, value)
            self.pruned_at = state.global_step
            control.should_training_stop = True
            control.should_save = True  # the pruned step competes for best checkpoint like any other


OWNER_CLAIM_SECONDS = 120  # a claim this fresh is respected even while its parent run is not RUNNING yet


def owner_record() -> dict[str, Any]:
    return {**process_record(-1), "token": uuid.uuid4().hex, "claimed_at": time.time()}


def owner_holds(owner: dict[str, Any] | None, parent_running: bool) -> bool:
    """Whether the recorded owner still holds the study's parent run, so another process must not take it: it
    has not ended it, its process lives (or runs on another host, where it cannot be checked), and its run is
    RUNNING or it claimed the study moments ago and is about to start it (two processes continuing a finished
    study at once must not both become its owner)."""
    if not owner or owner.get("ended") or not owner_alive(owner):
        return False
    return parent_running or time.time() - owner.get("claimed_at", 0) < OWNER_CLAIM_SECONDS


def release_owner(study: optuna.Study, token: str) -> None:
    """Mark this process's ownership ended (its parent run is ended): a later start may take the study over."""
    owner = study.user_attrs.get(OWNER) or {}
    if owner.get("token") == token:
        study.set_user_attr(OWNER, {**owner, "ended": True})


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the owner process still runs (one on another host is assumed to: it cannot be checked here)."""
    from textclf.records.tracking import process_is_alive

    if owner.get("host") != socket.gethostname():
        return True
    return process_is_alive(int(owner["pid"]), owner.get("pid_started"))


def claim_owner(study: optuna.Study) -> str | None:
    """Write this process as the study's owner; it owns it, and gets its token back, if no other claim overwrote
    it within CLAIM_SECONDS (the storage orders writes, so every claimant reads the same last one)."""
    record = owner_record()
    study.set_user_attr(OWNER, record)
    time.sleep(CLAIM_SECONDS)
    return record["token"] if (study.user_attrs.get(OWNER) or {}).get("token") == record["token"] else None
