"""A run sized to its time budget (``fit_to_budget``): the number of steps the budget holds on this machine,
measured while training, with the learning-rate warm-up and decay stretched or shrunk to it; and evaluations
spread over the run's length (``evaluations``), whatever that length turns out to be.

Without it a recipe's step count is fixed for one machine: on a faster CPU the run ends early and leaves
minutes unused, on a slower one the budget cuts it off before the learning rate has decayed. The Trainer
fixes a schedule's length when it builds it (``get_scheduler``), so the length lives here, in a
:class:`ScheduleLength` that the learning-rate factor reads at every step and that :class:`FitToBudget` sets.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from transformers import TrainerCallback

from textclf.distributed.ranks import from_main_process, is_main_process
from textclf.errors import TextclfError

log = logging.getLogger(__name__)


@dataclass
class ScheduleLength:
    """The optimizer steps a run plans and its warm-up steps; ``warmup_ratio`` (when warm-up is a fraction of
    the run) keeps the warm-up in proportion when the run's length changes."""

    total: int
    warmup: int
    warmup_ratio: float | None = None

    # A callable object rather than a function: torch's LambdaLR saves its __dict__ with the scheduler's state,
    # so a resumed run gets back the length its schedule had.
    def __call__(self, step: int) -> float:
        return self.factor(step)

    def resize(self, total: int) -> None:
        self.total = total
        if self.warmup_ratio is not None:
            self.warmup = math.ceil(total * self.warmup_ratio)

    def factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of the peak: transformers' linear schedule
        (``get_linear_schedule_with_warmup``), written out because its length here can change."""
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def evaluations_between(first_step: int, last_step: int, eval_every: int) -> int:
    """How many evaluations the steps ``first_step + 1 .. last_step`` hold: every ``eval_every`` steps and
    the last one (the Trainer evaluates and saves the step it ends on)."""
    count = last_step // eval_every - first_step // eval_every
    return count + (last_step % eval_every != 0)


def last_affordable_step(step: int, seconds_left: float, step_seconds: float, evaluation_seconds: float,
                         evaluations_until: Callable[[int], int], upper_bound: int) -> int:
    """The last step after ``step`` whose training steps and evaluations (``evaluations_until(last)`` of them,
    growing with ``last``) fit in ``seconds_left``: at most ``upper_bound``, at least ``step + 1`` (a run over
    its budget ends at the next step)."""

    def cost(last: int) -> float:
        return (last - step) * step_seconds + evaluations_until(last) * evaluation_seconds

    low, high = min(step + 1, upper_bound), upper_bound
    if cost(high) <= seconds_left:
        return high
    while low < high:  # the largest last step whose cost fits: cost grows with it
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= seconds_left else (low, middle - 1)
    return low


class EvenEvaluations(TrainerCallback):
    """Evaluates (and saves) the run ``count`` times, evenly over its length, the last step included. A cadence
    in steps evaluates a run fitted to its budget as often as the machine is fast (the SST-2 recipe evaluated
    every 115 steps: 4 times on one CPU, 7 on a faster one), and every evaluation costs training time.

    Each evaluation falls at the step that splits what is left of the planned run evenly among the evaluations
    still to come, so the count holds when ``fit_to_budget`` moves the length while training. The Trainer's flow
    only evaluates at the multiples of one cadence (``state.eval_steps``), which a moving length cannot keep (a
    cadence fixed early ends up evaluating twice in a row, or twice as often), so this callback decides: it sets
    the flow's cadence where it never fires (``NEVER``, also the run's ``eval_steps``/``save_steps`` arguments, so
    that a resumed run's arguments match its trainer state; the flow still evaluates and saves the last step) and
    sets ``should_evaluate``/``should_save`` itself. Add it before the callbacks that read which steps evaluate:
    :class:`FitToBudget` also plans with :meth:`left`. It follows the length planned up to the step before (a plan
    moves a few steps at a time)."""

    NEVER = 2**62  # a cadence no step reaches

    def __init__(self, count: int):
        self.count = count
        self.done = self.last_evaluated = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run's trainer state brings back the evaluations it ran, with their steps.
        evaluated = {entry["step"] for entry in state.log_history if any(key.startswith("eval_") for key in entry)}
        self.done, self.last_evaluated = len(evaluated), max(evaluated, default=0)
        state.eval_steps = state.save_steps = self.NEVER

    def on_step_end(self, args, state, control, **kwargs):
        due = self.last_evaluated + math.ceil((state.max_steps - self.last_evaluated) / self.left())
        if state.global_step >= due:
            control.should_evaluate = control.should_save = True
        if control.should_evaluate:  # this one's, the flow's at the last step, or another callback's
            self.done += 1
            self.last_evaluated = state.global_step

    def left(self) -> int:
        """The evaluations still to come: at least the last step's."""
        return max(1, self.count - self.done)


