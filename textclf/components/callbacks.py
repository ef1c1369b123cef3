"""Trainer callbacks of a training run, besides MLflow logging (textclf.records.tracking) and interrupts (textclf.process.signals):
self-describing checkpoints, the best checkpoint of a resumed run, and the time budget."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from textclf.components import checkpoints
from textclf.distributed.ranks import any_rank, from_main_process, is_main_process

log = logging.getLogger(__name__)


class CheckpointCallback(TrainerCallback):
    """Makes each checkpoint describe itself (textclf.json, the run's training_config.json and recipe) and marks it
    complete last."""

    def __init__(self, spec, run_recipe: dict[str, str], run_config: dict[str, Any] | None = None):
        self.spec, self.run_recipe, self.run_config = spec, run_recipe, run_config

    def on_save(self, args, state, control, **kwargs):
        if is_main_process():
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                checkpoints.finalize(folder, self.spec, self.run_recipe, self.run_config)


def best_saved_step(log_history: list[dict], output_dir: Path, metric: str, greater: bool) -> tuple[int, float] | None:
    """The step and score of the best complete checkpoint in ``output_dir`` by ``metric`` (``eval_...``), read
    from the Trainer's log history; ties go to the earliest step, as the Trainer breaks them. None when no
    complete checkpoint was evaluated."""
    saved = {checkpoints.step_of(folder) for folder in checkpoints.checkpoint_folders(output_dir)
             if checkpoints.is_complete(folder)}
    scores = [(entry["step"], entry[metric]) for entry in log_history if metric in entry and entry.get("step") in saved]
    if not scores:
        return None
    return min(scores, key=lambda item: (-item[1] if greater else item[1], item[0]))


def select_best_saved(state, output_dir: Path, metric: str, greater: bool) -> None:
    """Point the Trainer state's best checkpoint at the best complete checkpoint in ``output_dir``; with several
    processes, at rank 0's (every rank must call this at the same point).

    A state written before textclf let only saved steps compete (ClassifierTrainer._determine_best_metric)
    can hold a best score that no checkpoint has: resumed as it is, no later checkpoint could be selected.
    Rank 0 decides because the ranks of other nodes keep folders of their own, which are never rotated."""
    best = from_main_process(best_saved_step(state.log_history, output_dir, metric, greater))
    if best is not None:
        state.best_global_step, state.best_metric = best
        state.best_model_checkpoint = str(output_dir / f"checkpoint-{best[0]}")


class BestOfResumedRun(TrainerCallback):
    """On resuming, re-chooses the best checkpoint among the saved ones (:func:`select_best_saved`)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step:
            select_best_saved(state, Path(args.output_dir), args.metric_for_best_model, args.greater_is_better)


class TimeBudgetCallback(TrainerCallback):
    """Ends training once it has run ``minutes`` (evaluations included, counted from this process's
    start or resume), evaluating and saving that last step so it competes for best checkpoint.

    The ranks of a multi-process run agree through an all-reduce: a rank that stopped alone would
    leave the others waiting on a collective forever.
    """

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = any_rank(time.perf_counter() - self.started >= self.seconds, args.device)
        if over and not control.should_training_stop:
            log.info("time budget of %.1f min reached at step %d: evaluating, saving and stopping",
                     self.seconds / 60, state.global_step)
            control.should_training_stop = control.should_evaluate = control.should_save = True
