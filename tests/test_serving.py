"""The pyfunc model reads the ``text`` column by name, in process and over REST, and refuses bad input clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import wait_until_answers
from textclf.distributed.zero3 import free_port

TEXTS = ["a wonderful , moving film", "a dull , boring mess that goes on and on", "fine", "great acting"]


@pytest.fixture
def model_uri(mlflow_store, tiny_llama, tmp_path) -> str:
    """A pyfunc model around an untrained tiny classifier: serving behaviour without a training run."""
    import torch

    from textclf import serving
    from textclf.components.model import build_classifier, save_classifier
    from textclf.config import DEFAULT_PROMPT_TEMPLATE, ModelConfig

    torch.manual_seed(0)
    model, tokenizer = build_classifier(ModelConfig(base_model=tiny_llama), "full", ["Negative", "Positive"],
                                        DEFAULT_PROMPT_TEMPLATE, 128)
    save_classifier(model, tokenizer, tmp_path / "classifier")
    with mlflow.start_run():
        return serving.log_model(tmp_path / "classifier", ["Negative", "Positive"], TEXTS)


@pytest.fixture
def pyfunc(model_uri):
    return mlflow.pyfunc.load_model(model_uri)


def test_text_column_is_read_by_name(pyfunc):
    expected = pyfunc.predict(pd.DataFrame({"text": TEXTS}))
    assert len(expected) == len(TEXTS)
    # the language column comes first: a model reading the first column would predict on it
    with_lang = pyfunc.predict(pd.DataFrame({"lang": ["en", "fr", "de", "it"], "text": TEXTS}))
    pd.testing.assert_frame_equal(with_lang, expected)
    with_id = pyfunc.predict(pd.DataFrame({"id": [1, 2, 3, 4], "text": TEXTS}))
    pd.testing.assert_frame_equal(with_id, expected)


def test_lists_and_series_still_work(pyfunc):
    expected = pyfunc.predict(pd.DataFrame({"text": TEXTS}))
    pd.testing.assert_frame_equal(pyfunc.predict(TEXTS), expected)
    pd.testing.assert_frame_equal(pyfunc.predict(pd.Series(TEXTS)), expected)
    pd.testing.assert_frame_equal(pyfunc.predict(pd.Series(TEXTS, name="text")), expected)
    pd.testing.assert_frame_equal(pyfunc.predict(pd.DataFrame(TEXTS)), expected)  # one unnamed column
    assert pyfunc.predict(pd.DataFrame({"text": pd.Series([], dtype=object)})).empty
    big = pyfunc.predict(pd.DataFrame({"text": TEXTS * 10}), params={"batch_size": 3})
    assert big["label"].tolist() == expected["label"].tolist() * 10


def test_a_frame_without_text_is_refused_naming_its_columns(pyfunc):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"no 'text' column \(columns: lang, body\)") as raised:
        pyfunc.predict(pd.DataFrame({"lang": ["en"], "body": ["a gem"]}))
    assert raised.value.get_http_status_code() == 400
    # one named column that is not `text` is not guessed to be the text
    with pytest.raises(MlflowException, match=r"no 'text' column \(columns: lang\)"):
        pyfunc.predict(pd.DataFrame({"lang": ["en"]}))
    with pytest.raises(MlflowException, match="row 1: text must be a string, got null") as raised:
        pyfunc.predict(pd.DataFrame({"text": ["ok", None]}))
    assert raised.value.get_http_status_code() == 400


def test_logged_signature_and_example(model_uri):
    from mlflow.models import Model

    info = Model.load(model_uri)
    assert info.signature.params.to_dict()[0]["name"] == "batch_size"
    assert "label" in info.signature.outputs.input_names()
    example = info.load_input_example(mlflow.artifacts.download_artifacts(model_uri))
    assert isinstance(example, pd.DataFrame) and list(example.columns) == ["text"]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_rest_reads_text_by_name_and_answers_400_on_bad_rows(model_uri, pyfunc, tmp_path):
    from test_mlproject import mlflow_env

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=mlflow_env(mlflow.get_tracking_uri()), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/ping", server, 120, "mlflow models serve")
        expected = pyfunc.predict(pd.DataFrame({"text": TEXTS}))
        status, body = _post(port, {"dataframe_records": [{"id": i, "text": t} for i, t in enumerate(TEXTS)]})
        assert status == 200, body
        assert [row["label"] for row in body["predictions"]] == expected["label"].tolist()
        assert np.allclose([row["score"] for row in body["predictions"]], expected["score"], atol=1e-6)

        status, body = _post(port, {"dataframe_records": [{"id": 1, "text": "ok"}, {"id": 2, "text": None}]})
        assert status == 400, body
        assert "row 1: text must be a string, got null" in body["message"]

        status, body = _post(port, {"dataframe_records": [{"id": 1, "body": "a gem"}]})
        assert status == 400, body
        assert "no 'text' column (columns: id, body)" in body["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_batch_size_below_one_is_refused(pyfunc):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="batch_size must be at least 1, got 0"):
        pyfunc.predict(["a gem"], params={"batch_size": 0})


def test_models_load_where_they_predict_and_a_forced_cpu_copy_stays_on_the_cpu(model_uri, tmp_path, monkeypatch):
    """The device a loaded model predicts on comes from one place (textclf.serving.pyfunc.serving_device): the pyfunc model,
    and `evaluate`/`predict` given a saved folder, go there; a copy loaded with the CPU forced (what the GPU check
    compares the GPU with) stays on the CPU. PyTorch's meta device stands in for the GPU this machine lacks."""
    from textclf.serving.pyfunc import forced_device
    from textclf.serving.sources import load_model_source

    monkeypatch.setenv("TEXTCLF_DEVICE", "meta")
    default = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor
    assert str(default.device) == "meta"
    assert str(next(load_model_source(str(tmp_path / "classifier")).model.parameters()).device) == "meta"
    with forced_device("cpu"):
        forced = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor
    assert str(forced.device) == "cpu"
    assert forced.predict_proba(TEXTS).shape == (len(TEXTS), 2)
    assert str(mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor.device) == "meta"  # restored