class FitToBudget(TrainerCallback):
    """Times the training steps and the evaluations (with their saves) and sets the run's last step to what
    ``minutes`` hold: ``state.max_steps``, at which the Trainer evaluates, saves and stops, and the
    :class:`ScheduleLength` that the learning rate follows. The steps the Trainer planned
    (``epochs``/``max_steps``) are the upper bound. It plans once ``min_steps`` are timed (the first step of a
    process is not: it also builds what later steps reuse), so that the warm-up is sized to the budget while
    it is still short, and again every ``replan_every`` steps.

    A step's time is read per token trained (``counts``, filled by the Trainer) times the tokens of an average
    step (``mean_row_tokens`` x rows per step): a mean per step would be far off early on, because the
    length-grouped sampler serves each run of 50 batches longest first. The time per token is that of the
    steps since the last ``window`` plans (~100 steps): a stall of the machine (another process, a slow hour of a
    VM) stops weighing on the plan once it is that far behind, where the mean of the whole run would keep
    shortening the run for a time it lost only once, and a drift (steps slowing as training goes on) is followed.
    Before the first evaluation its cost is estimated at half a training step's time per token of the validation
    rows (``eval_tokens``; no backward pass); each evaluation measured replaces the estimate. Rank 0 plans and the
    other ranks follow it (every rank plans at the same steps). A resumed run keeps the length its schedule had as
    its upper bound, and plans with a budget of its own (the time budget counts per process). With
    ``evaluations`` the run is evaluated a number of times rather than every ``eval_steps``: the plan counts the
    evaluations still to come."""

    def __init__(self, minutes: float, length: ScheduleLength, counts, mean_row_tokens: float, eval_tokens: int,
                 evaluations: EvenEvaluations | None = None, min_steps: int = 5, replan_every: int = 10,
                 window: int = 10, margin: float = 0.01):
        self.seconds = minutes * 60 * (1 - margin)
        self.length, self.counts, self.evaluations = length, counts, evaluations
        self.mean_row_tokens, self.eval_tokens = mean_row_tokens, eval_tokens
        self.min_steps, self.replan_every, self.window = min_steps, replan_every, window
        self.upper_bound = length.total
        self.reset_timers()

    def reset_timers(self) -> None:
        self.started = time.perf_counter()
        self.step_started = self.last_step_ended = None
        self.step_seconds = self.evaluation_seconds = 0.0
        # (seconds, tokens) of the timed steps between two plans, the last `window` intervals. Tokens are read at
        # plans only: on a GPU, reading the count waits for the device.
        self.intervals: deque[tuple[float, float]] = deque(maxlen=self.window)
        self.seconds_planned = self.tokens_planned = 0.0  # step time and tokens at the last plan
        self.steps_seen = self.steps_timed = self.evaluations_timed = 0
        self.evaluating = False  # whether the step that just ended is evaluated (and saved) before the next one

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.length.total:
            raise TextclfError("fit_to_budget needs textclf's learning-rate schedule: remove 'scheduler' from the "
                               "DeepSpeed config")
        self.reset_timers()
        self.upper_bound = state.max_steps
        if state.global_step and state.global_step < self.length.total < state.max_steps:
            # Resumed: the planned length came back with the scheduler's state. A new plan may shorten it (the
            # budget counts per process) but never lengthen it: its learning rate would climb back up.
            state.max_steps = self.upper_bound = self.length.total

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last_step_ended is not None:
            gap = now - self.last_step_ended  # logging and the next batch; or an evaluation and a save
            if self.evaluating:
                self.evaluation_seconds += gap
                self.evaluations_timed += 1
            else:
                self.step_seconds += gap
        self.step_started = now

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after the Trainer's flow callback has decided whether this step evaluates, saves or ends the run.
        now = time.perf_counter()
        self.steps_seen += 1
        if self.steps_seen == 1:
            self.tokens_planned = float(self.counts.real_tokens)  # the first step's: not timed
        else:
            self.step_seconds += now - self.step_started
            self.steps_timed += 1
            self.last_step_ended = now
        self.evaluating = control.should_evaluate or control.should_save
        ending = control.should_training_stop or state.global_step >= state.max_steps
        due = self.steps_timed == self.min_steps or (self.steps_timed > self.min_steps
                                                     and state.global_step % self.replan_every == 0)
        if due and not ending:
            self.plan(args, state, now)

    def plan(self, args, state, now: float) -> None:
        tokens = float(self.counts.real_tokens)
        self.intervals.append((self.step_seconds - self.seconds_planned, tokens - self.tokens_planned))
        self.seconds_planned, self.tokens_planned = self.step_seconds, tokens
        seconds_per_token = sum(s for s, _ in self.intervals) / max(1.0, sum(t for _, t in self.intervals))
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        step_seconds = seconds_per_token * self.mean_row_tokens * rows_per_step
        if self.evaluations_timed:
            evaluation_seconds = self.evaluation_seconds / self.evaluations_timed
        else:
            evaluation_seconds = 0.5 * seconds_per_token * self.eval_tokens / max(1, args.world_size)
        # Held back: the evaluation this step still runs, and two steps for steps slower than the mean until the next plan.
        held_back = (evaluation_seconds if self.evaluating else 0.0) + 2 * step_seconds
        seconds_left = self.seconds - (now - self.started) - held_back
        step = state.global_step
        if self.evaluations is not None:  # a fixed number still to come, the last step's among them
            evaluations_until = lambda last: min(self.evaluations.left(), last - step)  # noqa: E731
        else:
            evaluations_until = lambda last: evaluations_between(step, last, state.eval_steps)  # noqa: E731
        last = last_affordable_step(step, seconds_left, step_seconds, evaluation_seconds, evaluations_until,
                                    self.upper_bound)
        last = from_main_process(last)
        if last != state.max_steps:
            if is_main_process() and abs(last - state.max_steps) >= 0.05 * state.max_steps:
                log.info("fit_to_budget: %.2f s per step, %.1f s per evaluation: the budget holds %d steps (was %d)",
                         step_seconds, evaluation_seconds, last, state.max_steps)
            state.max_steps = last
            self.length.resize(last)
