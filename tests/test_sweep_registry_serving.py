"""Seeds side by side, promotion of the best validation seed, and predictions by alias, file and REST."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import tracking_store, wait_until_answers, write_tiny_dataset
from entrypoints.predict import predict
from entrypoints.sweep import sweep
from test_mlproject import mlflow_env
from textclf.distributed.zero3 import free_port

TINY = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
        "--precision", "fp32", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--mode", "lora",
        "--learning_rate", "5e-3"]


@pytest.fixture(scope="module")
def swept_store(tmp_path_factory, tiny_llama) -> Path:
    """A store holding one two-seed sweep, made once for the tests of this module, which only read it and promote
    (the same champion each time)."""
    folder = tmp_path_factory.mktemp("swept")
    with tracking_store(folder):
        dataset = write_tiny_dataset(folder)
        result = CliRunner().invoke(sweep, ["--seeds", "0,42", "--data_path", str(dataset), "--base_model", tiny_llama,
                                            *TINY], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def swept(swept_store):
    with tracking_store(swept_store):
        yield MlflowClient()


@pytest.mark.slow
def test_sweep_parent_aggregates_its_children(swept):
    client = swept
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parent = next(r for r in runs if r.data.tags.get("sweep") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "42"]
    assert all(r.info.status == "FINISHED" for r in children + [parent])
    for metric in ("best/f1_macro", "test/accuracy"):
        values = np.array([r.data.metrics[metric] for r in children])
        name = metric.replace("/", "_")
        assert parent.data.metrics[f"sweep/{name}_mean"] == pytest.approx(values.mean())
        assert parent.data.metrics[f"sweep/{name}_std"] == pytest.approx(values.std(ddof=1))
        assert parent.data.metrics[f"sweep/{name}_max"] == pytest.approx(values.max())
    paths = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/seeds.json", "sweep/validation_curves.png"} <= paths


@pytest.mark.slow
def test_a_failing_seed_is_reported_and_the_rest_aggregated(mlflow_store, tiny_dataset, tiny_llama, monkeypatch):
    import textclf.recipes.sweep as sweep_module

    real = sweep_module.run_training

    def flaky(config, **kwargs):
        if config.seed == 13:
            raise RuntimeError("seed 13 is unlucky")
        return real(config, **kwargs)

    monkeypatch.setattr(sweep_module, "run_training", flaky)
    result = CliRunner().invoke(sweep, ["--seeds", "13,42", "--data_path", str(tiny_dataset), "--base_model", tiny_llama,
                                        "--register", "false", *TINY])
    assert result.exit_code == 0, result.output
    parent = next(r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                  if r.data.tags.get("sweep") == "parent")
    assert parent.data.tags["failed_seeds"] == "13"
    assert parent.data.metrics["sweep/test_accuracy_std"] == 0.0  # one seed left


@pytest.mark.slow
def test_pyfunc_by_alias_and_bad_inputs(swept):
    from textclf.records.registry import promote as promote_best

    chosen = promote_best("tinysent", use_stage=False)
    model = mlflow.pyfunc.load_model("models:/textclf-tinysent@champion")
    by_run = mlflow.pyfunc.load_model(f"runs:/{chosen.run_id}/model")
    texts = ["a wonderful , moving film", "a dull , boring mess"]
    a = model.predict(pd.DataFrame({"text": texts}))
    pd.testing.assert_frame_equal(a, by_run.predict(pd.DataFrame({"text": texts})))
    pd.testing.assert_frame_equal(a, model.predict(texts))
    pd.testing.assert_frame_equal(a, model.predict(pd.Series(texts)))
    assert model.predict(pd.DataFrame({"text": pd.Series([], dtype=object)})).empty
    big = model.predict(pd.DataFrame({"text": texts * 40}), params={"batch_size": 7})
    assert len(big) == 80 and big["label"].tolist() == a["label"].tolist() * 40
    from textclf.serving.pyfunc import TextClassifierPyfunc

    python_model = model.unwrap_python_model()
    with pytest.raises(Exception, match="row 1: text must be a string, got null"):
        python_model.predict(None, pd.DataFrame({"text": ["ok", None]}))
    with pytest.raises(Exception, match="row 0: text must be a string, got int"):
        python_model.predict(None, [5])
    with pytest.raises(Exception, match="no 'text' column"):
        python_model.predict(None, pd.DataFrame({"a": ["x"], "b": ["y"]}))
    assert isinstance(python_model, TextClassifierPyfunc)


@pytest.mark.slow
def test_predict_files(swept, tmp_path):
    from textclf.records.registry import promote as promote_best

    promote_best("tinysent", use_stage=False)
    source = tmp_path / "reviews.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(["a gem", "a mess", "fine"])))
    for suffix in (".jsonl", ".csv", ".parquet"):
        target = tmp_path / f"predictions{suffix}"
        result = CliRunner().invoke(predict, ["--model", "models:/textclf-tinysent@champion", "--input", str(source),
                                              "--output", str(target)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        frame = pd.read_json(target, lines=True) if suffix == ".jsonl" else (
            pd.read_csv(target) if suffix == ".csv" else pd.read_parquet(target))
        assert frame["id"].tolist() == [0, 1, 2]
        assert {"label", "label_id", "score", "prob_0", "prob_1"} <= set(frame.columns)
    missing = CliRunner().invoke(predict, ["--model", "models:/textclf-tinysent@champion", "--input",
                                           str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "x.jsonl")])
    assert missing.exit_code == 2 and "input file does not exist" in missing.output


@pytest.mark.slow
def test_rest_serving_answers_like_pyfunc(swept, tmp_path):
    from textclf.records.registry import promote as promote_best

    promote_best("tinysent", use_stage=False)
    port = free_port()
    env = mlflow_env(mlflow.get_tracking_uri())
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/textclf-tinysent@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/ping", server, 120, "mlflow models serve")
        texts = ["a wonderful , moving film", "a dull , boring mess"]
        body = json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        expected = mlflow.pyfunc.load_model("models:/textclf-tinysent@champion").predict(pd.DataFrame({"text": texts}))
        assert [row["label"] for row in answer] == expected["label"].tolist()
        assert np.allclose([row["score"] for row in answer], expected["score"], atol=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)
