"""`mlflow run . -e train ... --env-manager local` end to end, as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
    assert run.info.run_name == "tinysent-lora-seed0"  # not MLflow's random name

    # The same command again: the finished run is recognised; MLflow's new, empty run is deleted, not left behind.
    again = subprocess.run(command, cwd=tmp_path, env=mlflow_env(mlflow_store), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout + again.stderr
    # textclf deletes MLflow's duplicate once `mlflow run` has exited (see textclf/records/project_run.py)
    assert eventually(lambda: [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run.info.run_id])
    assert len(client.search_model_versions("name = 'textclf-tinysent'")) == 1


def eventually(condition, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.5)
    return True


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_an_interrupted_sweep_under_mlflow_run_ends_killed(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    command = [
        str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "sweep", "--env-manager", "local",
        "--experiment-name", "textclf-tinysent", "-P", f"data_path={tiny_dataset}", "-P", f"base_model={tiny_llama}",
        "-P", "seeds=0,42", "-P", "max_steps=100000", "-P", "eval_steps=2", "-P", "save_steps=2", "-P", "precision=fp32",
        "-P", f"output_dir={tmp_path / 'outputs'}", "-P", "max_length=128",
    ]
    # Output to a file, not a pipe nobody reads while it runs: a full pipe blocks the training's progress bar.
    log = open(tmp_path / "mlflow-run.log", "w")
    # `mlflow run` must take Ctrl-C as from a terminal. A suite started in the background without job control
    # (`cmd &` in a script, as CI may start it) inherits SIGINT ignored, and so would `mlflow run`: it then never
    # cancels its command (seen in CI, 2026-11-29: the sweep trained on, untouched, for 120 s).
    process = subprocess.Popen(command, cwd=tmp_path, env=mlflow_env(mlflow_store), stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=default_sigint)
    # Any complete checkpoint will do: only the best two are kept, so checkpoint-2 may already be gone when we look.
    # max_steps is far beyond what runs before the kill, so a fast CPU cannot finish the sweep first.
    seed0 = tmp_path / "outputs/tinysent-lora-sweep/tinysent-lora-seed0"
    assert eventually(lambda: any(seed0.glob("checkpoint-*/COMPLETE")) or process.poll() is not None,
                      timeout=600), "no checkpoint"
    assert process.poll() is None, (tmp_path / "mlflow-run.log").read_text()[-3000:]
    process.send_signal(signal.SIGINT)  # Ctrl-C on `mlflow run`, which then stops its command with SIGTERM
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        # Where it is stuck: the processes left, and the command's stacks (SIGUSR1, see entrypoints.common).
        processes = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,etime,args", "--forest"], capture_output=True,
                                   text=True).stdout
        subprocess.run(["pkill", "-USR1", "-f", f"entrypoints.sweep .*{tmp_path / 'outputs'}"])
        time.sleep(3)
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "outputs")])  # the command, stuck, and mlflow run after it
        process.kill()
        pytest.fail(f"mlflow run outlived Ctrl-C by 120 s; processes then:\n{processes}\nits log ends:\n"
                    + (tmp_path / "mlflow-run.log").read_text()[-12000:])
    client = MlflowClient()

    def statuses():
        runs = client.search_runs([client.get_experiment_by_name("textclf-tinysent").experiment_id])
        return {r.data.tags.get("sweep", "child"): r.info.status for r in runs}

    assert eventually(lambda: statuses() == {"parent": "KILLED", "child": "KILLED"}), statuses()


@pytest.mark.slow
def test_mlflow_run_with_bad_data_fails_its_run_with_the_reason(tmp_path, mlflow_store, tiny_llama):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.jsonl").write_text("{not json\n")
    command = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local",
               "--experiment-name", "textclf-broken", "-P", f"data_path={tmp_path / 'broken'}",
               "-P", f"base_model={tiny_llama}"]
    done = subprocess.run(command, cwd=tmp_path, env=mlflow_env(mlflow_store), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1  # `mlflow run` itself exits 1 when its command fails (our command exits 2)
    assert "error: " in done.stderr and "invalid JSON on line 1" in done.stderr and "Traceback (most recent" not in done.stderr.split("error: ")[0]
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("textclf-broken").experiment_id])
    assert run.info.status == "FAILED" and "invalid JSON on line 1" in run.data.tags["error"]


@pytest.mark.parametrize("entry_point, module", [("train", "train"), ("main", "train"), ("evaluate", "evaluate"),
                                                 ("sweep", "sweep"), ("promote", "promote"),
                                                 ("train_deepspeed", "train_deepspeed"), ("baseline", "baseline")])
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
