"""SIGTERM and SIGINT as an exception, so that a long command cleans up (its MLflow run ends KILLED).

:func:`interrupts_raise` turns either signal into :class:`~textclf.errors.TrainingInterrupted`;
``tracking.tracked_run`` installs it around every tracked command (train, each seed of sweep, every process of
train_deepspeed, evaluate, baseline). Inside the training loop (:func:`deferred_interrupts`) the first signal is
only recorded and raised at a safe point, between steps, by :class:`InterruptCallback`: raised from inside
library code it could be caught and re-wrapped. A second signal raises at once, unless it follows the previous
one within :data:`SAME_INTERRUPT_SECONDS` (then it is ignored, in the training loop or in the cleanup after
it): Ctrl-C in a terminal under `mlflow run` reaches the command twice, as SIGINT from the terminal and SIGTERM
from `mlflow run` cancelling it, and that is one interrupt, not an impatient second one.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Iterator

from transformers import TrainerCallback

from textclf.distributed.ranks import any_rank
from textclf.errors import TrainingInterrupted


class _Interrupts:
    """This process's signal state: whether signals are deferred now, and the one recorded while they were."""

    deferred = False
    requested: str | None = None
    last_signal_at = float("-inf")  # time.monotonic() of the last signal that acted


SAME_INTERRUPT_SECONDS = 2.0


def raise_if_interrupted() -> None:
    """Raise TrainingInterrupted for a signal recorded while deferred (and forget it)."""
    if _Interrupts.requested:
        name, _Interrupts.requested = _Interrupts.requested, None
        raise TrainingInterrupted(name)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Record the first signal instead of raising it; raised by :class:`InterruptCallback` between steps, or on
    leaving. Only a Trainer that has an InterruptCallback takes a recorded signal before it finishes."""
    _Interrupts.deferred = True
    try:
        yield
    finally:
        _Interrupts.deferred = False
    raise_if_interrupted()


class InterruptCallback(TrainerCallback):
    """Raises a signal recorded by :func:`deferred_interrupts` after a step and before its logs are written.
    Put it first among the callbacks, so that no other callback acts on a step that was interrupted.

    With several processes (DeepSpeed) the ranks agree after every step: each would otherwise stop at the step
    where its own signal happened to be seen, and a rank still in the next step's collectives waits forever.
    A rank that was not signalled stops with the others."""

    def on_step_end(self, args, state, control, **kwargs):
        # With several ranks, decided by the reduced flag alone: a signal after the all-reduce waits for the next.
        if any_rank(bool(_Interrupts.requested), args.device):
            name, _Interrupts.requested = _Interrupts.requested or "SIGTERM", None
            raise TrainingInterrupted(name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if args.world_size == 1:  # between steps the ranks cannot agree without a collective of their own
            raise_if_interrupted()


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`TrainingInterrupted` (deferred inside :func:`deferred_interrupts`),
    so cleanup code runs; the previous handlers come back on leaving."""

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if now - _Interrupts.last_signal_at < SAME_INTERRUPT_SECONDS:
            return  # the same interrupt delivered twice (see the module's docstring), even mid-cleanup
        _Interrupts.last_signal_at = now
        if _Interrupts.deferred and not _Interrupts.requested:
            _Interrupts.requested = name
            return
        _Interrupts.requested = None  # this interrupt supersedes a recorded one: nothing is left to raise later
        raise TrainingInterrupted(name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
