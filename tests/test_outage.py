"""A tracking server that goes away in the middle of a training: nothing is lost.

Against a real `mlflow server` (sqlite behind it, proxied artifacts) on a loopback port, stopped and started
again by the test: a short outage that MLflow's own retries ride out, and one that outlasts them, where textclf's
journal takes over (tests/test_offline.py drives the journal and `textclf sync` in depth, in process)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import REPO, wait_until_answers
from test_mlproject import mlflow_env
from textclf.distributed.zero3 import free_port

pytestmark = pytest.mark.slow

STEPS, EVAL_EVERY = 16, 4


class Server:
    def __init__(self, folder: Path):
        self.folder, self.port, self.process = folder, free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.folder / 'store.db'}", "--serve-artifacts", "--artifacts-destination",
             str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_answers(f"{self.uri}/health", self.process, 120, "mlflow server")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


@pytest.fixture
def server(tmp_path, monkeypatch):
    server = Server(tmp_path)
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", server.uri)
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_registry_uri(server.uri)
    yield server
    if server.process.poll() is None:
        server.stop()


def start_training(tmp_path, tiny_dataset, tiny_llama, server, **env_extra):
    env = {**mlflow_env(server.uri), "PYTHONPATH": str(REPO), **env_extra}
    command = [sys.executable, "-m", "entrypoints.train", "--data_path", str(tiny_dataset), "--base_model", tiny_llama,
               "--mode", "lora", "--learning_rate", "5e-3", "--max_steps", str(STEPS), "--eval_steps", str(EVAL_EVERY),
               "--save_steps", str(EVAL_EVERY), "--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16",
               "--max_length", "128", "--precision", "fp32", "--output_dir", str(tmp_path / "out"), "--run_name", "run"]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process, timeout=300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def assert_everything_recorded(run_id: str) -> None:
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, STEPS + 1))
    assert [m.step for m in client.get_metric_history(run_id, "eval/f1_macro")] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    matrices = {a.path for a in client.list_artifacts(run_id, "eval") if a.path.endswith(".png")}
    assert matrices == {f"eval/confusion_matrix_step_{s}.png" for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)}
    assert "test/accuracy" in run.data.metrics and "test/confusion_matrix.png" in {
        a.path for a in client.list_artifacts(run_id, "test")}
    assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(["a gem of a film"]).shape[0] == 1
    assert str(client.get_model_version("textclf-tinysent", "1").run_id) == run_id


def test_a_short_outage_only_pauses_training(tmp_path, server, tiny_dataset, tiny_llama):
    training = start_training(tmp_path, tiny_dataset, tiny_llama, server)
    wait_for(tmp_path / "out/run/checkpoint-4/COMPLETE", training)
    server.stop()
    time.sleep(5)  # MLflow's client keeps retrying (its default: 7 retries over about four minutes)
    server.start()
    output, _ = training.communicate(timeout=900)
    assert training.returncode == 0, output[-3000:]
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert_everything_recorded(run.info.run_id)
    assert not (tmp_path / "out/run/offline/journal.jsonl").exists()  # MLflow's retries rode it out


def test_a_server_that_never_comes_back_loses_nothing_after_sync(tmp_path, server, tiny_dataset, tiny_llama):
    # Few, short retries, as a user who does not want to wait minutes for a dead server would set them.
    training = start_training(tmp_path, tiny_dataset, tiny_llama, server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                              MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    wait_for(tmp_path / "out/run/checkpoint-4/COMPLETE", training)
    server.stop()
    output, _ = training.communicate(timeout=900)
    assert training.returncode == 0, output[-3000:]
    assert "textclf sync" in output and "Traceback" not in output
    assert (tmp_path / "out/run/model/textclf.json").exists()  # the model was saved locally
    assert (tmp_path / "out/run/offline/journal.jsonl").exists()

    server.start()
    env = {**mlflow_env(server.uri), "PYTHONPATH": str(REPO)}
    synced = subprocess.run([sys.executable, "-m", "entrypoints.sync", str(tmp_path / "out/run")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert synced.returncode == 0, synced.stderr[-3000:]
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert_everything_recorded(run.info.run_id)
    again = subprocess.run([sys.executable, "-m", "entrypoints.sync", str(tmp_path / "out/run")], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "no offline records" in again.stderr  # nothing is uploaded twice
