"""The best checkpoint is the best saved one on validation: with evaluations more frequent than saves, with early
stopping, under the default cadence and after a resume. Validation scores are scripted per evaluation
(tests/helpers/scripted_metrics.py) so that each test decides which step scores best; training is real."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import load_file

import textclf.components.trainer as trainer_setup
from entrypoints.train import train
from helpers.scripted_metrics import scripted_f1

pytestmark = pytest.mark.slow

COMMON = ["--mode", "lora", "--learning_rate", "5e-3", "--batch_size", "8", "--eval_batch_size", "16",
          "--max_length", "128", "--precision", "fp32", "--logging_steps", "1", "--seed", "0", "--calibrate", "false"]
OUTPUT = Path("outputs/tinysent-lora-seed0")  # relative to the working folder (the mlflow_store fixture's tmp_path)


def script(monkeypatch, *values) -> None:
    real = trainer_setup.classification_metrics
    monkeypatch.setattr(trainer_setup, "classification_metrics", scripted_f1(real, values))


def train_run(tiny_dataset, tiny_llama, *args, expect_success: bool = True):
    result = CliRunner().invoke(train, ["--data_path", str(tiny_dataset), "--base_model", tiny_llama, *COMMON, *args])
    if expect_success:
        assert result.exit_code == 0, result.output
    return result


def latest_run():
    """The latest run."""
    return mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], output_format="list")[0]


def head_of(state: dict) -> dict:
    return {key[len("head."):]: value for key, value in state.items() if key.startswith("head.")}


def test_a_later_saved_checkpoint_beats_an_unsaved_higher_score(monkeypatch, mlflow_store, tiny_dataset, tiny_llama):
    # Evaluated every step, saved every second: step 3 scores best but is not saved, so of the saved steps 2
    # (0.6) and 4 (0.8) the run must keep step 4. transformers alone keeps step 2.
    script(monkeypatch, 0.5, 0.6, 0.9, 0.8)
    train_run(tiny_dataset, tiny_llama, "--max_steps", "4", "--eval_steps", "1", "--save_steps", "2")
    run = latest_run()
    assert run.data.metrics["best/f1_macro"] == pytest.approx(0.8)
    assert run.data.metrics["best/step"] == 4
    state = json.loads((OUTPUT / "checkpoint-4" / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-4"
    version = MlflowClient().get_model_version("textclf-tinysent", "1")
    assert float(version.tags["validation_f1_macro"]) == pytest.approx(0.8)
    # The model the run saved and logged is checkpoint-4's.
    saved_head = load_file(str(OUTPUT / "model" / "head.safetensors"))
    checkpoint_head = head_of(load_file(str(OUTPUT / "checkpoint-4" / "model.safetensors")))
    assert saved_head.keys() == checkpoint_head.keys()
    assert all(saved_head[k].equal(checkpoint_head[k]) for k in saved_head)


def test_by_default_every_evaluated_step_is_saved_and_can_be_selected(monkeypatch, mlflow_store, tiny_dataset,
                                                                       tiny_llama):
    script(monkeypatch, 0.5, 0.6, 0.9, 0.8)
    train_run(tiny_dataset, tiny_llama, "--max_steps", "4", "--eval_steps", "1", "--save_total_limit", "1",
              "--register", "false")
    run = latest_run()
    assert run.data.params["training.save_steps"] == run.data.params["training.eval_steps"] == "1"
    assert run.data.metrics["best/f1_macro"] == pytest.approx(0.9) and run.data.metrics["best/step"] == 3
    # The best survives the save limit of 1 next to the last step, which the Trainer keeps to resume.
    assert (OUTPUT / "checkpoint-3").is_dir()


def test_early_stopping_counts_from_the_best_saved_score(monkeypatch, mlflow_store, tiny_dataset, tiny_llama):
    # Saved steps: 2 (0.6), 4 (0.7), 6 (0.66). The unsaved 0.9 at step 3 is no checkpoint's score: counted from it,
    # patience 2 would stop at step 5 (0.7 and 0.65 below 0.9) before step 6 was saved.
    script(monkeypatch, 0.5, 0.6, 0.9, 0.7, 0.65, 0.66, 0.6, 0.6)
    train_run(tiny_dataset, tiny_llama, "--max_steps", "8", "--eval_steps", "1", "--save_steps", "2",
              "--early_stopping_patience", "2", "--register", "false")
    run = latest_run()
    evaluated = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "eval/f1_macro")]
    assert evaluated == [1, 2, 3, 4, 5, 6]
    assert run.data.metrics["best/step"] == 4 and run.data.metrics["best/f1_macro"] == pytest.approx(0.7)


def test_a_resumed_run_selects_among_saved_checkpoints(monkeypatch, mlflow_store, tiny_dataset, tiny_llama):
    args = ["--max_steps", "6", "--eval_steps", "1", "--save_steps", "2", "--register", "false"]
    script(monkeypatch, 0.9, 0.6, "raise")
    failed = train_run(tiny_dataset, tiny_llama, *args, expect_success=False)
    assert failed.exit_code != 0 and latest_run().info.status == "FAILED"
    # As an older textclf wrote it: the unsaved step 1's 0.9 recorded as the best score, a folder that never existed.
    state_file = OUTPUT / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.update(best_metric=0.9, best_global_step=1, best_model_checkpoint=None)
    state_file.write_text(json.dumps(state))

    script(monkeypatch, 0.65, 0.8, 0.5, 0.7)  # steps 3-6; saved: 2 (0.6), 4 (0.8), 6 (0.7)
    train_run(tiny_dataset, tiny_llama, *args)
    run = latest_run()
    assert run.data.tags.get("resumed_from", "").endswith("checkpoint-2")
    assert run.data.metrics["best/step"] == 4 and run.data.metrics["best/f1_macro"] == pytest.approx(0.8)


def test_the_selected_steps_metrics_are_never_another_steps():
    """Where the history lacks the evaluation of the step whose weights the model holds, the model is measured
    again: the selected step's weights without logging (predict), the last step's as an evaluation."""
    from types import SimpleNamespace

    from textclf.components.trainer import best_validation_metrics

    history = [{"step": 4, "eval_loss": 0.5, "eval_accuracy": 0.9}]  # the selected step 2 is not in it
    calls = []
    state = SimpleNamespace(log_history=history, global_step=6, best_model_checkpoint="out/checkpoint-2")
    trainer = SimpleNamespace(
        state=state, eval_dataset="validation rows",
        predict=lambda rows, metric_key_prefix: calls.append(("predict", rows, metric_key_prefix)) or SimpleNamespace(
            metrics={"eval_loss": 0.7, "eval_accuracy": 0.8}),
        evaluate=lambda: calls.append(("evaluate",)) or {"eval_loss": 0.6, "eval_accuracy": 0.7})
    assert best_validation_metrics(trainer) == {"accuracy": 0.8, "loss": 0.7, "step": 2}
    assert calls == [("predict", "validation rows", "eval")]
    history.insert(0, {"step": 2, "eval_loss": 0.65, "eval_accuracy": 0.85})
    assert best_validation_metrics(trainer) == {"accuracy": 0.85, "loss": 0.65, "step": 2} and len(calls) == 1
    state.best_model_checkpoint = None  # nothing selected: the model holds the last step's weights (6)
    assert best_validation_metrics(trainer) == {"accuracy": 0.7, "loss": 0.6, "step": 6}
    assert calls[-1] == ("evaluate",)
