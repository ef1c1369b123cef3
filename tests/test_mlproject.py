"""`mlflow run . -e train ... --env-manager local` end to end, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO


def mlflow_env(tracking_uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `mlflow run` runs `python` from PATH
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_mlflow_run_train_end_to_end(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    command = [
        str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local",
        "--experiment-name", "textclf-tinysent",
        "-P", f"data_path={tiny_dataset}", "-P", f"base_model={tiny_llama}", "-P", "mode=lora", "-P", "seed=0",
        "-P", "max_steps=4", "-P", "eval_steps=2", "-P", "save_steps=2", "-P", "logging_steps=1",
        "-P", "precision=fp32", "-P", f"output_dir={tmp_path / 'outputs'}", "-P", "max_length=128",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=mlflow_env(mlflow_store), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("textclf-tinysent")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the run mlflow created is the run; no second one
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["run.seed"] == "0" and run.data.tags["mode"] == "lora"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 3
    assert "test/accuracy" in run.data.metrics
    assert client.get_model_version("textclf-tinysent", "1").run_id == run.info.run_id


@pytest.mark.parametrize("entry_point, module", [("train", "train"), ("main", "train"), ("evaluate", "evaluate"),
                                                 ("sweep", "sweep"), ("promote", "promote"),
                                                 ("train_deepspeed", "train_deepspeed")])
def test_every_mlproject_parameter_reaches_its_click_option(entry_point, module):
    """A parameter missing from the command line would be accepted by `mlflow run` and silently ignored."""
    import importlib

    import click
    import yaml

    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"][entry_point]
    command = next(obj for obj in vars(importlib.import_module(f"entrypoints.{module}")).values()
                   if isinstance(obj, click.Command) and obj.name.replace("-", "_") == module)
    # Command-line only: --debug, the DeepSpeed --worker (set by the launcher), --no-stage (MLproject has
    # stage=false), and sweep's --seed (its seeds parameter replaces it).
    cli_only = {"debug", "worker", "no_stage"} | ({"seed"} if module == "sweep" else set())
    options = {param.name for param in command.params} - cli_only
    assert set(spec["parameters"]) == options
    for name in spec["parameters"]:
        assert f"--{name} {{{name}}}" in spec["command"], name
