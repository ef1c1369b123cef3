"""The zero-shot baseline: class scoring against an unbatched reference, a rigged head, the logged run
and its pyfunc model (read back by `evaluate` and `promote`), and the refusals."""

from __future__ import annotations

import random
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import sentiment_rows, write_jsonl
from entrypoints.baseline import baseline
from textclf.components.encoding import format_prompt
from textclf.config import DEFAULT_PROMPT_TEMPLATE
from textclf.recipes.baseline import build_zero_shot
from textclf.serving.inference import Predictor

NAMES = ["Negative", "Positive"]
TEST_ARTIFACTS = {"confusion_matrix.png", "confusion_matrix.json", "classification_report.json", "test_results.json",
                  "test_summary.txt", "predictions.parquet", "per_class_metrics.png", "reliability_diagram.png",
                  "misclassified.json"}


@pytest.fixture
def named_dataset(tmp_path) -> Path:
    """Like tiny_dataset, with the labels as class names (what the prompt and the scoring read)."""
    folder = tmp_path / "namedsent"
    for split, n, offset in (("train", 24, 0), ("dev", 10, 1000), ("test", 14, 2000)):
        rows = [{"text": row["text"], "label": NAMES[row["label"]]} for row in sentiment_rows(n, offset)]
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def shuffled_texts(n: int = 11) -> list[str]:
    """Texts of very different lengths, in no length order: batching sorts them, results must come back."""
    texts = [" ".join(["a wonderful , moving film"] * (1 + i % 5)) + f" {i}" for i in range(n)]
    texts += ["bad", "an awful plot , with terrible acting , tedious and flat and a waste of time " * 3]
    random.Random(0).shuffle(texts)
    return texts


def invoke(*args: str):
    return CliRunner().invoke(baseline, list(args), catch_exceptions=False)


def reference_scores(model, tokenizer, text: str) -> torch.Tensor:
    """log p(class tokens | prompt) from plain, unbatched forward passes of the LM over prompt + class tokens."""
    prompt = tokenizer(format_prompt(model.spec.prompt_template, text, model.spec.label_names))["input_ids"]
    scores = []
    with torch.inference_mode():
        for tokens in model.class_tokens:
            logits = model.lm(input_ids=torch.tensor([prompt + tokens])).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            scores.append(sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(tokens)))
    return torch.stack(scores)


@pytest.mark.slow
def test_batched_scores_equal_an_unbatched_forward_over_prompt_and_class_tokens(tiny_llama):
    # One-token names, multi-token names, and two names that share their first token.
    names = ["Negative", "Positive", "the", "a joy to watch", "a dull mess"]
    model, tokenizer = build_zero_shot(tiny_llama, names, DEFAULT_PROMPT_TEMPLATE, 512)
    lengths = [len(tokens) for tokens in model.class_tokens]
    assert 1 in lengths and max(lengths) > 2, model.class_tokens
    assert model.class_tokens[3][0] == model.class_tokens[4][0]
    # Tokens as they follow the prompt: " the" after "answer:", not "the" glued to the colon.
    assert model.class_tokens[2] == tokenizer(" the", add_special_tokens=False)["input_ids"]
    # Random init attends almost uniformly, blind to positions and padding: sharpen it so that they count.
    with torch.no_grad():
        for layer in model.lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)

    texts = shuffled_texts()
    predictor = Predictor(model, tokenizer, batch_size=3)
    scores = predictor.logits(texts)
    probabilities = predictor.predict_proba(texts)
    for i, text in enumerate(texts):
        expected = reference_scores(model, tokenizer, text)
        np.testing.assert_allclose(scores[i], expected.numpy(), rtol=1e-4, atol=1e-4, err_msg=text)
        np.testing.assert_allclose(probabilities[i], torch.softmax(expected, 0).numpy(), atol=1e-5, err_msg=text)


