"""DeepSpeed ZeRO-3 on 2 CPU processes through the real entry point (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import REPO, tracking_store, write_tiny_dataset
from test_mlproject import mlflow_env

pytestmark = pytest.mark.slow

ARGS = ["--mode", "lora", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--batch_size", "8",
        "--eval_batch_size", "16", "--max_length", "128", "--learning_rate", "5e-3", "--precision", "fp32",
        "--logging_steps", "1"]


def run_deepspeed(tmp_path, tiny_dataset, tiny_llama, *extra, env_extra=None, num_procs="2"):
    env = mlflow_env(os.environ["MLFLOW_TRACKING_URI"])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([str(REPO / "tests" / "helpers")] if env_extra else [])])
    env.update(env_extra or {})
    command = [sys.executable, "-m", "entrypoints.train_deepspeed", "--num_procs", num_procs, "--data_path", str(tiny_dataset),
               "--base_model", tiny_llama, "--output_dir", str(tmp_path / "outputs"), *ARGS, *extra]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def children_left(tmp_path) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if "entrypoints.train_deepspeed" in line and str(tmp_path) in line]


# Evaluated every step, saved every second, with scripted validation scores: step 3 scores best but is not saved, so
# the run must select step 4 (0.8) over step 2 (0.6).
SELECTION = ["--eval_steps", "1", "--save_steps", "2"]
SCRIPTED = {"TEXTCLF_TEST_SCRIPTED_F1": "0.5,0.6,0.9,0.8"}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_llama):
    """One two-process ZeRO-3 run in a store of its own, made once: its test checks it, and the two-node test
    compares its consolidated weights with theirs. Rank 0's finishing work (test, logging) is slowed down, and each
    rank records when it exits: rank 1 must not wait for rank 0."""
    folder = tmp_path_factory.mktemp("zero3")
    (folder / "exits").mkdir()
    with tracking_store(folder):
        dataset = write_tiny_dataset(folder)
        done = run_deepspeed(folder, dataset, tiny_llama, *SELECTION,
                             env_extra={**SCRIPTED, "TEXTCLF_TEST_RANK0_FINISH_DELAY": "5",
                                        "TEXTCLF_TEST_EXIT_LOG": str(folder / "exits")})
    return folder, dataset, done


@pytest.fixture
def two_process_store(two_process_run):
    """That run's folder as the working folder and store of a test."""
    with tracking_store(two_process_run[0]):
        yield two_process_run


