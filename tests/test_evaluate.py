"""The `evaluate` entry point, driven in-process on models trained by the real `train` command."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import sentiment_rows, write_jsonl
from entrypoints.evaluate import evaluate
from entrypoints.train import train

COMMON = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
          "--precision", "fp32"]
FAST = ["--mode", "lora", "--learning_rate", "5e-3", "--seed", "0", "--max_steps", "6", "--eval_steps", "3",
        "--save_steps", "3", *COMMON]
OUTPUT = Path("outputs/tinysent-lora-seed0")  # relative to the working folder, which mlflow_store makes tmp_path


def latest_run_id() -> str:
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], output_format="list")
    return runs[0].info.run_id


def run_train(*args: str) -> str:
    result = CliRunner().invoke(train, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return latest_run_id()


def run_evaluate(*args: str) -> mlflow.entities.Run:
    result = CliRunner().invoke(evaluate, ["--batch_size", "16", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = MlflowClient().get_run(latest_run_id())
    assert run.data.tags.get("entry_point") == "evaluate"
    assert run.info.status == "FINISHED"
    return run


def experiment_of(run) -> str:
    return MlflowClient().get_experiment(run.info.experiment_id).name


def assert_same_test_metrics(run, expected: dict[str, float]) -> None:
    for name in ("test/accuracy", "test/f1_macro"):
        assert run.data.metrics[name] == pytest.approx(expected[name], abs=1e-9), name


@pytest.mark.slow
def test_saved_model_folder_and_best_checkpoint_reproduce_the_training_test_metrics(
        mlflow_store, tiny_dataset, tiny_llama):
    train_id = run_train("--data_path", str(tiny_dataset), "--base_model", tiny_llama, *FAST, "--register", "false")
    expected = MlflowClient().get_run(train_id).data.metrics

    folder_run = run_evaluate("--model_uri", str(OUTPUT / "model"), "--data_path", str(tiny_dataset))
    assert folder_run.info.run_id != train_id
    assert experiment_of(folder_run) == "textclf-tinysent"
    assert folder_run.data.tags["model_kind"] == "textclf model folder"
    assert folder_run.data.params["rows.test"] == "16"
    assert_same_test_metrics(folder_run, expected)

    states = sorted(OUTPUT.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    best = Path(json.loads(states[-1].read_text())["best_model_checkpoint"])
    assert best.exists() and best.parent.resolve() == OUTPUT.resolve()
    checkpoint_run = run_evaluate("--model_uri", str(best), "--data_path", str(tiny_dataset))
    assert checkpoint_run.data.tags["model_kind"] == "Trainer checkpoint"
    assert_same_test_metrics(checkpoint_run, expected)


@pytest.mark.slow
def test_single_file_is_filed_under_its_dataset_experiment(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    run_train("--data_path", str(tiny_dataset), "--base_model", tiny_llama, *FAST, "--register", "false")
    rows = sentiment_rows(16, 2000)
    # the shipped layout data/datasets/<name>/data/test.json, and a plain <name>/test.jsonl
    nested = write_jsonl(tmp_path / "elsewhere" / "tinysent" / "data" / "test.jsonl", rows)
    plain = write_jsonl(tmp_path / "other" / "tinysent" / "test.jsonl", rows)
    for path in (nested, plain):
        run = run_evaluate("--model_uri", str(OUTPUT / "model"), "--data_path", str(path))
        assert experiment_of(run) == "textclf-tinysent", path
        assert run.data.tags["dataset"] == "tinysent"
        assert run.info.run_name == "tinysent-evaluate"


@pytest.mark.slow
def test_a_model_that_knows_its_dataset_files_the_run_under_that_dataset(tmp_path, mlflow_store, tiny_dataset,
                                                                         tiny_llama):
    train_id = run_train("--data_path", str(tiny_dataset), "--base_model", tiny_llama, *FAST)
    holdout = write_jsonl(tmp_path / "holdout" / "test.jsonl", sentiment_rows(16, 2000))
    for uri in (f"runs:/{train_id}/model", "models:/textclf-tinysent/1"):
        run = run_evaluate("--model_uri", uri, "--data_path", str(holdout))
        assert experiment_of(run) == "textclf-tinysent", uri
        assert run.data.tags["dataset"] == "tinysent"


@pytest.mark.slow
def test_text_and_label_columns_can_be_named(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    train_id = run_train("--data_path", str(tiny_dataset), "--base_model", tiny_llama, *FAST, "--register", "false")
    expected = MlflowClient().get_run(train_id).data.metrics
    # neither column name is one that detection knows, so they must be named
    rows = [{"id": i, "sentiment": row["label"], "remark": row["text"]} for i, row in enumerate(sentiment_rows(16, 2000))]
    path = write_jsonl(tmp_path / "renamed" / "tinysent" / "test.jsonl", rows)
    undetected = CliRunner().invoke(evaluate, ["--model_uri", str(OUTPUT / "model"), "--data_path", str(path)])
    assert undetected.exit_code != 0 and "no text column" in undetected.output, undetected.output
    run = run_evaluate("--model_uri", str(OUTPUT / "model"), "--data_path", str(path),
                       "--text_column", "remark", "--label_column", "sentiment")
    assert run.data.params["rows.test"] == "16"
    assert_same_test_metrics(run, expected)


TOPICS = ["trade", "acq", "ship", "earn", "money-fx", "crude", "interest", "grain"]  # unsorted on purpose


def topic_rows(counts: dict[str, int], offset: int) -> list[dict]:
    rows, i = [], offset
    for topic, n in counts.items():
        for _ in range(n):
            rows.append({"text": f"{topic} report number {i}", "label": topic})
            i += 1
    return rows


def test_multiclass_end_to_end(tmp_path, mlflow_store, tiny_llama):
    folder = tmp_path / "tinyr8"
    test_counts = {topic: 1 + k % 3 for k, topic in enumerate(TOPICS)}  # uneven, so row sums say something
    write_jsonl(folder / "train.jsonl", topic_rows({t: 8 for t in TOPICS}, 0))
    write_jsonl(folder / "dev.jsonl", topic_rows({t: 2 for t in TOPICS}, 1000))
    write_jsonl(folder / "test.jsonl", topic_rows(test_counts, 2000))
    names = sorted(TOPICS)

    # the default prompt lists all 8 names (about 120 tokens with the tiny tokenizer), so 128 leaves no room
    run_id = run_train("--data_path", str(folder), "--base_model", tiny_llama, *FAST, "--max_length", "256")
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert experiment_of(run) == "textclf-tinyr8"
    assert json.loads(run.data.params["data.label_names"]) == names

    matrix = json.loads(Path(client.download_artifacts(run_id, "test/confusion_matrix.json", str(tmp_path))).read_text())
    assert matrix["labels"] == names
    assert len(matrix["matrix"]) == 8 and all(len(row) == 8 for row in matrix["matrix"])
    assert [sum(row) for row in matrix["matrix"]] == [test_counts[name] for name in names]
    correct = sum(matrix["matrix"][i][i] for i in range(8))
    assert correct / sum(test_counts.values()) == pytest.approx(run.data.metrics["test/accuracy"])

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    texts = [row["text"] for row in topic_rows(test_counts, 2000)]
    predicted = model.predict(pd.DataFrame({"text": texts}))
    prob_columns = [f"prob_{name}" for name in names]
    assert set(prob_columns) <= set(predicted.columns)
    assert (predicted[prob_columns].sum(axis=1) - 1).abs().max() < 1e-5
    assert set(predicted["label"]) <= set(names)
    assert predicted["label"].tolist() == [names[i] for i in predicted[prob_columns].to_numpy().argmax(axis=1)]

    version = client.get_model_version("textclf-tinyr8", "1")
    assert version.run_id == run_id
    evaluated = run_evaluate("--model_uri", "models:/textclf-tinyr8/1", "--data_path", str(folder))
    assert experiment_of(evaluated) == "textclf-tinyr8"
    assert evaluated.data.metrics["test/accuracy"] == pytest.approx(run.data.metrics["test/accuracy"], abs=1e-9)
    assert evaluated.data.metrics["test/f1_macro"] == pytest.approx(run.data.metrics["test/f1_macro"], abs=1e-9)
