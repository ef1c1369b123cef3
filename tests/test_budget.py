"""fit_to_budget: a run sized to its time budget on the machine at hand, its learning rate decayed by the end."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup

from textclf.components.budget import ScheduleLength, evaluations_between, last_affordable_step
from textclf.config import build_config
from textclf.errors import TextclfError


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def rates(scheduler, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_a_fixed_length_is_transformers_linear_schedule():
    length = ScheduleLength(total=0, warmup=0, warmup_ratio=0.1)
    length.resize(50)
    assert length.warmup == 5
    ours = rates(LambdaLR(optimizer(), length), 55)
    theirs = rates(get_linear_schedule_with_warmup(optimizer(), num_warmup_steps=5, num_training_steps=50), 55)
    assert ours == pytest.approx(theirs)


def test_a_new_length_moves_the_decay_and_comes_back_with_the_schedulers_state():
    length = ScheduleLength(total=100, warmup=10, warmup_ratio=0.1)
    scheduler = LambdaLR(optimizer(), length)
    rates(scheduler, 20)
    length.resize(40)  # the budget holds fewer steps than planned
    assert (length.total, length.warmup) == (40, 4)
    assert scheduler.lr_lambdas[0](20) == pytest.approx(20 / 36) and scheduler.lr_lambdas[0](40) == 0.0
    saved = scheduler.state_dict()
    resumed_length = ScheduleLength(total=100, warmup=10, warmup_ratio=0.1)
    resumed = LambdaLR(optimizer(), resumed_length)
    resumed.load_state_dict(saved)
    assert (resumed_length.total, resumed_length.warmup) == (40, 4)


def test_the_last_affordable_step_counts_steps_and_evaluations():
    # Evaluations every 10 steps and at the last one.
    assert evaluations_between(0, 30, 10) == 3 and evaluations_between(5, 34, 10) == 4 and evaluations_between(30, 31, 10) == 1
    # From step 20, 100 s left, 1 s per step, 5 s per evaluation: step 110 costs 90 + 9 * 5 = 135 s; step 85 costs
    # 65 + 7 * 5 = 100 s (evaluations at 30..80 and 85).
    every_10 = lambda last: evaluations_between(20, last, 10)  # noqa: E731
    assert last_affordable_step(20, 100.0, 1.0, 5.0, every_10, upper_bound=1000) == 85
    assert last_affordable_step(20, 100.0, 1.0, 5.0, every_10, upper_bound=50) == 50  # never past what the run may run
    assert last_affordable_step(20, 1.0, 1.0, 5.0, every_10, upper_bound=1000) == 21  # over budget: one step more
    # Three evaluations still to come (evaluations=N), wherever the run ends: 85 steps and 15 s of them.
    assert last_affordable_step(20, 100.0, 1.0, 5.0, lambda last: min(3, last - 20), upper_bound=1000) == 105


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def descending_runs(step: int) -> int:
    """Tokens of a step as the length-grouped sampler serves them: runs of 50 batches, longest first (800 tokens
    down to 200; 500 on average)."""
    return 800 - 600 * ((step - 1) % 50) / 49


def simulate(monkeypatch, minutes: float, upper_bound: int, evaluation_seconds: float, eval_every: int,
             step_tokens=descending_runs, seconds_per_token: float = 0.002, evaluations: int = 0,
             stalls: dict[int, float] | None = None) -> tuple[list[int], list[int], float]:
    """Drive FitToBudget (and EvenEvaluations where ``evaluations``) beside the Trainer's flow callback on a fake
    clock, as the Trainer calls them, with steps that take ``seconds_per_token``: the evaluated steps, the planned
    length seen at each step, and the seconds the run took."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import DefaultFlowCallback

    from textclf.components import budget
    from textclf.components.trainer import BatchCounts

    clock = Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=8, eval_strategy="steps",
                             eval_steps=eval_every, save_strategy="steps", save_steps=eval_every, report_to=[])
    state, control, flow = TrainerState(max_steps=upper_bound), TrainerControl(), DefaultFlowCallback()
    state.compute_steps(args, upper_bound)
    length, counts = ScheduleLength(total=upper_bound, warmup=0, warmup_ratio=0.1), BatchCounts()
    even = budget.EvenEvaluations(evaluations) if evaluations else None
    fit = budget.FitToBudget(minutes, length, counts, mean_row_tokens=500 / 8, eval_tokens=64 * 60, evaluations=even)
    callbacks = [even, fit] if even else [fit]  # as textclf.recipes.training adds them
    for callback in callbacks:
        callback.on_train_begin(args, state, control)
    evaluated, planned = [], []
    while not control.should_training_stop:
        fit.on_step_begin(args, state, control)
        tokens = step_tokens(state.global_step + 1)
        counts.real_tokens += tokens
        clock.now += tokens * seconds_per_token * (3 if state.global_step == 0 else 1)  # the first builds what the rest reuse
        state.global_step += 1
        clock.now += (stalls or {}).get(state.global_step, 0.0)  # the machine busy elsewhere
        flow.on_step_end(args, state, control)
        for callback in callbacks:
            callback.on_step_end(args, state, control)
        planned.append(state.max_steps)
        assert length.total == state.max_steps <= upper_bound
        assert control.should_save == control.should_evaluate  # every evaluated step can be selected
        if control.should_evaluate:
            evaluated.append(state.global_step)
            clock.now += evaluation_seconds
        control.should_evaluate = control.should_save = False
    return evaluated, planned, clock.now


