"""What a run leaves on disk: a LoRA checkpoint holds what training changed, not the frozen base model, and
still resumes, selects the best checkpoint and evaluates; a finished run's checkpoints keep their weights
but not the optimizer state that only served to resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import load_file

from entrypoints.train import train
from textclf.components import checkpoints

# A small adapter and a linear head: what training changes is a few percent of the tiny base model.
TINY = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
        "--precision", "fp32", "--mode", "lora", "--lora_r", "4", "--head", "linear", "--learning_rate", "5e-3",
        "--eval_steps", "2", "--save_steps", "2", "--register", "false", "--calibrate", "false"]
OUTPUT = Path("outputs/tinysent-lora-seed42")


def invoke(*args):
    return CliRunner().invoke(train, list(args))


def is_frozen_base_key(key: str) -> bool:
    """Under PEFT a frozen base weight is any backbone key but the adapters'."""
    return key.startswith("backbone.") and "lora_" not in key


def finished_run(output: Path):
    record = json.loads((output / checkpoints.FINISHED_FILE).read_text())
    return MlflowClient().get_run(record["run_id"])


@pytest.mark.slow
def test_a_lora_checkpoint_holds_the_adapters_and_head_but_no_frozen_base_weight(mlflow_store, tiny_dataset,
                                                                                  tiny_llama):
    result = invoke("--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "2", *TINY)
    assert result.exit_code == 0, result.output
    weights = OUTPUT / "checkpoint-2" / "model.safetensors"
    keys = set(load_file(str(weights)))
    assert not [key for key in keys if is_frozen_base_key(key)]
    assert any("lora_A" in key for key in keys) and any("lora_B" in key for key in keys)
    assert {"head.0.shift", "head.0.scale", "head.2.weight", "head.2.bias"} <= keys  # the scaler's buffers too
    assert weights.stat().st_size < (Path(tiny_llama) / "model.safetensors").stat().st_size / 5


@pytest.mark.slow
def test_a_lora_run_resumes_from_its_slim_checkpoint_and_ends_on_the_best_one(mlflow_store, tiny_dataset,
                                                                              tiny_llama, monkeypatch):
    from textclf.serving.inference import Predictor
    from textclf.serving.sources import load_model_source

    args = ["--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "6", *TINY]
    straight = invoke(*args, "--output_dir", "straight")
    assert straight.exit_code == 0, straight.output

    finalize = checkpoints.finalize

    def die_after_checkpoint_4(folder, *rest):
        finalize(folder, *rest)
        if folder.name == "checkpoint-4":
            raise RuntimeError("the machine went away")

    with monkeypatch.context() as patched:  # its own undo: the store fixture's working folder stays
        patched.setattr(checkpoints, "finalize", die_after_checkpoint_4)
        assert invoke(*args, "--output_dir", "resumed").exit_code != 0
    folder = Path("resumed/tinysent-lora-seed42")
    assert not (folder / "checkpoint-6").exists()
    assert not [key for key in load_file(str(folder / "checkpoint-4" / "model.safetensors")) if is_frozen_base_key(key)]
    resumed = invoke(*args, "--output_dir", "resumed")
    assert resumed.exit_code == 0, resumed.output
    expected = finished_run(Path("straight/tinysent-lora-seed42")).data.metrics
    run = finished_run(folder)
    assert run.data.tags["resumed_from"].endswith("checkpoint-4")
    metrics = run.data.metrics
    for name in ("train/loss", "best/f1_macro", "best/loss", "test/accuracy", "test/f1_macro"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6), name

    # load_best_model_at_end: the final model is the best checkpoint's. Validation F1 ties over these few steps
    # and a tie keeps the earlier checkpoint, so the best is not the last one trained.
    state = json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())
    best = folder / Path(state["best_model_checkpoint"]).name
    assert best.name != "checkpoint-6"
    loaded = load_model_source(str(best))
    assert loaded.kind == "Trainer checkpoint"
    test_texts = [json.loads(line)["text"] for line in (tiny_dataset / "test.jsonl").read_text().splitlines()]
    logits = Predictor(loaded.model, loaded.tokenizer, batch_size=16).logits(test_texts)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    final = pd.read_parquet(folder / "test" / "predictions.parquet")
    np.testing.assert_allclose(final[["prob_0", "prob_1"]].to_numpy(), probabilities, atol=1e-5)


@pytest.mark.slow
def test_a_finished_run_keeps_checkpoint_weights_but_no_optimizer_state(mlflow_store, tiny_dataset, tiny_llama,
                                                                         caplog):
    caplog.set_level(logging.INFO, logger="textclf.components.checkpoints")
    args = ["--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "4", *TINY]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    folders = checkpoints.checkpoint_folders(OUTPUT)
    assert [p.name for p in folders] == ["checkpoint-2", "checkpoint-4"]
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth"}, folder
        assert {"model.safetensors", "trainer_state.json", "tokenizer.json", "COMPLETE"} <= names, folder
    assert [r for r in caplog.records if "MB freed" in r.getMessage()]

    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "already finished" in again.output


def test_a_checkpoint_lacking_a_trained_weight_is_refused_and_a_slim_one_rebuilds_the_model(tmp_path, tiny_llama):
    import torch
    from safetensors.torch import save_file

    from textclf.components.model import build_classifier, rebuild_from_state, trained_state
    from textclf.config import ModelConfig
    from textclf.errors import TextclfError

    torch.manual_seed(0)
    model, tokenizer = build_classifier(ModelConfig(base_model=tiny_llama, lora_r=4, head="linear"), "lora",
                                        ["no", "yes"], "{text}", 32)
    with torch.no_grad():  # as if trained: the adapters and the head's scaler differ from a fresh model's
        for name, tensor in model.state_dict().items():
            if "lora_B" in name or name.startswith("head.0."):
                tensor.add_(0.1)
    model.spec.save(tmp_path)
    state = trained_state(model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    rebuilt, _ = rebuild_from_state(tmp_path, tmp_path / "model.safetensors")
    batch = tokenizer(["a gem of a film"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch).logits, model.eval()(**batch).logits)

    del state["head.2.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TextclfError, match=r"does not fit the model \(missing head\.2\.weight\)"):
        rebuild_from_state(tmp_path, tmp_path / "model.safetensors")


@pytest.mark.slow
def test_the_model_folder_and_checkpoints_say_how_they_were_made_and_older_folders_still_load(mlflow_store, tiny_dataset,
                                                                                               tiny_llama):
    from textclf.components.model import FORMAT_VERSION, RUN_CONFIG_FILE, SPEC_FILE, load_run_config
    from textclf.config import run_config_from_dict
    from textclf.serving.inference import Predictor
    from textclf.serving.sources import load_model_source

    result = invoke("--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "2", *TINY)
    assert result.exit_code == 0, result.output
    run = finished_run(OUTPUT)
    logged = json.loads(Path(MlflowClient().download_artifacts(run.info.run_id, "config.json", ".")).read_text())
    assert logged["training"]["max_steps"] == 2 and logged["model"]["base_model"] == tiny_llama
    texts = [json.loads(line)["text"] for line in (tiny_dataset / "test.jsonl").read_text().splitlines()]
    for folder, kind in ((OUTPUT / "model", "textclf model folder"), (OUTPUT / "checkpoint-2", "Trainer checkpoint")):
        assert load_run_config(folder) == logged, folder
        assert run_config_from_dict(load_run_config(folder)).to_dict() == logged
        assert json.loads((folder / SPEC_FILE).read_text())["format_version"] == FORMAT_VERSION
        assert not (folder / "config.json").exists()  # the name tools read as a Hugging Face model config
        loaded = load_model_source(str(folder))
        expected = Predictor(loaded.model, loaded.tokenizer).logits(texts)

        # As written by format version 2, which named the run's configuration config.json.
        (folder / RUN_CONFIG_FILE).rename(folder / "config.json")
        spec = json.loads((folder / SPEC_FILE).read_text())
        (folder / SPEC_FILE).write_text(json.dumps({**spec, "format_version": 2}))
        assert load_run_config(folder) == logged
        version_2 = load_model_source(str(folder))
        np.testing.assert_allclose(Predictor(version_2.model, version_2.tokenizer).logits(texts), expected, atol=1e-6)

        # As written before folders carried their run's config and a format version (version 1).
        (folder / "config.json").unlink()
        spec = json.loads((folder / SPEC_FILE).read_text())
        del spec["format_version"]
        (folder / SPEC_FILE).write_text(json.dumps(spec))
        old = load_model_source(str(folder))
        assert old.kind == kind and load_run_config(folder) is None
        np.testing.assert_allclose(Predictor(old.model, old.tokenizer).logits(texts), expected, atol=1e-6)
