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
    assert last_affordable_step(20, 100.0, 1.0, 5.0, 10, upper_bound=1000) == 85
    assert last_affordable_step(20, 100.0, 1.0, 5.0, 10, upper_bound=50) == 50  # never past what the run may run
    assert last_affordable_step(20, 1.0, 1.0, 5.0, 10, upper_bound=1000) == 21  # over budget: one step more


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
             step_tokens=descending_runs, seconds_per_token: float = 0.002) -> tuple[list[int], list[int], float]:
    """Drive FitToBudget beside the Trainer's flow callback on a fake clock, as the Trainer calls them, with steps
    that take ``seconds_per_token``: the evaluated steps, the planned length seen at each step, and the seconds
    the run took."""
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
    fit = budget.FitToBudget(minutes, length, counts, mean_row_tokens=500 / 8, eval_tokens=64 * 60)
    fit.on_train_begin(args, state, control)
    evaluated, planned = [], []
    while not control.should_training_stop:
        fit.on_step_begin(args, state, control)
        tokens = step_tokens(state.global_step + 1)
        counts.real_tokens += tokens
        clock.now += tokens * seconds_per_token * (3 if state.global_step == 0 else 1)  # the first builds what the rest reuse
        state.global_step += 1
        flow.on_step_end(args, state, control)
        fit.on_step_end(args, state, control)
        planned.append(state.max_steps)
        assert length.total == state.max_steps <= upper_bound
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


@pytest.mark.slow
def test_a_fitted_run_ends_with_its_budget_and_its_learning_rate_decayed(mlflow_store, tiny_dataset, tiny_llama):
    from tests.test_training import COMMON, run_train

    # 1,000 epochs of 6 steps could never run in 24 seconds: the budget ends the run, and the schedule with it.
    run_id = run_train("--data_path", str(tiny_dataset), "--mode", "lora", "--base_model", tiny_llama, "--epochs", "1000",
                       "--eval_steps", "40", "--warmup_ratio", "0.1", "--learning_rate", "1e-3", *COMMON,
                       "--max_train_minutes", "0.4", "--fit_to_budget", "true", "--register", "false")
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["training.fit_to_budget"] == "True"
    planned = [m.value for m in client.get_metric_history(run_id, "train/planned_steps")]
    last_step = max(m.step for m in client.get_metric_history(run_id, "train/loss"))
    # Ended by the plan (or, had its last steps stalled, by the budget some steps before it).
    assert planned[0] == 6000 and 0.8 * planned[-1] <= last_step <= planned[-1] < 6000
    assert run.data.metrics["train/runtime_seconds"] < 0.4 * 60 * 1.25
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "train/learning_rate")}
    lengths = {m.step: m.value for m in client.get_metric_history(run_id, "train/planned_steps")}
    assert rates[2] < 0.5e-3 and max(rates.values()) > 0.5e-3  # a warm-up to the peak ...
    assert rates[last_step] <= 0.2e-3  # ... and a decay nearly to zero by the end of the budget
    # Every step trained with the linear schedule over the length planned when its rate was set (after step k - 1,
    # before that step's own plan: the length logged at step k - 2).
    for step in range(3, last_step + 1):
        length = lengths[step - 2]
        warmup = math.ceil(0.1 * length)
        expected = (step - 1) / warmup if step - 1 < warmup else (length - step + 1) / (length - warmup)
        assert rates[step] == pytest.approx(1e-3 * expected), step
    evaluated = [m.step for m in client.get_metric_history(run_id, "eval/f1_macro")]
    assert evaluated[-1] == last_step and run.data.metrics["best/step"] in evaluated
