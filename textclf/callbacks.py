"""Trainer callbacks of a training run, besides MLflow logging (textclf.tracking) and interrupts (textclf.signals):
self-describing checkpoints and the time budget."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from textclf import checkpoints
from textclf.signals import any_rank

log = logging.getLogger(__name__)


class CheckpointCallback(TrainerCallback):
    """Makes each checkpoint describe itself (textclf.json, the run's config.json and recipe) and marks it
    complete last."""

    def __init__(self, spec, run_recipe: dict[str, str], run_config: dict[str, Any] | None = None):
        self.spec, self.run_recipe, self.run_config = spec, run_recipe, run_config

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                checkpoints.finalize(folder, self.spec, self.run_recipe, self.run_config)


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
