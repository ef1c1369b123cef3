"""`make bench`: the side-by-side throughput comparison, the FLOP count behind MFU, and pyfunc vs bare forward."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


def test_flop_model_counts_lora_weights_as_trained_and_base_weights_as_frozen(tiny_llama):
    from textclf.bench import FlopModel
    from textclf.config import ModelConfig
    from textclf.model import build_classifier

    model, _ = build_classifier(ModelConfig(base_model=tiny_llama, lora_r=4), "lora", ["a", "b"], "{text}", 64)
    flops = FlopModel.of(model)
    # Tiny Llama: hidden 64, intermediate 128, 2 layers, 4 heads of 16, full-width k/v.
    hidden, inter, layers, r = 64, 128, 2, 4
    base_per_layer = 4 * hidden * hidden + 3 * hidden * inter
    lora_per_layer = 4 * r * (hidden + hidden) + 3 * r * (hidden + inter)
    assert flops.frozen_linear == layers * base_per_layer
    assert flops.trained_linear == layers * lora_per_layer
    assert (flops.layers, flops.attention_width) == (2, 64)
    # 10 real tokens of a 16-token batch: weights count real tokens, attention the padded length.
    per_token = 4 * flops.frozen_linear + 6 * flops.trained_linear + 12 * 2 * 64 * 16
    assert flops.training_flops(real_tokens=10, padded_tokens=16, sequence_length=16) == 10 * per_token


def test_full_mode_counts_every_linear_weight_as_trained(tiny_llama):
    from textclf.bench import FlopModel
    from textclf.config import ModelConfig
    from textclf.model import build_classifier

    model, _ = build_classifier(ModelConfig(base_model=tiny_llama), "full", ["a", "b"], "{text}", 64)
    flops = FlopModel.of(model)
    assert flops.frozen_linear == 0
    assert flops.trained_linear == 2 * (4 * 64 * 64 + 3 * 64 * 128)


@pytest.mark.slow
def test_bench_compares_settings_side_by_side_and_writes_json(tiny_llama, tmp_path, monkeypatch):
    from entrypoints.bench import bench

    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out" / "bench.json"
    result = CliRunner().invoke(bench, ["--base_model", tiny_llama, "--rows", "64", "--baseline_steps", "2",
                                        "--predict_rows", "40", "--output", str(output)])
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())
    baseline, random_order, textclf = report["training"]
    assert "pad to 512" in baseline["setting"] and "textclf" in textclf["setting"]
    assert baseline["steps"] == 2 and textclf["steps"] == 64 // 8 - 1  # the first step is the untimed warm-up
    assert baseline["padded_tokens"] == baseline["samples"] * 512
    # Per-batch padding computes far fewer padded tokens than padding to 512 (tiny prompts are ~120 tokens).
    assert textclf["padding_fraction"] < baseline["padding_fraction"] / 2
    for row in report["training"]:
        assert 0 < row["mfu_vs_best_matmul"] <= row["mfu"] < 1 and row["seconds"] > 0
    assert 0 < report["matmul_gflops"]["median"] <= report["matmul_gflops"]["best"]
    prediction = report["prediction"]
    assert prediction["rows"] == 40 and prediction["pyfunc_samples_per_second"] > 0
    assert "| textclf: pad per batch, length-grouped batches |" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # the bench's model goes to a throwaway store


def test_accuracy_recipes_are_valid_configs_bounded_by_their_goal_time():
    from textclf.bench_accuracy import GOALS, RECIPES, recipe_config

    assert set(RECIPES) == set(GOALS) == {"sst2", "r8"}
    for dataset in RECIPES:
        config = recipe_config(dataset)  # validated like any run's config
        assert config.training.max_train_minutes == GOALS[dataset]["train_minutes"]
        assert config.data.max_test_samples is None  # the goals are on the full test split
        assert "{class_labels}" in config.data.prompt_template


@pytest.mark.slow
def test_bench_accuracy_trains_a_tracked_run_and_reports_it_against_the_goal(mlflow_store, tiny_llama, tmp_path,
                                                                              monkeypatch):
    from mlflow import MlflowClient

    from entrypoints.bench_accuracy import bench_accuracy
    from textclf import bench_accuracy as recipes

    monkeypatch.setitem(recipes.RECIPES, "sst2", dict(
        mode="lora", base_model=tiny_llama, max_length=128, batch_size=8, max_samples=32, max_steps=4, eval_steps=2,
        save_steps=2, max_eval_samples=16, max_test_samples=40, max_train_minutes=20, precision="fp32"))
    output = tmp_path / "accuracy.json"
    result = CliRunner().invoke(bench_accuracy, ["--datasets", "sst2", "--output", str(output)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(output.read_text())
    run = MlflowClient().get_run(row["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["bench"] == "accuracy"
    assert row["test_accuracy"] == pytest.approx(run.data.metrics["test/accuracy"])
    assert row["train_minutes"] == pytest.approx(run.data.metrics["train/runtime_seconds"] / 60)
    assert row["met"] is False  # a 4-step tiny model is far from the 93.5% goal, and the report must say so
    assert "| sst2 | " in result.output

    refused = CliRunner().invoke(bench_accuracy, ["--datasets", "imdb", "--output", str(output)])
    assert refused.exit_code == 2 and "no accuracy recipe for imdb" in refused.output
