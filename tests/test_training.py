"""Training through the real `train` entry point, on tiny models, into a real MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from entrypoints.train import train

COMMON = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
          "--precision", "fp32"]
FAST = ["--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", *COMMON]


def run_train(*args: str) -> str:
    result = CliRunner().invoke(train, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], output_format="list")
    return runs[0].info.run_id


# One run per base-model family, in the mode each is used in most: LoRA on a decoder (the default), full fine-tuning
# of an encoder (the demo). Full fine-tuning of a decoder trains in test_tiny_llama_learns_the_easy_task; what LoRA on
# an encoder changes (its targets, pooling, saving and merging) is checked without training in tests/test_model.py.
@pytest.mark.slow
@pytest.mark.parametrize("base, mode", [("tiny_llama", "lora"), ("minilm", "full")])
def test_train_tracks_everything_and_logs_a_self_contained_model(request, tmp_path, mlflow_store, tiny_dataset, base, mode):
    base_copy = shutil.copytree(request.getfixturevalue(base), tmp_path / "base")
    lr = "5e-3" if mode == "lora" else "1e-3"
    run_id = run_train("--data_path", str(tiny_dataset), "--mode", mode, "--base_model", str(base_copy),
                       "--learning_rate", lr, "--seed", "0", *FAST)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "textclf-tinysent"
    assert run.info.run_name == f"tinysent-{mode}-seed0"
    assert run.data.tags["mode"] == mode and run.data.tags["seed"] == "0"
    params = run.data.params
    assert params["run.mode"] == mode and params["model.base_model"] == str(base_copy)
    assert float(params["training.learning_rate"]) == float(lr) and params["data.label_names"] == '["0", "1"]'
    assert all(len(value) <= 500 for value in params.values())
    # The thread counts the run used, chosen on purpose (textclf.distributed.threads): every core of this process, one rank.
    import torch

    assert params["threads.intra_op"] == str(torch.get_num_threads()) and params["threads.inter_op"] == "1"
    from textclf.process.allocator import loaded_allocator

    assert params["process.malloc"] == loaded_allocator()  # the allocator the process ran with (docs/benchmarks.md)
    losses = client.get_metric_history(run_id, "train/loss")
    assert len({m.step for m in losses}) >= 5
    assert [m.step for m in client.get_metric_history(run_id, "eval/f1_macro")] == [3, 6]
    for name in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/pad_fraction",
                 "eval/accuracy", "eval/loss", "best/f1_macro", "test/accuracy", "test/f1_macro"):
        assert name in run.data.metrics, name
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")} | {a.path for a in client.list_artifacts(run_id, "test")}
    assert {"eval/confusion_matrix_step_3.png", "eval/confusion_matrix_step_6.json", "test/confusion_matrix.png",
            "test/classification_report.json", "test/test_results.json", "test/test_summary.txt",
            "test/predictions.parquet"} <= artifacts
    assert "config.json" in {a.path for a in client.list_artifacts(run_id)}
    # no checkpoint was uploaded
    assert not any("checkpoint" in a.path for a in client.list_artifacts(run_id))
    assert Path(f"outputs/tinysent-{mode}-seed0/model/textclf.json").exists()

    # The logged model predicts offline, with the base model and outputs/ gone, as the trained model did.
    expected = pd.read_parquet(client.download_artifacts(run_id, "test/predictions.parquet", str(tmp_path)))
    shutil.rmtree(base_copy)
    shutil.rmtree("outputs")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    predicted = model.predict(pd.DataFrame({"text": expected["text"]}))
    assert predicted["label"].tolist() == expected["predicted"].tolist()
    assert (predicted["score"] - expected["score"]).abs().max() < 1e-5
    assert set(predicted.columns) == {"label", "label_id", "score", "prob_0", "prob_1"}
    assert abs(predicted[["prob_0", "prob_1"]].sum(axis=1) - 1).max() < 1e-5

    version = client.get_model_version("textclf-tinysent", "1")
    assert version.run_id == run_id and version.tags["seed"] == "0" and version.tags["mode"] == mode
    assert float(version.tags["validation_f1_macro"]) == pytest.approx(run.data.metrics["best/f1_macro"])


@pytest.mark.slow
def test_tiny_llama_learns_the_easy_task(mlflow_store, tiny_dataset, tiny_llama):
    run_id = run_train("--data_path", str(tiny_dataset), "--mode", "full", "--base_model", tiny_llama,
                       "--learning_rate", "3e-3", "--max_steps", "30", "--eval_steps", "6", "--save_steps", "6",
                       *COMMON, "--register", "false")
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["test/accuracy"] >= 0.9, metrics


@pytest.mark.slow
def test_best_checkpoint_is_selected_and_survives_the_limit(mlflow_store, tiny_dataset, tiny_llama):
    run_id = run_train("--data_path", str(tiny_dataset), "--mode", "lora", "--base_model", tiny_llama,
                       "--learning_rate", "5e-3", "--max_steps", "8", "--eval_steps", "2", "--save_steps", "2",
                       *COMMON, "--save_total_limit", "1", "--register", "false")
    client = MlflowClient()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "eval/f1_macro")}
    best = client.get_run(run_id).data.metrics["best/f1_macro"]
    assert best == max(history.values())
    state = json.loads(sorted(Path("outputs/tinysent-lora-seed42").glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    best_checkpoint = Path(state["best_model_checkpoint"])
    assert best_checkpoint.exists()
    assert all((p / "COMPLETE").exists() for p in Path("outputs/tinysent-lora-seed42").glob("checkpoint-*"))
    # the logged model is the best checkpoint: same predictions on the test texts
    from textclf.serving.inference import Predictor
    from textclf.serving.sources import load_model_source

    logged = pd.read_parquet(client.download_artifacts(run_id, "test/predictions.parquet", "."))
    loaded = load_model_source(str(best_checkpoint))
    assert loaded.kind == "Trainer checkpoint"
    # the checkpoint holds no temperature (it is fitted after training): apply the logged one
    temperature = client.get_run(run_id).data.metrics.get("calibration/temperature", 1.0)
    loaded.model.spec.extra["temperature"] = temperature
    scores = Predictor(loaded.model, loaded.tokenizer).predict_proba(logged["text"].tolist()).max(axis=1)
    assert abs(scores - logged["score"].to_numpy()).max() < 1e-5


@pytest.mark.slow
def test_time_budget_evaluates_saves_and_stops(mlflow_store, tiny_dataset, tiny_llama):
    run_id = run_train("--data_path", str(tiny_dataset), "--mode", "lora", "--base_model", tiny_llama,
                       "--max_steps", "40", "--eval_steps", "20", "--save_steps", "20", *COMMON,
                       "--max_train_minutes", "0.0001", "--register", "false")
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # Stopped after the first step, which was evaluated and saved though it is no multiple of eval_steps.
    assert [m.step for m in client.get_metric_history(run_id, "eval/f1_macro")] == [1]
    assert run.data.metrics["best/step"] == 1 and "test/accuracy" in run.data.metrics
    assert (Path("outputs/tinysent-lora-seed42/checkpoint-1") / "COMPLETE").exists()
    assert 0 < run.data.metrics["train/runtime_seconds"] < 60
    assert run.data.params["training.max_train_minutes"] == "0.0001"


@pytest.mark.slow
def test_early_stopping_ends_training_after_evaluations_that_do_not_improve(mlflow_store, tiny_dataset, tiny_llama):
    # Learning rates too small to change a prediction: validation F1 never improves after the first evaluation.
    run_id = run_train("--data_path", str(tiny_dataset), "--mode", "lora", "--base_model", tiny_llama,
                       "--max_steps", "40", "--eval_steps", "1", "--save_steps", "1", *COMMON, "--learning_rate",
                       "1e-12", "--head_learning_rate", "1e-12", "--early_stopping_patience", "2", "--register", "false")
    client = MlflowClient()
    run = client.get_run(run_id)
    evaluated = [m.step for m in client.get_metric_history(run_id, "eval/f1_macro")]
    assert run.info.status == "FINISHED" and evaluated == [1, 2, 3]  # the best, then two without improvement
    assert run.data.params["training.early_stopping_patience"] == "2" and "test/accuracy" in run.data.metrics


@pytest.mark.slow
def test_an_epoch_schedule_with_accumulation_a_loss_criterion_and_a_linear_head(mlflow_store, tiny_dataset, tiny_llama):
    """Two epochs of 48 rows in micro-batches of 8, two per optimizer step: 6 steps, over which the learning rate
    decays linearly; the best checkpoint chosen by the lowest validation loss; a linear head saved and served."""
    run_id = run_train("--data_path", str(tiny_dataset), "--mode", "full", "--base_model", tiny_llama,
                       "--learning_rate", "1e-3", "--epochs", "2", "--gradient_accumulation_steps", "2",
                       "--eval_steps", "1", "--save_steps", "1", "--metric_for_best", "loss", "--head", "linear",
                       *COMMON, "--register", "false")
    client = MlflowClient()
    run = client.get_run(run_id)
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "train/learning_rate")}
    assert sorted(rates) == [1, 2, 3, 4, 5, 6]
    assert [rates[step] for step in range(1, 7)] == pytest.approx([1e-3 * (1 - k / 6) for k in range(6)])
    # Every micro-batch is counted: 96 rows over the time spent in training steps.
    metrics = run.data.metrics
    assert metrics["train/samples_per_second"] * metrics["train/step_seconds"] == pytest.approx(96)
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "eval/loss")}
    best_step = min(losses, key=lambda step: (losses[step], step))
    assert metrics["best/step"] == best_step and metrics["best/loss"] == pytest.approx(losses[best_step])
    from textclf.components.model import LinearHead, load_classifier

    model, _ = load_classifier("outputs/tinysent-full-seed42/model")
    assert model.spec.head == "linear" and isinstance(model.head, LinearHead)
    predicted = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(["a gem of a film"])
    assert predicted["label"].tolist()[0] in {"0", "1"}


def test_precision_auto_reads_bf16_instructions_from_the_cpu_flags(tmp_path):
    from textclf.components.trainer import cpu_has_fast_bf16

    for flags, bf16 in (("fpu avx2 fma", False), ("avx2 avx512f avx512_vnni", False),
                        ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_fast_bf16(cpuinfo) is bf16


def test_head_learning_rate_builds_its_own_groups_and_decay_spares_biases_and_norms(tmp_path, tiny_llama):
    from transformers import TrainingArguments

    from textclf.components.model import build_classifier
    from textclf.components.trainer import ClassifierTrainer
    from textclf.config import build_config

    config = build_config("full", base_model=tiny_llama)
    model, _ = build_classifier(config.model, "full", ["a", "b"], config.data.prompt_template, 128)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, use_cpu=True, report_to=[])
    optimizer = ClassifierTrainer(model=model, args=args, head_learning_rate=1e-2).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = names[id(parameter)]
            seen.append(name)
            assert group["lr"] == (1e-2 if name.startswith("head.") else 1e-3), name
            no_decay = name.endswith("bias") or "norm" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.startswith("head.") for n in seen) and any("norm" in n for n in seen)


@pytest.mark.parametrize("grouped", ["true", "false"])
def test_group_by_length_does_not_change_evaluation_of_a_checkpoint(mlflow_store, tiny_dataset, tiny_llama, grouped):
    """The same weights evaluated with and without length grouping give the same validation metrics
    (predictions are compared with the labels of the same order)."""
    from transformers import TrainingArguments, set_seed

    from textclf.components.data import load_splits
    from textclf.components.encoding import PromptEncoder
    from textclf.components.model import build_classifier
    from textclf.components.trainer import ClassifierTrainer, make_compute_metrics, training_collator
    from textclf.config import build_config

    config = build_config("lora", data_path=str(tiny_dataset), base_model=tiny_llama, max_length=128)
    splits = load_splits(config.data)
    set_seed(0)
    model, tokenizer = build_classifier(config.model, "lora", splits.label_names, config.data.prompt_template, 128)
    encoder = PromptEncoder(tokenizer, config.data.prompt_template, splits.label_names, 128)
    eval_set, _ = encoder.dataset(splits.validation["text"], splits.validation["label"])
    from textclf.components.evaluation import classification_metrics
    from textclf.serving.inference import Predictor

    reference = Predictor(model, tokenizer, batch_size=1).predict_proba(splits.validation["text"].tolist())
    expected = classification_metrics(splits.validation["label"], reference.argmax(1), 2)
    args = TrainingArguments(output_dir="out", per_device_eval_batch_size=3, use_cpu=True, report_to=[],
                             train_sampling_strategy="group_by_length" if grouped == "true" else "random")
    trainer = ClassifierTrainer(model=model, args=args, eval_dataset=eval_set, data_collator=training_collator(tokenizer),
                                compute_metrics=make_compute_metrics(2, splits.label_names, {}))
    metrics = trainer.evaluate()
    for name, value in expected.items():
        assert metrics[f"eval_{name}"] == pytest.approx(value), name


@pytest.mark.slow
def test_runs_record_system_metrics_and_versions_describe_themselves(mlflow_store, tiny_dataset, tiny_llama,
                                                                     monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    run_id = run_train("--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--seed", "0", *FAST)
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    description = MlflowClient().get_model_version("textclf-tinysent", "1").description
    assert "lora fine-tune of" in description and "seed 0" in description and run_id in description
    assert 'models:/textclf-tinysent/1' in description and "test: accuracy" in description
