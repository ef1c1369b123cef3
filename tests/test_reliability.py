"""No run left RUNNING, no checkpoint lost, every bad input refused with one clear line."""

from __future__ import annotations

import functools
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

from conftest import REPO, sentiment_rows
from entrypoints.train import train
from test_mlproject import mlflow_env

TINY = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
        "--precision", "fp32", "--register", "false"]


def statuses() -> list[str]:
    return [r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")]


def invoke(*args):
    return CliRunner().invoke(train, list(args))


@pytest.mark.slow
def test_exception_in_training_ends_run_failed_with_error(mlflow_store, tiny_dataset, tiny_llama, monkeypatch):
    from transformers import Trainer

    def explode(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Trainer, "train", explode)
    result = invoke("--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "2", *TINY)
    assert result.exit_code != 0
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FAILED"
    assert "disk on fire" in run.data.tags["error"]


@pytest.mark.slow
def test_a_failure_setting_the_first_tags_ends_the_run_failed(mlflow_store, tiny_dataset, tiny_llama, monkeypatch):
    real = mlflow.set_tags
    calls = []

    def fail_first(tags):
        calls.append(tags)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException("the store refused the tags (injected)")
        return real(tags)

    monkeypatch.setattr(mlflow, "set_tags", fail_first)
    result = invoke("--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "2", *TINY)
    assert result.exit_code != 0 and calls
    assert statuses() == ["FAILED"]


@pytest.mark.slow
def test_nan_loss_stops_the_run_failed_naming_the_step(mlflow_store, tiny_dataset, tiny_llama, monkeypatch):
    from textclf.components.model import TextClassifier

    forward = TextClassifier.forward
    trained_rows = [0]

    @functools.wraps(forward)  # the Trainer reads the forward signature to pick dataset columns
    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            trained_rows[0] += len(output.logits)
            if trained_rows[0] > 16:  # from step 3 on
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(TextClassifier, "forward", poisoned)
    result = invoke("--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "6",
                    "--eval_steps", "6", "--save_steps", "6", *TINY)
    assert result.exit_code == 2
    assert "training loss is nan at step 3" in result.output
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FAILED" and "step 3" in run.data.tags["error"]


def _bad_data(tmp_path, case):
    folder = tmp_path / "bad"
    good = sentiment_rows(12)
    files = {
        "missing_data_folder": None,
        "no_train_split": {"test.jsonl": good},
        "unknown_file_format": {"train.xml": "<rows/>"},
        "corrupt_json_line": {"train.jsonl": "\n".join([json.dumps(good[0]), "{oops", json.dumps(good[1])])},
        "corrupt_parquet": {"train.parquet": "PAR1 garbage"},
        "missing_text_column": {"train.jsonl": [{"review_body": "x", "label": 0}]},
        "empty_texts": {"train.jsonl": [{"text": "", "label": 0}, {"text": "b", "label": 1}]},
        "single_class_train": {"train.jsonl": [{"text": f"t{i}", "label": "a"} for i in range(6)]},
        "empty_file": {"train.jsonl": ""},
        "different_label_sets": {"train.jsonl": [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)],
                                 "dev.jsonl": [{"text": "x", "label": "c"}]},
    }[case]
    if files is None:
        return tmp_path / "missing"
    folder.mkdir()
    for name, content in files.items():
        text = content if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content)
        (folder / name).write_text(text)
    return folder


DATA_CASES = {
    "missing_data_folder": "data folder does not exist",
    "no_train_split": "no train split",
    "unknown_file_format": "unsupported file format (train.xml)",
    "corrupt_json_line": "invalid JSON on line 2",
    "corrupt_parquet": "not a valid Parquet file",
    "missing_text_column": "found review_body, label",
    "empty_texts": "empty or non-string text",
    "single_class_train": "single class",
    "empty_file": "file is empty",
    "different_label_sets": "labels not present in the train split: c",
}


def assert_clean_refusal(result, expected):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert "Traceback" not in result.output
    assert "RUNNING" not in statuses()


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_refused_before_any_run(tmp_path, mlflow_store, tiny_llama, case):
    path = _bad_data(tmp_path, case)
    result = invoke("--data_path", str(path), "--base_model", tiny_llama, *TINY)
    assert_clean_refusal(result, DATA_CASES[case])
    assert str(path) in result.output
    assert statuses() == []  # bad data stops before a run is created


@pytest.mark.parametrize("args, expected", [
    (["--mode", "qlora"], "invalid mode 'qlora'"),
    (["--precision", "fp8"], "invalid precision 'fp8'"),
    (["--precision", "fp16"], "fp16 needs a CUDA GPU"),
    (["--seed", "forty-two"], "invalid seed 'forty-two'"),
    (["--seed", "-1"], "invalid seed -1"),
    (["--max_samples", "0"], "max_samples must be a positive integer"),
    (["--base_model", "/nonexistent/model"], "base model folder does not exist"),
    (["--lora_targets", "q_proj,wqkv"], "LoRA targets absent from the model: wqkv"),
    (["--output_dir", "/proc/version/outputs"], "output folder cannot be written"),
    (["--save_steps", "5", "--eval_steps", "2"], "must be a multiple of eval_steps"),
    (["--warmup_ratio", "1"], "warmup_ratio must be in [0, 1), got 1.0"),
    (["--warmup_ratio", "-0.1"], "warmup_ratio must be in [0, 1)"),
    (["--head_dropout", "1"], "head_dropout must be in [0, 1), got 1.0"),
    (["--lora_dropout", "-0.5"], "lora_dropout must be in [0, 1), got -0.5"),
    (["--standardization_samples", "-1"], "standardization_samples must be >= 0"),
    (["--learning_rate", "0"], "learning_rate must be positive, got 0.0"),
    (["--head_learning_rate", "-1e-3"], "head_learning_rate must be positive"),
    (["--eval_steps", "0", "--save_steps", "2"], "eval_steps must be a positive integer, got 0"),
    (["--weight_decay", "-1"], "weight_decay must be >= 0"),
    (["--lora_r", "0"], "lora_r must be a positive integer"),
    (["--mode", "full", "--lora_layers", "1"], "lora_layers applies to mode=lora"),
    (["--lora_layers", "3"], "lora_layers=3: the model has 2 transformer layers"),
])
def test_bad_parameters_refused_clearly(mlflow_store, tiny_dataset, tiny_llama, args, expected):
    defaults = {"--base_model": tiny_llama}
    for flag, value in zip(args[::2], args[1::2]):
        defaults[flag] = value
    flat = [item for pair in defaults.items() for item in pair]
    result = invoke("--data_path", str(tiny_dataset), "--max_steps", "2", *TINY, *flat)
    assert_clean_refusal(result, expected)


def test_base_model_folder_that_is_not_a_model(tmp_path, mlflow_store, tiny_dataset):
    (tmp_path / "empty-model").mkdir()
    result = invoke("--data_path", str(tiny_dataset), "--base_model", str(tmp_path / "empty-model"), *TINY)
    assert_clean_refusal(result, "not a Hugging Face model folder")


def test_debug_shows_the_traceback(mlflow_store, tiny_dataset):
    from textclf.errors import TextclfError

    quiet = invoke("--data_path", str(tiny_dataset), "--mode", "qlora")
    assert quiet.exit_code == 2 and isinstance(quiet.exception, SystemExit)  # one line, no traceback
    loud = invoke("--data_path", str(tiny_dataset), "--mode", "qlora", "--debug")
    assert isinstance(loud.exception, TextclfError) and "invalid mode 'qlora'" in str(loud.exception)


def test_sweep_refuses_a_single_seed_before_any_run(mlflow_store, tiny_dataset):
    from entrypoints.sweep import sweep

    result = CliRunner().invoke(sweep, ["--data_path", str(tiny_dataset), "--seed", "42"])
    assert_clean_refusal(result, "sweep takes --seeds")
    assert statuses() == []


@pytest.mark.slow
def test_existing_checkpoints_are_not_overwritten_without_resume(mlflow_store, tiny_dataset, tiny_llama):
    args = ["--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--max_steps", "2", "--eval_steps", "2",
            "--save_steps", "2", *TINY]
    assert invoke(*args).exit_code == 0
    checkpoint = Path("outputs/tinysent-lora-seed42/checkpoint-2/model.safetensors")
    before = checkpoint.stat().st_mtime_ns
    result = invoke(*args, "--resume", "false")
    assert_clean_refusal(result, "holds finished run")
    assert checkpoint.stat().st_mtime_ns == before
    Path("outputs/tinysent-lora-seed42/finished_run.json").unlink()  # as if it had died after its checkpoint
    result = invoke(*args, "--resume", "false")
    assert_clean_refusal(result, "already holds checkpoints (checkpoint-2)")
    assert checkpoint.stat().st_mtime_ns == before


def _train_process(tmp_path, tiny_dataset, tiny_llama, output_dir, max_steps="12"):
    command = [sys.executable, "-m", "entrypoints.train", "--data_path", str(tiny_dataset), "--base_model", tiny_llama,
               "--mode", "lora", "--learning_rate", "5e-3", "--max_steps", max_steps, "--eval_steps", "2",
               "--save_steps", "4", "--output_dir", str(output_dir), "--run_name", "resumable", *TINY]
    env = mlflow_env(os.environ["MLFLOW_TRACKING_URI"])
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process, timeout=240):
    """Until ``path`` exists (it may hold a ``*``, as in ``checkpoint-*/COMPLETE``), while ``process`` runs."""
    deadline = time.time() + timeout
    while not any(Path(path.anchor).glob(str(path.relative_to(path.anchor)))):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_ends_run_killed_with_last_checkpoint_intact(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    # Far more steps than run before the signal, and any complete checkpoint will do: on a fast CPU the first
    # ones may already be rotated out (the best two are kept) when we look.
    process = _train_process(tmp_path, tiny_dataset, tiny_llama, tmp_path / "out", max_steps="100000")
    _wait_for(tmp_path / "out/resumable/checkpoint-*/COMPLETE", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "KILLED"
    kept = sorted((tmp_path / "out/resumable").glob("checkpoint-*"))
    assert kept and all((c / "COMPLETE").exists() and (c / "model.safetensors").exists() for c in kept)


@pytest.mark.slow
def test_resume_after_kill_9_reaches_the_uninterrupted_result(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    straight = _train_process(tmp_path, tiny_dataset, tiny_llama, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stdout.read()[-3000:]

    killed = _train_process(tmp_path, tiny_dataset, tiny_llama, tmp_path / "resumed")
    _wait_for(tmp_path / "resumed/resumable/checkpoint-8/COMPLETE", killed)
    killed.kill()
    killed.wait()
    # a half-written checkpoint must never be resumed from
    half = tmp_path / "resumed/resumable/checkpoint-12"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_text("truncated")
    resumed = _train_process(tmp_path, tiny_dataset, tiny_llama, tmp_path / "resumed")
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()[-3000:]
    assert (tmp_path / "resumed/resumable/incomplete-checkpoint-12").exists()

    runs = {r.info.run_id: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    assert "RUNNING" not in [r.info.status for r in runs.values()]
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert len(finished) == 2
    by_dir = {Path(r.data.tags["output_dir"]).parent.name: r for r in finished}
    resumed_run = by_dir["resumed"]
    assert resumed_run.data.tags["resumed_from"].endswith("checkpoint-8")
    assert runs[resumed_run.data.tags["resumes_runs"]].info.status == "KILLED"
    for metric in ("test/accuracy", "test/f1_macro", "best/f1_macro"):
        assert resumed_run.data.metrics[metric] == pytest.approx(by_dir["straight"].data.metrics[metric], abs=1e-6)


@pytest.mark.slow
def test_two_trainings_at_once_into_one_store(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    first = _train_process(tmp_path, tiny_dataset, tiny_llama, tmp_path / "a", max_steps="4")
    second = _train_process(tmp_path, tiny_dataset, tiny_llama, tmp_path / "b", max_steps="4")
    assert first.wait(timeout=600) == 0, first.stdout.read()[-3000:]
    assert second.wait(timeout=600) == 0, second.stdout.read()[-3000:]
    assert sorted(statuses()) == ["FINISHED", "FINISHED"]


def test_two_runs_logging_the_same_new_dataset_at_once_both_record_it(mlflow_store, monkeypatch):
    """MLflow looks a dataset up, then inserts it: two runs logging the same new dataset at once (a sweep's seeds,
    search workers) both find nothing and both insert. The barrier holds each run between the two, as a fast CPU's
    scheduling did on the team server in CI; the run whose insert comes second must log its input anyway."""
    import threading

    import pandas as pd
    from mlflow.store.tracking import sqlalchemy_store

    from textclf.records.tracking import log_dataset

    both_looked = threading.Barrier(2, timeout=30)
    held = set()

    class RowAfterBothLookups(sqlalchemy_store.SqlDataset):
        def __init__(self, **columns):
            if threading.get_ident() not in held:  # only each run's first insert: a retry must go through
                held.add(threading.get_ident())
                both_looked.wait()
            super().__init__(**columns)

    monkeypatch.setattr(sqlalchemy_store, "SqlDataset", RowAfterBothLookups)
    frame = pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]})
    run_ids, errors = [], []

    def one_run() -> None:
        try:
            with mlflow.start_run() as run:
                run_ids.append(run.info.run_id)
                log_dataset(frame, "data/train.jsonl", "tiny-train", "training")
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for run_id in run_ids:
        inputs = mlflow.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [("tiny-train", "training")]


@pytest.mark.slow
def test_an_interrupted_sweep_ends_parent_and_child_killed(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    command = [sys.executable, "-m", "entrypoints.sweep", "--seeds", "0,42", "--data_path", str(tiny_dataset),
               "--base_model", tiny_llama, "--mode", "lora", "--max_steps", "100000", "--eval_steps", "2",
               "--save_steps", "2", "--output_dir", str(tmp_path / "out"), *TINY]
    env = mlflow_env(os.environ["MLFLOW_TRACKING_URI"])
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(tmp_path / "out/tinysent-lora-sweep/tinysent-lora-seed0/checkpoint-*/COMPLETE", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, process.stdout.read()[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert {r.data.tags.get("sweep", "child"): r.info.status for r in runs} == {"parent": "KILLED", "child": "KILLED"}
    assert len(runs) == 2  # the second seed never started


def test_the_console_names_options_either_way_and_says_the_version(mlflow_store, tiny_dataset):
    from entrypoints.cli import main

    dashed = invoke("--data-path", str(tiny_dataset), "--batch-size", "0")
    assert_clean_refusal(dashed, "batch_size must be a positive integer, got 0")
    version = CliRunner().invoke(main, ["--version"])
    assert version.exit_code == 0 and "textclf, version" in version.output
    shown = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "[preset: full 2e-05, lora 0.0005; x>0]" in shown and "[default: 512; x>=16]" in shown


@pytest.mark.slow
def test_a_training_prints_no_library_noise(tmp_path, mlflow_store, tiny_dataset, tiny_llama):
    process = _train_process(tmp_path, tiny_dataset, tiny_llama, tmp_path / "out", max_steps="4")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    for noise in ("Warning:", "[A", "Setting accelerator to CPU", "Add type hints", "can be interpreted in multiple",
                  "mtime may not be reliable", "Writing model shards", "Loading weights"):
        assert noise not in output, noise
    assert "step 2: validation" in output
    assert output.strip().splitlines()[-1].startswith("model: runs:/") or "model: " in output.strip().splitlines()[-1]


def test_evaluate_refuses_a_bad_count_in_one_line(mlflow_store):
    from entrypoints.evaluate import evaluate

    result = CliRunner().invoke(evaluate, ["--model_uri", "nowhere", "--data_path", "nowhere", "--max_test_samples", "abc"])
    assert_clean_refusal(result, "max_test_samples must be a positive integer, got 'abc'")


def test_sigusr1_prints_where_a_command_is_without_stopping_it():
    """A user whose training seems stuck runs `kill -USR1 <pid>` and reads every thread's stack."""
    code = ("from entrypoints.common import setup_logging; setup_logging(); import time\n"
            "def waiting_here(): print('ready', flush=True); time.sleep(60)\nwaiting_here()")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        assert process.poll() is None  # still running
    finally:
        process.kill()
    stderr = process.communicate()[1]
    assert "most recent call first" in stderr and "waiting_here" in stderr
