"""What textclf adds when the tracking server goes away: the run's records go to a journal on disk, the process
gets MLflow's retries back once the run is over, and `textclf sync` uploads the journal, safely repeated after a
failure at any point. The server's absence is injected where textclf meets it (textclf.records.offline.OfflineRecords);
tests/test_outage.py does the same against a real `mlflow server` that is stopped."""

from __future__ import annotations

import os

import mlflow
import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient

from textclf.records import offline, tracking


def unreachable():
    raise requests.exceptions.ConnectionError("connection refused (injected)")


def test_going_offline_does_not_outlive_the_run(mlflow_store, tmp_path, monkeypatch):
    """A sweep's later seeds and its parent keep MLflow's retries after one seed's run went offline."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with tracking.tracked_run("textclf-tiny", "offline-seed", {}, offline_dir=tmp_path / "out"):
        tracking.keep_or_call("metrics", unreachable, metrics={"train/loss": 1.0}, step=1)
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # while offline: fail fast, do not wait
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert [r["op"] for r in offline.pending(tmp_path / "out")] == ["metrics", "end"]


@pytest.mark.slow
def test_a_run_that_lost_its_server_loses_nothing_and_sync_is_safe_to_repeat(mlflow_store, tiny_dataset, tiny_llama,
                                                                             monkeypatch):
    from entrypoints.sync import sync
    from entrypoints.train import train

    server = {"up": True}
    real_call = offline.OfflineRecords.call

    def call(self, op, online, files=None, **payload):
        if not server["up"]:
            online = unreachable
        elif op == "artifacts" and payload.get("artifact_path") == "eval":
            server["up"] = False  # gone once the first confusion matrix is logged
        return real_call(self, op, online, files=files, **payload)

    monkeypatch.setattr(offline.OfflineRecords, "call", call)
    result = CliRunner().invoke(train, ["--data_path", str(tiny_dataset), "--base_model", tiny_llama, "--mode", "lora",
                                        "--learning_rate", "5e-3", "--max_steps", "6", "--eval_steps", "2",
                                        "--logging_steps", "1", "--batch_size", "8", "--max_length", "128",
                                        "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "textclf sync" in result.output
    folder = "outputs/tinysent-lora-seed42"
    journal = offline.pending(folder)
    assert {"metrics", "artifacts", "model", "register", "end"} <= {r["op"] for r in journal}
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = MlflowClient()
    assert not client.search_model_versions("name = 'textclf-tinysent'")  # registration waits for the server
    server["up"] = True

    # A sync that fails right after logging the model, then one that fails right after registering it: each
    # repeat goes on from where the last stopped, logging one model and one version in all.
    real_upload = offline._upload
    for failing_op in ("model", "register"):
        def upload(client_, output_dir, record, results, failing_op=failing_op):
            real_upload(client_, output_dir, record, results)
            if record["op"] == failing_op:
                raise RuntimeError(f"sync stopped after {failing_op} (injected)")

        monkeypatch.setattr(offline, "_upload", upload)
        failed = CliRunner().invoke(sync, [folder])
        assert failed.exit_code != 0 and offline.pending(folder), failed.output
    monkeypatch.setattr(offline, "_upload", real_upload)
    done = CliRunner().invoke(sync, [folder])
    assert done.exit_code == 0, done.output
    assert offline.pending(folder) == []
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(logged) == 1
    versions = client.search_model_versions("name = 'textclf-tinysent'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    metrics = client.get_run(run.info.run_id).data.metrics
    assert "test/accuracy" in metrics and "best/f1_macro" in metrics
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/f1_macro")) == [2, 4, 6]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
