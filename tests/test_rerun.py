"""Doing it twice is safe: a finished run is recognised, a checkpoint resumes only into the recipe that
wrote it, training never passes max_steps, sweeps and trainings never share a folder, and a run whose
process died is ended by the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import REPO, copy_of_store, tracking_store, write_tiny_dataset
from entrypoints.sweep import sweep
from entrypoints.train import train
from test_mlproject import mlflow_env

TINY = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
        "--precision", "fp32", "--mode", "lora", "--learning_rate", "5e-3", "--eval_steps", "2", "--save_steps", "2"]


def all_runs(include_deleted: bool = False):
    view = mlflow.entities.ViewType.ALL if include_deleted else mlflow.entities.ViewType.ACTIVE_ONLY
    return mlflow.search_runs(search_all_experiments=True, output_format="list", run_view_type=view)


def invoke(command, *args):
    return CliRunner().invoke(command, list(args))


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, tiny_llama) -> tuple[Path, list[str]]:
    """A store and folder holding one finished, registered run of 4 steps in outputs/tinysent-lora-seed42, trained
    once for this module; and the arguments that trained it."""
    folder = tmp_path_factory.mktemp("trained")
    with tracking_store(folder):
        args = ["--data_path", str(write_tiny_dataset(folder)), "--base_model", tiny_llama, "--max_steps", "4", *TINY]
        first = invoke(train, *args)
        assert first.exit_code == 0, first.output
    return folder, args


@pytest.fixture
def trained(trained_store, tmp_path):
    """A test's own copy of that store and folder (tests change them): its working folder; the run's arguments."""
    source, args = trained_store
    with tracking_store(copy_of_store(source, tmp_path / "copy")):
        yield args


@pytest.mark.slow
def test_rerunning_a_finished_run_trains_logs_and_registers_nothing(trained):
    runs_before = all_runs()
    again = invoke(train, *trained)
    assert again.exit_code == 0, again.output
    assert "already finished" in again.output and runs_before[0].info.run_id in again.output
    assert "models:/textclf-tinysent/1" in again.output
    assert [r.info.run_id for r in all_runs()] == [r.info.run_id for r in runs_before]
    assert [str(v.version) for v in MlflowClient().search_model_versions("name = 'textclf-tinysent'")] == ["1"]


@pytest.mark.slow
def test_a_finished_folder_refuses_other_parameters_naming_them(trained):
    result = invoke(train, *trained, "--max_steps", "6", "--standardization_samples", "8")
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "training.max_steps: 4 -> 6" in error[0] and "model.standardization_samples: 128 -> 8" in error[0]
    assert len(all_runs()) == 1


@pytest.mark.slow
def test_a_folder_written_before_a_parameter_existed_is_recognised_while_it_is_at_its_default(trained):
    """A later textclf adds parameters: an older folder's recipe lacks them, and the code that wrote it behaved
    as their defaults do. Rerunning is still recognised; asking for another value is refused, naming it."""
    record_file = Path("outputs/tinysent-lora-seed42/finished_run.json")
    record = json.loads(record_file.read_text())
    del record["recipe"]["training.early_stopping_patience"]
    # and under a parameter's former name (renamed standardization_samples since)
    record["recipe"]["model.calibration_samples"] = record["recipe"].pop("model.standardization_samples")
    record_file.write_text(json.dumps(record))
    again = invoke(train, *trained)
    assert again.exit_code == 0 and "already finished" in again.output, again.output
    other = invoke(train, *trained, "--early_stopping_patience", "3")
    assert other.exit_code == 2 and "training.early_stopping_patience: (unset) -> 3" in other.output, other.output
    assert len(all_runs()) == 1


@pytest.mark.slow
def test_a_checkpoint_resumes_only_into_its_recipe_and_never_past_max_steps(trained, tiny_llama, tmp_path):
    folder = Path("outputs/tinysent-lora-seed42")
    (folder / "finished_run.json").unlink()  # as if the process had died right after its last checkpoint
    other_base = invoke(train, *trained, "--base_model", str(tmp_path / "other-model"))
    assert other_base.exit_code == 2 and "base_model" in other_base.output
    other_cap = invoke(train, *trained, "--max_test_samples", "4")
    assert other_cap.exit_code == 2, other_cap.output
    assert "checkpoint-4: was written with other parameters" in other_cap.output
    assert "data.digest.test" in other_cap.output  # the test rows differ
    assert len(all_runs()) == 1

    resumed = invoke(train, *trained)
    assert resumed.exit_code == 0, resumed.output
    runs = all_runs()
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    latest = max(runs, key=lambda r: r.info.start_time)
    assert latest.data.tags["resumed_from"].endswith("checkpoint-4")
    steps = [m.step for m in MlflowClient().get_metric_history(latest.info.run_id, "train/loss")]
    assert max(steps, default=4) <= 4
    assert [p.name for p in sorted(folder.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


@pytest.mark.slow
def test_a_finished_runs_earlier_checkpoint_is_not_resumed_without_its_optimizer(trained):
    """A finished run drops its checkpoints' optimizer state; if its record is deleted and the last checkpoint
    with it, continuing from an earlier one would silently restart the optimizer and warm-up: refused."""
    import shutil

    folder = Path("outputs/tinysent-lora-seed42")
    (folder / "finished_run.json").unlink()
    shutil.rmtree(folder / "checkpoint-4")
    result = invoke(train, *trained)
    assert result.exit_code == 2, result.output
    assert "checkpoint-2: its optimizer and scheduler state were removed when its run finished" in result.output
    assert len(all_runs()) == 1


@pytest.mark.slow
def test_sweep_children_have_their_own_folders_and_a_rerun_sweep_does_nothing(mlflow_store, tiny_dataset, tiny_llama):
    args = ["--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "2", *TINY]
    swept = invoke(sweep, "--seeds", "0,42", *args)
    assert swept.exit_code == 0, swept.output
    child_model = Path("outputs/tinysent-lora-sweep/tinysent-lora-seed42/model/textclf.json")
    before = child_model.stat().st_mtime_ns
    trained = invoke(train, "--seed", "42", *args)
    assert trained.exit_code == 0, trained.output
    assert "already finished" not in trained.output
    assert Path("outputs/tinysent-lora-seed42/model/textclf.json").exists()
    assert child_model.stat().st_mtime_ns == before  # the sweep child's model was not overwritten
    runs = all_runs()
    versions = MlflowClient().search_model_versions("name = 'textclf-tinysent'")

    again = invoke(sweep, "--seeds", "0,42", *args)
    assert again.exit_code == 0, again.output
    assert "already finished" in again.output
    assert len(all_runs()) == len(runs) == 4  # parent, two children, one plain training
    assert len(MlflowClient().search_model_versions("name = 'textclf-tinysent'")) == len(versions) == 3
    assert invoke(sweep, "--seed", "42", *args).exit_code == 2


def _train_process(tmp_path, tiny_dataset, tiny_llama, *extra):
    command = [sys.executable, "-m", "entrypoints.train", "--data_path", str(tiny_dataset), "--base_model", tiny_llama,
               "--output_dir", str(tmp_path / "out"), "--run_name", "victim", *TINY, *extra]
    env = mlflow_env(os.environ["MLFLOW_TRACKING_URI"])
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_ended_by_the_next_start(tmp_path, mlflow_store, tiny_dataset,
                                                                            tiny_llama):
    victim = _train_process(tmp_path, tiny_dataset, tiny_llama, "--max_steps", "400", "--save_steps", "400",
                            "--eval_steps", "400")
    deadline = time.time() + 240
    while not [r for r in all_runs() if r.info.status == "RUNNING"]:
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.time() < deadline, "the run never started"
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not list((tmp_path / "out" / "victim").glob("checkpoint-*"))
    [dead] = all_runs()
    assert dead.info.status == "RUNNING"  # nothing could end it

    # A live run of the same folder is left alone; only the dead process's run is ended.
    nxt = _train_process(tmp_path, tiny_dataset, tiny_llama, "--max_steps", "2")
    assert nxt.wait(timeout=600) == 0, nxt.stdout.read()[-3000:]
    statuses = {r.info.run_id: r.info.status for r in all_runs()}
    assert statuses[dead.info.run_id] == "KILLED"
    assert sorted(statuses.values()) == ["FINISHED", "KILLED"]
    assert "died" in MlflowClient().get_run(dead.info.run_id).data.tags["error"]


def test_a_run_of_a_live_process_is_not_ended_and_its_folder_is_not_shared(mlflow_store):
    from textclf.errors import TextclfError
    from textclf.records import tracking

    mlflow.set_experiment("textclf-live")
    with mlflow.start_run() as run:
        mlflow.set_tags({"output_dir": "/somewhere", **tracking.process_tags()})
        with pytest.raises(TextclfError, match=f"run {run.info.run_id} of process {os.getpid()} is training"):
            tracking.end_dead_runs("/somewhere")
        assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"


def _probe_many(folder: str) -> int:
    from textclf.components.checkpoints import ensure_writable

    for _ in range(3000):
        ensure_writable(Path(folder))
    return 0


def test_ranks_probing_one_output_folder_at_once_never_see_it_unwritable(tmp_path):
    """Every DeepSpeed rank checks the folder at the same moment: a shared probe file raced."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.map(_probe_many, [str(tmp_path / "out")] * 4) == [0, 0, 0, 0]
    assert list((tmp_path / "out").iterdir()) == []


