"""Temperature scaling, expected calibration error, and the error-analysis artifacts of a run."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from torch import nn

from textclf.components.calibration import (
    expected_calibration_error,
    fit_temperature,
    softmax,
    write_reliability_diagram,
)
from textclf.components.evaluation import misclassified_frame, write_test_artifacts


def calibrated_logits(n: int = 6000, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution: labels are drawn from it."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((n, classes))
    probabilities = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return logits, labels


def test_over_confident_logits_get_a_temperature_above_one_and_a_lower_ece():
    # Correct-class margin scaled by 10 with 30% label noise: right 70% of the time, sure every time.
    rng = np.random.default_rng(1)
    n, classes = 3000, 2
    labels = rng.integers(0, classes, n)
    predicted = np.where(rng.random(n) < 0.3, 1 - labels, labels)
    logits = rng.standard_normal((n, classes))
    logits[np.arange(n), predicted] += 10.0
    temperature = fit_temperature(logits, labels)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, temperature), labels)
    assert temperature > 3
    assert before > 0.25 and after < 0.05 and after < before / 5
    # labels never change: the temperature scales every logit of a row by the same factor
    np.testing.assert_array_equal(softmax(logits, temperature).argmax(1), logits.argmax(1))


def test_scaled_calibrated_logits_recover_the_scale():
    logits, labels = calibrated_logits()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)
    assert fit_temperature(10 * logits, labels) == pytest.approx(10.0, rel=0.1)
    assert fit_temperature(logits / 4, labels) == pytest.approx(0.25, rel=0.1)  # under-confident: T < 1


def test_ece_of_a_perfectly_calibrated_toy_case_is_zero_and_of_a_sure_coin_is_one_half():
    labels = np.array([0] * 8 + [1] * 2)  # 80% class 0, each predicted with confidence 0.8
    probabilities = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-12)
    sure = np.tile([1.0, 0.0], (10, 1))
    assert expected_calibration_error(sure, np.array([0, 1] * 5)) == pytest.approx(0.5)
    # two bins, each weighted by its share of the rows: |0.95 - 1| * 0.5 + |0.6 - 0.5| * 0.5
    mixed = np.array([[0.95, 0.05]] * 4 + [[0.6, 0.4]] * 4)
    assert expected_calibration_error(mixed, np.array([0] * 4 + [0, 0, 1, 1])) == pytest.approx(0.075)
    assert expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)) == 0.0


def test_a_validation_set_without_mistakes_keeps_the_temperature_at_one():
    # Every row right: the NLL falls as T -> 0 without a minimum; sharpening without limit would make
    # the first test mistake infinitely sure, so the scores are left as they are.
    logits = np.array([[3.0, -3.0], [-2.0, 2.0]] * 10)
    assert fit_temperature(logits, np.array([0, 1] * 10)) == 1.0
    assert fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int)) == 1.0


def test_reliability_diagram_and_per_class_chart_are_written(tmp_path):
    logits, labels = calibrated_logits(300)
    path = write_reliability_diagram(tmp_path / "reliability_diagram.png", labels,
                                     {"uncalibrated": softmax(5 * logits), "calibrated": softmax(logits)})
    assert path.stat().st_size > 1000
    texts = [f"text {i}" for i in range(len(labels))]
    metrics = write_test_artifacts(tmp_path / "test", texts, labels.tolist(), softmax(logits), ["a", "b", "c"],
                                   uncalibrated=softmax(5 * logits))
    assert (tmp_path / "test" / "per_class_metrics.png").stat().st_size > 1000
    assert (tmp_path / "test" / "reliability_diagram.png").exists()
    assert metrics["ece"] < metrics["ece_uncalibrated"]
    frame = pd.read_parquet(tmp_path / "test" / "predictions.parquet")
    np.testing.assert_allclose(frame[["prob_a", "prob_b", "prob_c"]].to_numpy(), softmax(logits), rtol=1e-6)


def test_misclassified_frame_holds_the_mistakes_most_confident_first():
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.99, 0.01]])
    frame = misclassified_frame(["a", "b", "c", "d", "e"], [1, 1, 1, 0, 0], probabilities, ["neg", "pos"])
    assert list(frame.columns) == ["text", "label", "predicted", "score", "prob_neg", "prob_pos"]
    assert frame["text"].tolist() == ["a", "b", "d"]
    assert frame["label"].tolist() == ["pos", "pos", "neg"] and frame["predicted"].tolist() == ["neg", "neg", "pos"]
    assert frame["score"].tolist() == pytest.approx([0.9, 0.6, 0.55])


class FixedModel(nn.Module):
    """Logits given per text (by its position in ``texts``); the spec carries a temperature."""

    def __init__(self, temperature: float | None):
        super().__init__()
        extra = {} if temperature is None else {"temperature": temperature}
        self.spec = SimpleNamespace(label_names=["a", "b"], prompt_template="{text}", max_length=64, extra=extra)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        real = attention_mask.sum(dim=1).float()
        return SimpleNamespace(logits=torch.stack([real, -real], dim=1) + self.anchor)


@pytest.mark.parametrize("temperature", [None, 1.0, 3.0, 0.5])
def test_predictor_divides_logits_by_the_models_temperature(tiny_llama, temperature):
    from transformers import AutoTokenizer

    from textclf.serving.inference import Predictor

    predictor = Predictor(FixedModel(temperature), AutoTokenizer.from_pretrained(tiny_llama))
    texts = ["a gem", "a dull , boring mess of a film"]
    logits = predictor.logits(texts)
    expected = torch.softmax(torch.from_numpy(logits) / (temperature or 1.0), dim=-1).numpy()
    np.testing.assert_allclose(predictor.predict_proba(texts), expected, rtol=1e-6)


# --- end to end: a deliberately over-confident model through the real `train` command ----------------------------

COMMON = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
          "--precision", "fp32", "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3",
          "--mode", "lora", "--learning_rate", "5e-3", "--seed", "0", "--register", "false"]
# The head's output layer times this: a model that gets about 3 in 4 right (6 LoRA steps), sure of every answer.
OVERCONFIDENCE = 20.0  # the head's last layer times this: a barely trained model, sure of every answer


@pytest.fixture
def overconfident(monkeypatch):
    """Scale the head's output layer just before the run is finished (tested, calibrated, saved)."""
    import textclf.recipes.training as training

    original = training.finish_run

    def finish(config, model, *args, **kwargs):
        last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(OVERCONFIDENCE)
            last.bias.mul_(OVERCONFIDENCE)
        return original(config, model, *args, **kwargs)

    monkeypatch.setattr(training, "finish_run", finish)


