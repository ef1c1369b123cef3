"""SIGINT/SIGTERM during training: recorded and raised between steps; a real second interrupt raises at once."""

from __future__ import annotations

import os
import signal

import pytest

from textclf.errors import TrainingInterrupted
from textclf.process import signals
from textclf.process.signals import deferred_interrupts, interrupts_raise


@pytest.fixture(autouse=True)
def no_recent_signal(monkeypatch):
    monkeypatch.setattr(signals._Interrupts, "last_signal_at", float("-inf"))


def test_ctrl_c_under_mlflow_run_is_one_interrupt_raised_at_the_safe_point():
    """A terminal's Ctrl-C reaches the command as SIGINT, and `mlflow run` sends SIGTERM right after: the
    training must still stop between steps, not wherever the second signal lands."""
    reached_the_safe_point = False
    with interrupts_raise(), pytest.raises(TrainingInterrupted, match="SIGINT"):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            reached_the_safe_point = True
    assert reached_the_safe_point


def test_a_second_interrupt_after_a_while_raises_at_once(monkeypatch):
    monkeypatch.setattr(signals, "SAME_INTERRUPT_SECONDS", 0.0)
    reached = False
    with interrupts_raise(), pytest.raises(TrainingInterrupted, match="SIGTERM"):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # the user insists
            reached = True
    assert not reached
    # Nothing recorded is left behind to stop the next training in this process (a sweep's next seed, a test).
    with deferred_interrupts():
        pass


def test_mlflow_runs_sigterm_right_after_a_ctrl_c_does_not_cut_the_cleanup_short():
    """Outside the training loop the first signal raises at once; the second, ms later, must not interrupt the
    cleanup that ends the run KILLED."""
    cleaned_up = False
    with pytest.raises(TrainingInterrupted, match="SIGINT"):
        with interrupts_raise():
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except TrainingInterrupted:
                os.kill(os.getpid(), signal.SIGTERM)  # `mlflow run` cancelling, during the cleanup
                cleaned_up = True
                raise
    assert cleaned_up