def test_two_prompts_that_differ_past_the_param_limit_are_two_recipes(tmp_path):
    """MLflow params are cut at 500 characters; a recipe compares whole values, so a long prompt changed near its end
    is another recipe: the folder of one is not recognised as the other's, nor resumed into it."""
    from textclf.components.checkpoints import plan_output_dir, recipe, record_finished
    from textclf.config import build_config, flatten
    from textclf.errors import TextclfError

    preamble = "Read the following review carefully. " * 20  # 760 characters
    first, second = (build_config("lora", data_path=str(tmp_path), prompt_template=preamble + "{text} " + ending)
                     for ending in ("Sentiment:", "Label:"))
    assert flatten(first)["data.prompt_template"] == flatten(second)["data.prompt_template"]  # as MLflow shows them
    record_finished(tmp_path, recipe(first), run_id="r1")
    assert plan_output_dir(tmp_path, True, recipe(first)).finished["run_id"] == "r1"
    with pytest.raises(TextclfError, match="data.prompt_template"):
        plan_output_dir(tmp_path, True, recipe(second))
    # A folder written before recipes held whole values still matches its own config, on the part that was kept.
    old = tmp_path / "old"
    old.mkdir()
    record_finished(old, {**recipe(first), "data.prompt_template": flatten(first)["data.prompt_template"]}, run_id="r0")
    assert plan_output_dir(old, True, recipe(first)).finished["run_id"] == "r0"