def test_the_run_ends_where_its_budget_does_with_its_last_step_evaluated(monkeypatch):
    # 1 s per step on average (the longest first in each run of 50), evaluations every 10 steps that take what
    # FitToBudget estimates before timing one (half a training step's time per token: 0.5 x 0.002 x 3,840 s):
    # 2 minutes hold ~80 steps, far fewer than the 1,000 allowed.
    evaluated, planned, seconds = simulate(monkeypatch, 2.0, 1000, 3.84, 10)
    last = planned[-1]
    assert evaluated[-1] == last and evaluated[:-1] == list(range(10, last, 10))
    assert 120 - 3 * 1.6 - 3.84 <= seconds <= 120  # little left: the two steps held back, one more and its evaluation
    assert planned[:5] == [1000] * 5 and planned[5] < 1000  # planned at step 6, once 5 steps are timed (not the first)
    # ... and near the end already, though its steps were the longest of their run (1.5 s each: a mean per step
    # would have planned ~55): it reads time per token.
    assert abs(planned[5] - last) <= 0.07 * last
    # Evaluations slower than estimated: the plans that follow them end the run sooner, still inside the budget.
    evaluated, planned, seconds = simulate(monkeypatch, 2.0, 1000, 8.0, 10)
    assert planned[-1] < planned[5] and evaluated[-1] == planned[-1] and 120 - 3 * 1.6 - 8.0 <= seconds <= 120
    # An upper bound the budget holds is run whole.
    evaluated, planned, seconds = simulate(monkeypatch, 2.0, 50, 5.0, 10)
    assert planned == [50] * 50 and evaluated == [10, 20, 30, 40, 50] and seconds < 90


def test_a_stall_stops_shortening_the_plan_once_it_is_100_steps_behind(monkeypatch):
    # 10 minutes of 1-s steps, evaluated every 100 steps; step 30 stalls for a minute. The plan reads the time per
    # token of the last ~100 steps, so by step 200 it plans what the run ends on (a mean over the whole run still
    # counted the minute against every step there: 437 steps planned at step 200, and 500 run).
    evaluated, planned, seconds = simulate(monkeypatch, 10.0, 10_000, 3.84, 100, stalls={30: 60.0})
    assert abs(planned[199] - planned[-1]) <= 0.02 * planned[-1]
    # The budget used (a step past 500 would cost a sixth evaluation: the run ends there, 17 s early).
    assert 0.96 * 600 <= seconds <= 600 and evaluated[-1] == planned[-1]


def test_evaluations_spread_over_the_length_the_budget_holds(monkeypatch):
    def gaps(evaluated: list[int]) -> list[int]:
        return [b - a for a, b in zip([0, *evaluated], evaluated)]

    # Four evaluations asked for (eval_steps, 10, is what they replace). The budget holds ~80 steps of the 1,000
    # allowed, which the run learns at step 6: the evaluations split the length planned as it moves, the last step
    # is one of them, and the budget is used as without them.
    evaluated, planned, seconds = simulate(monkeypatch, 2.0, 1000, 3.84, 10, evaluations=4)
    assert len(evaluated) == 4 and evaluated[-1] == planned[-1]
    assert abs(planned[5] - planned[-1]) <= 0.07 * planned[-1]  # the first plan counts the four to come
    assert all(abs(gap - planned[-1] / 4) <= 0.2 * planned[-1] / 4 for gap in gaps(evaluated))
    assert 120 - 3 * 1.6 - 3.84 <= seconds <= 120
    # Evaluations twice as slow as estimated before the first: the plan shrinks after it (from 90 steps to ~75), and
    # the three left split what remains (a cadence fixed at the first, 23 steps, would have evaluated at 46, 69 and 74).
    # The plan moves a few steps as the runs of long and short batches pass: no gap is under half of an even one.
    evaluated, planned, seconds = simulate(monkeypatch, 2.0, 1000, 8.0, 10, evaluations=4)
    assert len(evaluated) == 4 and evaluated[-1] == planned[-1] and min(gaps(evaluated)) >= 0.5 * planned[-1] / 4
    # A stall in the first steps: the first plans are short, the run then grows; still four, the last at the end.
    evaluated, planned, seconds = simulate(monkeypatch, 2.0, 1000, 3.84, 10, evaluations=4, stalls={3: 20.0})
    assert len(evaluated) == 4 and evaluated[-1] == planned[-1] and seconds <= 120
    # Fewer evaluations than every 10 steps leave more steps in the same budget.
    _, planned_often, _ = simulate(monkeypatch, 2.0, 1000, 8.0, 10)
    _, planned, _ = simulate(monkeypatch, 2.0, 1000, 8.0, 10, evaluations=4)
    assert planned[-1] > planned_often[-1]
    # A length the budget holds whole: 50 steps in 4 evaluations.
    evaluated, planned, _ = simulate(monkeypatch, 2.0, 50, 5.0, 10, evaluations=4)
    assert planned == [50] * 50 and evaluated == [13, 26, 38, 50]