@pytest.mark.parametrize("target", [0, 1])
def test_a_head_rigged_for_one_class_name_predicts_that_class_for_every_text(tiny_llama, target):
    model, tokenizer = build_zero_shot(tiny_llama, NAMES, DEFAULT_PROMPT_TEMPLATE, 512)
    rigged, other = model.class_tokens[target], model.class_tokens[1 - target]
    assert set(rigged) - set(other), "the two names must differ in some token"
    lm = model.lm
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[rigged] = 30.0  # every token of the target name, at every position
    lm.lm_head = head
    probabilities = Predictor(model, tokenizer, batch_size=4).predict_proba(shuffled_texts())
    assert (probabilities.argmax(axis=1) == target).all()
    assert (probabilities[:, target] > 0.99).all()


@pytest.mark.slow
def test_the_baseline_run_is_logged_like_a_trained_run_and_its_model_serves_and_evaluates(
        mlflow_store, named_dataset, tiny_llama):
    result = invoke("--data_path", str(named_dataset), "--base_model", tiny_llama, "--batch_size", "4",
                    "--max_length", "128")
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("textclf-namedsent").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "namedsent-zero-shot"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["baseline"] == "zero-shot" and tags["dataset"] == "namedsent" and tags["base_model"] == tiny_llama
    assert params["model.base_model"] == tiny_llama and params["data.rows.test"] == "14"
    assert params["data.prompt_template"] == DEFAULT_PROMPT_TEMPLATE and params["data.max_length"] == "128"
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "test")} == TEST_ARTIFACTS
    assert not client.search_registered_models()  # a baseline is not registered unless asked

    test = pd.read_json(named_dataset / "test.jsonl", lines=True)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    out = model.predict(pd.DataFrame({"id": range(len(test)), "text": test["text"]}))
    assert list(out.columns) == ["label", "label_id", "score", "prob_Negative", "prob_Positive"]
    labels = test["label"].map(NAMES.index).to_numpy()
    assert metrics["test/accuracy"] == pytest.approx(float((out["label_id"].to_numpy() == labels).mean()))
    logged = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="test/predictions.parquet"))
    assert logged["predicted_id"].tolist() == out["label_id"].tolist()

    # `evaluate` reads pyfunc models through unwrap_python_model().predictor: the baseline's works too.
    from entrypoints.evaluate import evaluate

    done = CliRunner().invoke(evaluate, ["--model_uri", f"runs:/{run.info.run_id}/model",
                                         "--data_path", str(named_dataset)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    evaluated = client.search_runs([run.info.experiment_id], "tags.entry_point = 'evaluate'")[0]
    assert evaluated.data.metrics["test/accuracy"] == pytest.approx(metrics["test/accuracy"])


@pytest.mark.slow
def test_register_scores_validation_so_promote_can_rank_the_baseline(mlflow_store, named_dataset, tiny_llama):
    result = invoke("--data_path", str(named_dataset), "--base_model", tiny_llama, "--register", "true",
                    "--max_test_samples", "6", "--run_name", "zs")
    assert result.exit_code == 0, result.output
    version = MlflowClient().get_model_version("textclf-namedsent", "1")
    run = MlflowClient().get_run(version.run_id)
    assert run.info.run_name == "zs" and run.data.params["data.rows.test"] == "6"
    assert version.tags["baseline"] == "zero-shot" and version.tags["mode"] == "zero-shot"
    assert float(version.tags["validation_f1_macro"]) == pytest.approx(run.data.metrics["eval/f1_macro"])
    from textclf.records.registry import promote

    assert promote("namedsent", use_stage=False).version == "1"


@pytest.mark.parametrize("case", ["encoder", "unknown dataset", "batch size"])
def test_bad_input_is_refused_in_one_line_before_any_run(mlflow_store, named_dataset, minilm, tiny_llama, case):
    args = {
        "encoder": ["--data_path", str(named_dataset), "--base_model", minilm],
        "unknown dataset": ["--dataset", "nope", "--base_model", tiny_llama],
        "batch size": ["--data_path", str(named_dataset), "--base_model", tiny_llama, "--batch_size", "0"],
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    expected = {"encoder": "needs a decoder language model", "unknown dataset": "unknown dataset 'nope'",
                "batch size": "batch_size must be a positive integer"}[case]
    assert expected in errors[0]
    assert not [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                if r.info.status == "RUNNING"]


def test_textclf_cli_has_the_baseline_command():
    from entrypoints.cli import main

    result = CliRunner().invoke(main, ["baseline", "--help"])
    assert result.exit_code == 0 and "--base_model" in result.output