def test_two_process_zero3_run_is_one_finished_run_with_a_consolidated_model(two_process_store, tiny_llama):
    tmp_path, tiny_dataset, done = two_process_store
    exits = tmp_path / "exits"
    assert done.returncode == 0, done.stderr[-4000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1  # only rank 0 talks to MLflow
    run = runs[0]
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best/step"] == 4 and run.data.metrics["best/f1_macro"] == pytest.approx(0.8)
    # Throughput counts both ranks' rows (4 steps of 8 rows each) over the time spent in training steps.
    metrics = run.data.metrics
    assert metrics["train/samples_per_second"] * metrics["train/step_seconds"] == pytest.approx(2 * 4 * 8)
    registered = client.get_model_version("textclf-tinysent", "1").creation_timestamp / 1000
    assert float((exits / "rank-1").read_text()) < registered - 3  # gone before rank 0 finished, not waiting on it
    assert run.data.params["deepspeed.world_size"] == "2" and run.data.tags["deepspeed"] == "zero3"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 3
    config = json.loads(Path(client.download_artifacts(run.info.run_id, "deepspeed_config.json", str(tmp_path))).read_text())
    assert config["zero_optimization"]["stage"] == 3

    # The consolidated model reproduces what the engine measured on validation at the selected step.
    from textclf.components.data import load_test_split
    from textclf.components.evaluation import classification_metrics
    from textclf.components.model import load_classifier
    from textclf.serving.inference import Predictor

    out = tmp_path / "outputs" / "tinysent-lora-seed42"
    model, tokenizer = load_classifier(out / "model")
    # Every tensor of the LoRA classifier (backbone, adapters, head, scaler), whole: no rank's shard missing.
    from safetensors import safe_open

    from textclf.components.model import build_classifier
    from textclf.config import ModelConfig

    fresh, _ = build_classifier(ModelConfig(base_model=tiny_llama), "lora", model.spec.label_names,
                                model.spec.prompt_template, model.spec.max_length)
    with safe_open(str(out / "consolidated" / "model.safetensors"), "pt") as weights:
        shapes = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
    assert shapes == {key: list(value.shape) for key, value in fresh.state_dict().items()}
    validation = load_test_split(tiny_dataset / "dev.jsonl", model.spec.label_names)
    probabilities = Predictor(model, tokenizer).predict_proba(validation["text"].tolist())
    metrics = classification_metrics(validation["label"], probabilities.argmax(1), 2)
    assert metrics["accuracy"] == pytest.approx(run.data.metrics["best/accuracy"])

    # evaluate on a DeepSpeed checkpoint folder reproduces the run's test metrics
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    best = Path(state["best_model_checkpoint"] or sorted(out.glob("checkpoint-*"))[-1])
    from entrypoints.evaluate import evaluate

    for reference in (best, next(best.glob("global_step*"))):
        result = CliRunner().invoke(evaluate, ["--model_uri", str(reference), "--data_path", str(tiny_dataset)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        latest = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], output_format="list")[0]
        assert latest.data.metrics["test/accuracy"] == pytest.approx(run.data.metrics["test/accuracy"])
        assert latest.data.metrics["test/f1_macro"] == pytest.approx(run.data.metrics["test/f1_macro"])

    # the pyfunc model predicts like the consolidated model
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    texts = validation["text"].tolist()
    predicted = pyfunc.predict(pd.DataFrame({"text": texts}))
    assert (predicted["score"].to_numpy() - probabilities.max(1)).max() < 1e-5

    # the same command again: recognised before any process starts; nothing trained, logged or registered
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))  # + 2 evaluations
    again = run_deepspeed(tmp_path, tiny_dataset, tiny_llama, *SELECTION)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-3000:]
    assert "rank(s)" not in again.stderr  # no rank started: each logs its threads first
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before
    assert len(client.search_model_versions("name = 'textclf-tinysent'")) == 1