def test_even_evaluations_are_never_behind_the_plan_and_resume_with_those_already_run():
    from transformers import TrainerControl, TrainerState

    from textclf.components.budget import EvenEvaluations

    def evaluates(callback: EvenEvaluations, step: int, max_steps: int) -> bool:
        state.global_step, state.max_steps = step, max_steps
        control = TrainerControl()
        callback.on_step_end(None, state, control)
        assert control.should_save == control.should_evaluate
        return control.should_evaluate

    state, even = TrainerState(max_steps=1000), EvenEvaluations(4)
    even.on_train_begin(None, state, TrainerControl())
    assert state.eval_steps == state.save_steps == EvenEvaluations.NEVER  # the flow's cadence never fires
    assert not evaluates(even, 100, 1000) and evaluates(even, 250, 1000) and even.left() == 3
    assert not evaluates(even, 251, 1000) and not evaluates(even, 499, 1000)  # the next at 250 + 750 / 3
    assert evaluates(even, 270, 280)  # the plan shrank: 250 + 30 / 3 is behind this step, which evaluates
    assert even.left() == 2 and not evaluates(even, 274, 280) and evaluates(even, 275, 280)
    # Resumed from the checkpoint of step 388 of 776, after evaluations at 194 and 388 that its trainer state brings
    # back: the two left split the rest, at 582 and 776.
    state = TrainerState(max_steps=776, global_step=388)
    state.log_history = [{"loss": 0.5, "step": 190}, {"eval_loss": 0.4, "eval_f1_macro": 0.8, "step": 194},
                         {"loss": 0.4, "step": 380}, {"eval_loss": 0.3, "step": 388}]
    resumed = EvenEvaluations(4)
    resumed.on_train_begin(None, state, TrainerControl())
    assert resumed.left() == 2 and not evaluates(resumed, 581, 776) and evaluates(resumed, 582, 776)
    assert resumed.left() == 1 and not evaluates(resumed, 775, 776) and evaluates(resumed, 776, 776)


def test_a_resumed_run_may_end_sooner_but_never_later_than_its_schedule_had_planned(monkeypatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from textclf.components import budget
    from textclf.components.trainer import BatchCounts

    clock = Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=8, eval_strategy="steps", eval_steps=100,
                             save_strategy="steps", save_steps=100, report_to=[])
    # Stopped at step 700 of the 776 its budget held; the Trainer plans 1,730 again (two epochs) on resuming, and the
    # scheduler's state brings the planned length back.
    state, control = TrainerState(max_steps=1730, global_step=700), TrainerControl()
    state.compute_steps(args, 1730)
    length, counts = ScheduleLength(total=776, warmup=78, warmup_ratio=0.1), BatchCounts()
    fit = budget.FitToBudget(60.0, length, counts, mean_row_tokens=500 / 8, eval_tokens=64 * 60)
    fit.on_train_begin(args, state, control)
    assert state.max_steps == 776
    for _ in range(10):  # an hour of budget and 1-s steps: all the time the run wants
        fit.on_step_begin(args, state, control)
        counts.real_tokens += 500
        clock.now += 1.0
        state.global_step += 1
        fit.on_step_end(args, state, control)
    assert state.max_steps == length.total == 776
    # A schedule textclf did not build (a DeepSpeed config naming its own scheduler) cannot be fitted.
    with pytest.raises(TextclfError, match="scheduler"):
        budget.FitToBudget(1.0, ScheduleLength(total=0, warmup=0), counts, 1.0, 1).on_train_begin(args, state, control)