def train_run(*args: str) -> str:
    from entrypoints.train import train

    result = CliRunner().invoke(train, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], output_format="list")
    return runs[0].info.run_id


def saved_model_logits(texts: list[str]) -> np.ndarray:
    from textclf.components.model import load_classifier
    from textclf.serving.inference import Predictor

    model, tokenizer = load_classifier("outputs/tinysent-lora-seed0/model")
    return Predictor(model, tokenizer).logits(texts)


@pytest.mark.slow
def test_an_over_confident_model_is_calibrated_and_its_mistakes_are_logged(
        tmp_path, mlflow_store, tiny_dataset, tiny_llama, overconfident):
    run_id = train_run("--data_path", str(tiny_dataset), "--base_model", tiny_llama, *COMMON)
    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    temperature = metrics["calibration/temperature"]
    assert temperature > 1
    assert metrics["test/ece"] < metrics["test/ece_uncalibrated"]
    assert metrics["calibration/validation_ece_after"] < metrics["calibration/validation_ece_before"]
    print(f"T={temperature:.3f} test ECE {metrics['test/ece_uncalibrated']:.4f} -> {metrics['test/ece']:.4f}; "
          f"validation ECE {metrics['calibration/validation_ece_before']:.4f} -> "
          f"{metrics['calibration/validation_ece_after']:.4f}")

    predictions = pd.read_parquet(client.download_artifacts(run_id, "test/predictions.parquet", str(tmp_path)))
    texts = predictions["text"].tolist()
    logits = saved_model_logits(texts)
    predicted = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(pd.DataFrame({"text": texts}))
    calibrated = torch.softmax(torch.from_numpy(logits) / temperature, dim=-1).numpy()
    np.testing.assert_allclose(predicted[["prob_0", "prob_1"]].to_numpy(), calibrated, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(predicted["score"].to_numpy(), calibrated.max(axis=1), rtol=1e-4, atol=1e-6)
    assert predicted["label_id"].tolist() == logits.argmax(axis=1).tolist()
    np.testing.assert_allclose(predictions["score"].to_numpy(), calibrated.max(axis=1), rtol=1e-4, atol=1e-6)
    assert {"prob_0", "prob_1"} <= set(predictions.columns)

    wrong = int((predictions["label"] != predictions["predicted"]).sum())
    assert wrong > 0  # a barely trained model: the table has rows to show
    table = mlflow.load_table("test/misclassified.json", run_ids=[run_id])
    assert list(table.columns) == ["text", "label", "predicted", "score", "prob_0", "prob_1"]
    assert len(table) == wrong and (table["label"] != table["predicted"]).all()
    assert table["score"].tolist() == sorted(table["score"], reverse=True)
    artifacts = {a.path for a in client.list_artifacts(run_id, "test")}
    assert {"test/misclassified.json", "test/per_class_metrics.png", "test/reliability_diagram.png"} <= artifacts


@pytest.mark.slow
def test_calibrate_false_keeps_the_plain_softmax(tmp_path, mlflow_store, tiny_dataset, tiny_llama, overconfident):
    run_id = train_run("--data_path", str(tiny_dataset), "--base_model", tiny_llama, *COMMON, "--calibrate", "false")
    run = MlflowClient().get_run(run_id)
    assert run.data.params["training.calibrate"] == "False"
    assert not any(name.startswith("calibration/") for name in run.data.metrics)
    assert "test/ece_uncalibrated" not in run.data.metrics and "test/ece" in run.data.metrics
    texts = ["a wonderful , moving film number 3", "a dull , boring mess number 4"]
    logits = saved_model_logits(texts)
    predicted = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(pd.DataFrame({"text": texts}))
    plain = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    np.testing.assert_allclose(predicted[["prob_0", "prob_1"]].to_numpy(), plain, rtol=1e-4, atol=1e-6)