def test_deepspeed_refuses_a_folder_trained_without_it_in_one_line(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    from entrypoints.train import train

    plain = CliRunner().invoke(train, ["--data_path", str(tiny_dataset), "--base_model", tiny_llama,
                                       "--output_dir", str(tmp_path / "outputs"), *ARGS])
    assert plain.exit_code == 0, plain.output
    done = run_deepspeed(tmp_path, tiny_dataset, tiny_llama)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "engine: trainer -> deepspeed" in errors[0] and "Traceback" not in done.stderr
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1


def test_one_process_deepspeed_trains_the_recipe_train_trains(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    """Same data, seed and parameters (head learning rate and head-input standardization included): ZeRO-3 on one
    process must give the metrics `train` gives, or its logged params would describe another recipe."""
    recipe = ["--head_learning_rate", "2e-2", "--standardization_samples", "16", "--seed", "0"]
    done = run_deepspeed(tmp_path, tiny_dataset, tiny_llama, *recipe, "--run_name", "zero3", num_procs="1")
    assert done.returncode == 0, done.stderr[-4000:]
    env = mlflow_env(os.environ["MLFLOW_TRACKING_URI"])
    env["PYTHONPATH"] = str(REPO)
    plain = subprocess.run([sys.executable, "-m", "entrypoints.train", "--data_path", str(tiny_dataset), "--base_model",
                            tiny_llama, "--output_dir", str(tmp_path / "outputs"), "--run_name", "plain", *ARGS, *recipe],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert plain.returncode == 0, plain.stderr[-4000:]
    runs = {r.info.run_name: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    zero3, trained = runs["zero3"].data, runs["plain"].data
    for name in ("training.head_learning_rate", "model.standardization_samples"):
        assert zero3.params[name] == trained.params[name]
    client = MlflowClient()
    losses = {name: [m.value for m in sorted(client.get_metric_history(runs[name].info.run_id, "train/loss"),
                                             key=lambda m: m.step)] for name in runs}
    assert losses["zero3"] == pytest.approx(losses["plain"], rel=1e-3, abs=1e-4)
    for metric in ("best/loss", "best/accuracy", "test/accuracy", "test/f1_macro"):
        assert zero3.metrics[metric] == pytest.approx(trained.metrics[metric], abs=1e-3), metric


def test_a_users_deepspeed_config_with_cpu_offload_trains_and_is_logged(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    """-P deepspeed_config=FILE replaces the built config whole; with optimizer and parameters offloaded to the CPU
    (what -P offload=cpu builds), training runs on DeepSpeed's CPU Adam with the head's own learning rate."""
    from textclf.distributed.zero3 import build_deepspeed_config

    built = build_deepspeed_config("fp32", offload="cpu")
    assert built["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert built["zero_optimization"]["offload_param"]["device"] == "cpu"
    user = {**built, "steps_per_print": 1000, "wall_clock_breakdown": False}
    path = tmp_path / "my_ds.json"
    path.write_text(json.dumps(user))
    assert build_deepspeed_config("fp32", offload="none", user_file=str(path)) == user
    done = run_deepspeed(tmp_path, tiny_dataset, tiny_llama, "--deepspeed_config", str(path),
                         "--head_learning_rate", "2e-2", num_procs="1")
    assert done.returncode == 0, done.stderr[-4000:]  # DeepSpeed refuses ZeRO-Offload with a torch optimizer
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics
    logged = json.loads(Path(MlflowClient().download_artifacts(run.info.run_id, "deepspeed_config.json",
                                                                str(tmp_path))).read_text())
    assert logged == user


def test_a_failing_rank_fails_the_run_promptly_and_leaves_no_process(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    (tmp_path / "exits").mkdir()
    done = run_deepspeed(tmp_path, tiny_dataset, tiny_llama, env_extra={"TEXTCLF_TEST_FAIL_RANK": "1",
                                                                        "TEXTCLF_TEST_EXIT_LOG": str(tmp_path / "exits")})
    returned = time.time()
    assert done.returncode == 2, done.stderr[-4000:]
    # Rank 0, left blocked in a collective, is stopped within seconds, not after torchrun's default 30 s.
    assert returned - float((tmp_path / "exits" / "rank-1").read_text()) < 20
    assert "DeepSpeed training failed on at least one of 2 processes" in done.stderr
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert children_left(tmp_path) == []


def refused_before_launch(tmp_path, tiny_dataset, tiny_llama, *extra) -> str:
    """The launcher's refusal, run in process: it must come before torchrun (and any rank) starts, and leave no run."""
    from entrypoints.train_deepspeed import train_deepspeed

    result = CliRunner().invoke(train_deepspeed, ["--num_procs", "2", "--data_path", str(tiny_dataset), "--base_model",
                                                  tiny_llama, "--output_dir", str(tmp_path / "outputs"), *ARGS, *extra])
    assert result.exit_code == 2, result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert children_left(tmp_path) == []
    return result.output


def test_fp16_on_cpu_is_refused_before_launch(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    assert "fp16 needs a CUDA GPU" in refused_before_launch(tmp_path, tiny_dataset, tiny_llama, "--precision", "fp16")


def test_several_nodes_need_a_master_port(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    output = refused_before_launch(tmp_path, tiny_dataset, tiny_llama, "--num_nodes", "2")
    assert "master_port is required with num_nodes > 1" in output


def test_two_nodes_train_like_one_node_with_two_processes(tmp_path, mlflow_store, tiny_llama, two_process_run):
    """Two launchers on one host, each its own node of one process, meet through torchrun's rendezvous on
    loopback: one MLflow run (global rank 0), and the consolidated weights of the one-node, two-process run with
    the same parameters, data and scripted scores."""
    from safetensors.torch import load_file

    from textclf.distributed.zero3 import free_port

    one_node, dataset, _ = two_process_run
    env = mlflow_env(os.environ["MLFLOW_TRACKING_URI"])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests" / "helpers")])
    env.update(SCRIPTED)
    port = str(free_port())
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "entrypoints.train_deepspeed", "--num_procs", "1", "--num_nodes", "2", "--node_rank",
         str(rank), "--master_addr", "127.0.0.1", "--master_port", port, "--data_path", str(dataset),
         "--base_model", tiny_llama, "--output_dir", str(tmp_path / "outputs"), "--run_name", "two-nodes", *ARGS,
         *SELECTION],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [launcher.communicate(timeout=900)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")  # node 1 logged nothing
    assert run.info.run_name == "two-nodes" and run.info.status == "FINISHED"
    assert run.data.params["deepspeed.world_size"] == "2"
    a = load_file(str(one_node / "outputs/tinysent-lora-seed42/consolidated/model.safetensors"))
    b = load_file(str(tmp_path / "outputs/two-nodes/consolidated/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch_allclose(a[key], b[key]), key


def torch_allclose(x, y) -> bool:
    import torch

    return bool(torch.allclose(x.float(), y.float(), atol=1e-6))


def test_sigterm_to_the_launcher_stops_every_rank_and_ends_the_run_killed(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    """What `mlflow run`'s cancel does (SIGTERM to the launcher only): the ranks stop at the same step, the run
    ends KILLED, not FAILED, and no process is left training."""
    import signal
    import time

    env = mlflow_env(os.environ["MLFLOW_TRACKING_URI"])
    env["PYTHONPATH"] = str(REPO)
    args = [a if a != "4" else "100000" for a in ARGS]  # max_steps far beyond what runs before the signal
    command = [sys.executable, "-m", "entrypoints.train_deepspeed", "--num_procs", "2", "--data_path", str(tiny_dataset),
               "--base_model", tiny_llama, "--output_dir", str(tmp_path / "outputs"), *args]
    log = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    folder = tmp_path / "outputs" / "tinysent-lora-seed42"
    deadline = time.time() + 600
    while not any(folder.glob("checkpoint-*/COMPLETE")):
        assert launcher.poll() is None and time.time() < deadline, (tmp_path / "launcher.log").read_text()[-3000:]
        time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    try:
        code = launcher.wait(timeout=180)
        left = children_left(tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the launcher outlived SIGTERM by 180 s:\n" + (tmp_path / "launcher.log").read_text()[-4000:])
    finally:  # ranks left training would slow every later test
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "outputs")])
    output = (tmp_path / "launcher.log").read_text()
    assert code == 130, output[-3000:]
    assert left == []
    assert "SIGKILL" not in output and "via 9" not in output  # the ranks stopped themselves, torchrun did not kill them
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED"
    assert all((c / "COMPLETE").exists() for c in folder.glob("checkpoint-*"))


def test_after_install_a_deepspeed_run_compiles_nothing(tmp_path):
    """`make install` compiles DeepSpeed's CPU ops (textclf.distributed.cpu_ops); a new process then gets both the
    way a run does (deepspeed.comm's shared-memory op, ZeRO-Offload's CPU Adam) without compiling: the builds'
    ninja logs, which record every compile, are unchanged."""
    from torch.utils.cpp_extension import _get_build_directory

    from textclf.distributed.cpu_ops import build_cpu_ops

    assert set(build_cpu_ops()) == {"ShareMemCommBuilder", "CPUAdamBuilder"}  # built now if the cache was cleared
    logs = [Path(_get_build_directory(name, verbose=False)) / ".ninja_log" for name in ("deepspeed_shm_comm", "cpu_adam")]
    before = [log.read_bytes() for log in logs]
    run_like = ("import torch\n"
                "from deepspeed.comm.torch import build_shm_op\n"
                "from deepspeed.ops.adam import DeepSpeedCPUAdam\n"
                "assert build_shm_op() is not None\n"
                "DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(4))])\n")
    # The same PATH as this process, so the same ninja (make test puts the venv's first, as make install did).
    done = subprocess.run([sys.executable, "-c", run_like], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [log.read_bytes() for log in logs] == before
