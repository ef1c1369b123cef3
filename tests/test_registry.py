"""Registry and promotion against a real MLflow sqlite store, without training: each version is a
trivial pyfunc model registered by the real ``register_run_model``, so the tags are the real ones."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from entrypoints.promote import promote as promote_cli
from textclf.config import BEST_METRICS, build_config
from textclf.errors import TextclfError
from textclf.records.registry import promote, register_run_model

REPO = Path(__file__).resolve().parent.parent
NAME = "textclf-tinysent"


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture
def add_version(mlflow_store, tmp_path):
    """Register a version from a fresh run; return its version number as a string."""
    data_dir = tmp_path / "tinysent"
    data_dir.mkdir()
    model_uri = {}

    def add(seed: int, metric_for_best: str = "f1_macro", data: dict[str, str] | None = None, **best: float) -> str:
        values = {"accuracy": 0.5, "f1_macro": 0.5, "precision_macro": 0.5, "recall_macro": 0.5, "loss": 0.7,
                  "step": 4, **best}
        config = build_config(mode="lora", data_path=str(data_dir), seed=seed, metric_for_best=metric_for_best)
        with mlflow.start_run() as run:
            if not model_uri:  # one logged model serves every version: logging is the slow part
                model_uri["uri"] = mlflow.pyfunc.log_model(name="model", python_model=Echo(),
                                                           pip_requirements=["mlflow"]).model_uri
        data = data if data is not None else {"dataset_digest": "d1", "validation_digest": "v872",
                                              "validation_rows": "872"}
        return register_run_model(run.info.run_id, model_uri["uri"], config, values,
                                  {"accuracy": 0.9, "f1_macro": 0.9}, data)

    return add


def production_versions(client: MlflowClient) -> list[str]:
    return [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'") if v.current_stage == "Production"]


def test_every_validation_metric_is_tagged(add_version):
    version = add_version(0, metric_for_best="accuracy", accuracy=0.8, loss=0.3)
    tags = MlflowClient().get_model_version(NAME, version).tags
    assert tags["validation_metric"] == "accuracy"
    for metric in BEST_METRICS:
        assert f"validation_{metric}" in tags, metric
    assert float(tags["validation_accuracy"]) == 0.8 and float(tags["validation_loss"]) == 0.3
    assert "validation_step" not in tags


def test_promote_on_loss_picks_the_lowest_loss(add_version):
    add_version(0, loss=0.2)
    add_version(1, loss=0.9)
    add_version(2, loss=0.5)
    result = promote("tinysent", metric="loss")
    assert result.version == "1" and result.value == pytest.approx(0.2)
    assert "next best 0.5000" in result.reason and "among 3 versions" in result.reason
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "1"


def test_a_version_whose_run_did_not_finish_is_never_crowned(add_version):
    client = MlflowClient()

    def end_run_of(version: str, status: str) -> None:
        client.set_terminated(client.get_model_version(NAME, version).tags["run_id"], status)  # the registering run

    killed = add_version(0, f1_macro=0.8)  # killed after registering: its rerun registered the same model again
    rerun = add_version(0, f1_macro=0.8)
    failed = add_version(1, f1_macro=0.9)
    end_run_of(killed, "KILLED")
    end_run_of(failed, "FAILED")
    result = promote("tinysent")
    assert result.version == rerun and "among 1 version " in result.reason
    assert f"left out version {killed} (run KILLED), version {failed} (run FAILED)" in result.reason
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == rerun
    end_run_of(rerun, "KILLED")
    with pytest.raises(TextclfError, match="among the versions of finished runs"):
        promote("tinysent")


def test_promote_on_f1_picks_the_highest_and_ties_go_to_the_oldest(add_version):
    add_version(0, f1_macro=0.6)
    add_version(1, f1_macro=0.8)
    add_version(2, f1_macro=0.8)
    result = promote("tinysent", metric="f1_macro", use_stage=False)
    assert result.version == "2"
    assert "next best 0.8000" in result.reason


def test_a_version_selected_by_accuracy_competes_on_f1(add_version):
    add_version(0, metric_for_best="f1_macro", f1_macro=0.6)
    add_version(1, metric_for_best="accuracy", f1_macro=0.9)
    assert promote("tinysent", metric="f1_macro").version == "2"
    assert promote("tinysent", metric="accuracy").version == "1"  # equal accuracy: the oldest


def test_one_version_grammar(add_version):
    add_version(0)
    assert "among 1 version" in promote("tinysent").reason
    assert "among 1 versions" not in promote("tinysent").reason


def test_unknown_metric_is_refused_in_one_line(mlflow_store):
    result = CliRunner().invoke(promote_cli, ["--dataset", "tinysent", "--metric", "test_f1_macro"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "test_f1_macro" in lines[0]
    assert all(metric in lines[0] for metric in BEST_METRICS)


def test_promote_by_validation_only_and_is_idempotent(add_version):
    client = MlflowClient()
    add_version(0, f1_macro=0.5)
    add_version(42, f1_macro=0.9)
    # The test metric would pick version 1: promotion must never look at it.
    client.set_model_version_tag(NAME, "1", "test_f1_macro", "0.99")
    client.set_model_version_tag(NAME, "2", "test_f1_macro", "0.1")
    first = CliRunner().invoke(promote_cli, ["--dataset", "tinysent"], catch_exceptions=False)
    assert first.exit_code == 0 and "version 2 is now champion" in first.output, first.output
    second = CliRunner().invoke(promote_cli, ["--dataset", "tinysent"], catch_exceptions=False)
    assert second.exit_code == 0 and "version 2 is already champion (nothing changed)" in second.output, second.output
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert production_versions(client) == ["2"]


def test_a_new_best_version_takes_over_and_the_old_one_is_archived(add_version):
    client = MlflowClient()
    add_version(0, f1_macro=0.5)
    assert promote("tinysent").version == "1"
    add_version(1, f1_macro=0.7)
    result = promote("tinysent")
    assert result.version == "2" and result.changed
    assert production_versions(client) == ["2"]
    assert client.get_model_version(NAME, "1").current_stage == "Archived"


def test_an_unparseable_validation_tag_is_reported(add_version):
    client = MlflowClient()
    add_version(0, f1_macro=0.5)
    add_version(1, f1_macro=0.7)
    client.set_model_version_tag(NAME, "2", "validation_f1_macro", "abc")
    with pytest.raises(TextclfError, match=r"version 2 .*validation_f1_macro.*'abc'"):
        promote("tinysent")
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(NAME, "champion")  # nothing was promoted


def test_versions_without_the_tag_are_named_in_the_result(add_version):
    client = MlflowClient()
    add_version(0, f1_macro=0.5)
    add_version(1, f1_macro=0.7)
    client.delete_model_version_tag(NAME, "2", "validation_f1_macro")  # e.g. registered by an older textclf
    result = promote("tinysent")
    assert result.version == "1" and result.skipped == ["2"]
    assert "version 2" in result.reason and "validation_f1_macro" in result.reason


ON_300_ROWS = {"dataset_digest": "d1", "validation_digest": "v300", "validation_rows": "300"}


def test_versions_validated_on_other_rows_are_not_ranked_together(add_version):
    add_version(0, f1_macro=0.8)
    add_version(1, f1_macro=0.95, data=ON_300_ROWS)  # a higher score, on a 300-row sample of validation
    add_version(2, f1_macro=0.85)
    with pytest.raises(TextclfError) as refused:
        promote("tinysent")
    message = str(refused.value)
    assert "validated on different rows" in message and "\n" not in message
    assert "versions 1, 3 on 872 rows (digest v872)" in message and "version 2 on 300 rows (digest v300)" in message
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_model_version_by_alias(NAME, "champion")  # nothing was promoted
    chosen = promote("tinysent", validation_digest="v87")
    assert chosen.version == "3" and "among 2 versions validated on 872 rows (digest v872)" in chosen.reason
    assert promote("tinysent", validation_digest="v300").version == "2"
    cli = CliRunner().invoke(promote_cli, ["--dataset", "tinysent", "--validation_digest", "nope"])
    assert cli.exit_code == 2 and "no group's digest starts with 'nope'" in cli.output


def test_a_version_of_another_dataset_with_the_same_name_is_refused(add_version):
    add_version(0)
    other = {"dataset_digest": "d2", "validation_digest": "v872", "validation_rows": "872"}
    with pytest.raises(TextclfError, match=r"holds versions 1 of dataset d1, and this data is dataset d2"):
        add_version(1, data=other)
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path: Path, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_line_and_exit_2(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    done = subprocess.run([sys.executable, "-m", "entrypoints.promote", "--dataset", "tinysent"],
                          env=_env(tmp_path, uri), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("error: cannot reach the tracking server at"), done.stderr
    assert uri in lines[0] and "Traceback" not in done.stderr


# Without the file lock (as against a tracking server), only the retry keeps promotions safe.
_NO_LOCK = ("import contextlib, textclf.records.registry as r; r._serialized = lambda uri: contextlib.nullcontext(); "
            "from entrypoints.promote import promote; promote()")


@pytest.mark.slow
@pytest.mark.parametrize("locked", [True, False], ids=["file-lock", "retry-only"])
def test_concurrent_promotes_leave_one_champion(add_version, mlflow_store, tmp_path, locked):
    client = MlflowClient()
    add_version(0, f1_macro=0.5)
    add_version(42, f1_macro=0.9)
    add_version(123, f1_macro=0.7)
    env = _env(tmp_path, mlflow_store)
    command = ["-m", "entrypoints.promote"] if locked else ["-c", _NO_LOCK]
    processes = [subprocess.Popen([sys.executable, *command, "--dataset", "tinysent"], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    joined = "\n".join(outputs)
    assert [p.returncode for p in processes] == [0, 0, 0], joined
    assert all("version 2 is " in out for out in outputs), joined
    if locked:  # serialized: exactly one promote changed something, the others found it done
        assert sum("version 2 is now champion" in out for out in outputs) == 1, joined
        assert sum("version 2 is already champion (nothing changed)" in out for out in outputs) == 2, joined
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert production_versions(client) == ["2"]


def test_a_conflicting_write_is_retried_after_rereading(add_version, monkeypatch):
    """Another writer sets the alias between our read and our write: the write fails on the unique key
    (as sqlite does), the promotion re-reads, finds the alias right, and says nothing changed."""
    add_version(0, f1_macro=0.9)
    real = MlflowClient.set_registered_model_alias
    calls = []

    def racing(self, name, alias, version):
        calls.append(version)
        if len(calls) == 1:
            real(self, name, alias, version)  # the other writer wins
            raise mlflow.exceptions.MlflowException("UNIQUE constraint failed: registered_model_aliases")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", racing)
    result = promote("tinysent", use_stage=False)
    assert calls == ["1"] and result.version == "1" and not result.changed
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "1"