def test_fit_to_budget_needs_a_budget():
    with pytest.raises(TextclfError, match="fit_to_budget .* max_train_minutes"):
        build_config(dataset="sst2", fit_to_budget=True)
    assert build_config(dataset="sst2", fit_to_budget=True, max_train_minutes=5).training.fit_to_budget


def test_evaluations_take_the_place_of_eval_steps_and_save_steps():
    for given in ({"eval_steps": 50}, {"save_steps": 100}):
        with pytest.raises(TextclfError, match="evaluations=N .* one or the other"):
            build_config(dataset="sst2", evaluations=4, **given)
    assert build_config(dataset="sst2", evaluations=4).training.evaluations == 4
    assert build_config(dataset="sst2", evaluations=0, eval_steps=50).training.eval_steps == 50
    with pytest.raises(TextclfError, match="evaluations"):
        build_config(dataset="sst2", evaluations=-1)


@pytest.mark.slow
def test_a_fitted_run_ends_with_its_budget_and_its_learning_rate_decayed(mlflow_store, tiny_dataset, tiny_llama):
    from tests.test_training import COMMON, run_train

    # 1,000 epochs of 6 steps could never run in 24 seconds: the budget ends the run, and the schedule with it.
    run_id = run_train("--data_path", str(tiny_dataset), "--mode", "lora", "--base_model", tiny_llama, "--epochs", "1000",
                       "--evaluations", "3", "--warmup_ratio", "0.1", "--learning_rate", "1e-3", *COMMON,
                       "--max_train_minutes", "0.4", "--fit_to_budget", "true", "--register", "false")
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["training.fit_to_budget"] == "True"
    planned = [m.value for m in client.get_metric_history(run_id, "train/planned_steps")]
    last_step = max(m.step for m in client.get_metric_history(run_id, "train/loss"))
    # Ended by the plan (or, had its last steps stalled, by the budget some steps before it: a busy machine, as CI is
    # with another test beside this one, has ended it at 82% of its plan).
    assert planned[0] == 6000 and 0.7 * planned[-1] <= last_step <= planned[-1] < 6000
    assert run.data.metrics["train/runtime_seconds"] < 0.4 * 60 * 1.25
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "train/learning_rate")}
    lengths = {m.step: m.value for m in client.get_metric_history(run_id, "train/planned_steps")}
    assert rates[2] < 0.5e-3 and max(rates.values()) > 0.5e-3  # a warm-up to the peak ...
    # ... and a decay by the end of the budget, at least halfway (unfitted, a 6,000-step run would still be warming
    # up: its last rate its highest). How far down depends on where the budget ended the run and on the plan its last
    # rate followed (made two steps before the end, which a loaded machine can still move: CI saw 0.236e-3): ended
    # 30% before its plan (allowed above), a run keeps up to ~0.3 / 0.9 of the peak. The schedule itself is checked
    # step by step below.
    assert rates[last_step] <= 0.5 * max(rates.values())
    # Every step trained with the linear schedule over the length planned when its rate was set (after step k - 1,
    # before that step's own plan: the length logged at step k - 2).
    for step in range(3, last_step + 1):
        length = lengths[step - 2]
        warmup = math.ceil(0.1 * length)
        expected = (step - 1) / warmup if step - 1 < warmup else (length - step + 1) / (length - warmup)
        assert rates[step] == pytest.approx(1e-3 * expected), step
    # Three evaluations (two where the run ended by the step its second was due), the last step one of them, each at
    # the first step that splits what was left of the length planned until then (logged at the step before) evenly
    # among the evaluations still to come. Where they fall in the run's final length depends on the machine: before
    # the first one, its cost is an estimate (CI, running another test beside this one, measured it several times the
    # estimate: evaluated first at 91, so planned about 3 x 91 steps then, the run ended at 177).
    evaluated = sorted(m.step for m in client.get_metric_history(run_id, "eval/f1_macro"))

    def due(previous: int, done: int) -> list[int]:
        """The steps after ``previous`` at which the evaluation after ``done`` others was due."""
        return [s for s in range(previous + 1, last_step + 1)
                if s >= previous + math.ceil((lengths.get(s - 1, planned[0]) - previous) / (3 - done))]

    assert evaluated[-1] == last_step and len(evaluated) in (2, 3)
    for done, step in enumerate(evaluated[:-1]):
        assert step == due(evaluated[done - 1] if done else 0, done)[0], (evaluated, done)
    if len(evaluated) == 2:  # only where the run ended (by its plan or its budget) by the step its second was due
        assert all(s >= last_step for s in due(evaluated[0], 1)), (evaluated, last_step)
    assert run.data.metrics["best/step"] in evaluated
