"""`make bench`: the side-by-side throughput comparison, the FLOP count behind MFU, and pyfunc vs bare forward."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


@pytest.mark.parametrize("mode, lower_layers_frozen", [("lora", 0), ("lora", 1), ("full", 0), ("full", 1)])
def test_flop_model_counts_what_torch_counts_in_a_training_step(tiny_llama, mode, lower_layers_frozen):
    """torch's FlopCounterMode over a real forward and backward of an unpadded batch (eager attention, whose
    matmuls it sees) counts exactly the FLOPs FlopModel charges: LoRA's frozen base and the layers under
    frozen_layers (full) or lora_layers (LoRA on the top layer only) get no weight gradient, and nothing below the
    lowest trained layer gets any gradient."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from textclf.components.model import base_of, build_classifier
    from textclf.config import ModelConfig
    from textclf.recipes.bench import FlopModel

    depth = 2
    config = (ModelConfig(base_model=tiny_llama, lora_r=4, lora_layers=depth - lower_layers_frozen) if mode == "lora"
              else ModelConfig(base_model=tiny_llama, frozen_layers=lower_layers_frozen))
    model, _ = build_classifier(config, mode, ["a", "b"], "{text}", 64)
    base_of(model.backbone).set_attn_implementation("eager")
    flop_model = FlopModel.of(model.train())
    rows, length = 4, 32
    ids = torch.randint(5, 500, (rows, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1] * (rows // 2))).loss.backward()
    counted = sum(counter.get_flop_counts()["TextClassifier.backbone"].values())  # the head is not counted
    assert flop_model.training_flops(real_tokens=rows * length, attention_pairs=rows * length**2) == counted
    assert flop_model.forward_only_layers == lower_layers_frozen


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
    # Each setting's FLOPs are the FlopModel's for the real tokens it trained on (padding is no useful work), and
    # MFU divides their rate by the matmul rate measured in the same run.
    from textclf.recipes.bench import FlopModel

    flop_model = FlopModel(**report["flop_model"])
    peak = report["matmul_gflops"]
    for row in report["training"]:
        assert row["flops"] == pytest.approx(flop_model.training_flops(row["real_tokens"], row["attention_pairs"]))
        assert row["mfu"] == pytest.approx(row["flops"] / row["seconds"] / 1e9 / peak["median"])
        assert row["mfu_vs_best_matmul"] == pytest.approx(row["flops"] / row["seconds"] / 1e9 / peak["best"])
    assert textclf["attention_pairs"] < textclf["real_tokens"] * 512
    assert 0 < peak["median"] <= peak["best"]
    prediction = report["prediction"]
    assert prediction["rows"] == 40 and prediction["pyfunc_samples_per_second"] > 0
    assert "| textclf: pad per batch, length-grouped batches |" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # the bench's model goes to a throwaway store


def test_accuracy_recipes_are_valid_configs_bounded_by_their_goal_time():
    from textclf.recipes.bench_accuracy import GOALS, RECIPES, recipe_config

    assert set(RECIPES) == set(GOALS) == {"sst2", "r8"}
    for dataset in RECIPES:
        for precision in ("fp32", "bf16"):  # a CPU without bf16 instructions, and one with them
            config = recipe_config(dataset, precision=precision)  # validated like any run's config
            assert GOALS[dataset]["train_minutes"] - 1 < config.training.max_train_minutes < GOALS[dataset]["train_minutes"]
            assert config.data.max_test_samples is None  # the goals are on the full test split
            assert "{class_labels}" in config.data.prompt_template
            # Sized to the budget on the machine at hand (fit_to_budget), up to an upper bound of steps.
            assert config.training.fit_to_budget and config.training.epochs > 0 and config.training.max_steps <= 0


@pytest.mark.slow
def test_bench_accuracy_trains_a_tracked_run_and_reports_it_against_the_goal(mlflow_store, tiny_llama, tmp_path,
                                                                              monkeypatch):
    from mlflow import MlflowClient

    from entrypoints.bench_accuracy import bench_accuracy
    from textclf.recipes import bench_accuracy as recipes

    monkeypatch.setitem(recipes.BF16_CHANGES, "sst2", {})
    monkeypatch.setitem(recipes.BF16_WITHOUT_JEMALLOC, "sst2", {})
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
    assert row["met"] is False  # a 4-step tiny model is far from the 93% goal, and the report must say so
    assert "| sst2 | " in result.output

    refused = CliRunner().invoke(bench_accuracy, ["--datasets", "imdb", "--output", str(output)])
    assert refused.exit_code == 2 and "no accuracy recipe for imdb" in refused.output
