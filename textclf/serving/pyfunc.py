"""The pyfunc model (raw text in; label, label id, score and one probability per class out) and its logging."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from textclf.errors import TextclfError

DEFAULT_BATCH_SIZE = 32
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the textclf package, logged with the model


def output_frame(probabilities: np.ndarray, label_names: Sequence[str]) -> pd.DataFrame:
    """Columns ``label``, ``label_id``, ``score`` and ``prob_<class>`` for each class, one row per text."""
    ids = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=np.int64)
    frame = pd.DataFrame({
        "label": pd.Series([label_names[i] for i in ids], dtype=object),
        "label_id": ids.astype(np.int64),
        "score": probabilities.max(axis=1).astype(np.float64) if len(probabilities) else np.zeros(0),
    })
    for i, name in enumerate(label_names):
        frame[f"prob_{name}"] = probabilities[:, i].astype(np.float64) if len(probabilities) else np.zeros(0)
    return frame


def texts_from_input(model_input: Any) -> list[str]:
    """Accept a DataFrame with a ``text`` column, a Series, or a list of strings.

    A DataFrame's ``text`` column is read by name and its other columns (ids, metadata) are ignored.
    A frame with one column that has no name (a list or an unnamed Series turned into a frame, a
    ``dataframe_split`` without ``columns``) is taken as the texts; a named column other than
    ``text`` is never guessed to be the text. Raises TextclfError on a missing column, nulls or
    non-strings, naming the columns found or the first bad row.
    """
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            column = "text"
        elif len(model_input.columns) == 1 and not isinstance(model_input.columns[0], str):
            column = model_input.columns[0]
        else:
            raise TextclfError(f"input has no 'text' column (columns: {', '.join(map(str, model_input.columns))})")
        values = model_input[column].tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        values = list(model_input)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, dict) and "text" in model_input:
        values = list(model_input["text"]) if not isinstance(model_input["text"], str) else [model_input["text"]]
    else:
        raise TextclfError(f"unsupported input type {type(model_input).__name__}: pass a DataFrame with a 'text' column")
    for row, value in enumerate(values):
        if not isinstance(value, str):
            kind = "null" if pd.api.types.is_scalar(value) and pd.isna(value) else type(value).__name__
            raise TextclfError(f"row {row}: text must be a string, got {kind}")
    return values


class TextClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the saved model folder from the ``model_dir`` artifact; predicts in length-sorted batches."""

    # MLflow's switch (the one its ChatModel uses) to leave predict unwrapped: predict validates its input
    # itself (texts_from_input), and the type-hint check would only warn at every import.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from textclf.components.model import load_classifier
        from textclf.serving.inference import Predictor

        model, tokenizer = load_classifier(context.artifacts["model_dir"])
        self.predictor = Predictor(model.to(serving_device()), tokenizer, batch_size=DEFAULT_BATCH_SIZE)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Raises MlflowException (INVALID_PARAMETER_VALUE) on bad input: the scoring server answers it
        with HTTP 400 and the reason as ``message``; any other exception becomes a generic message."""
        try:
            texts = texts_from_input(model_input)
        except TextclfError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        batch_size = int((params or {}).get("batch_size", self.predictor.batch_size))
        if batch_size < 1:
            raise MlflowException(f"batch_size must be at least 1, got {batch_size}", error_code=INVALID_PARAMETER_VALUE)
        self.predictor.batch_size = batch_size
        label_names = self.predictor.spec.label_names
        if not texts:
            return output_frame(np.zeros((0, len(label_names))), label_names)
        return output_frame(self.predictor.predict_proba(texts), label_names)


def log_model(model_dir: Path, label_names: list[str], example_texts: list[str],
              python_model: mlflow.pyfunc.PythonModel | None = None) -> str:
    """Log the saved model folder as the pyfunc model ``model``; return its model URI.

    ``python_model`` (default :class:`TextClassifierPyfunc`) reads the folder from artifact ``model_dir``
    and must give the same output frame; the zero-shot baseline passes its own."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ParamSchema, ParamSpec

    example = pd.DataFrame({"text": example_texts[:3]})
    fake_probs = np.full((len(example), len(label_names)), 1.0 / len(label_names))
    # No input schema: the model checks its input itself (texts_from_input). MLflow 3.17 cannot express
    # "a `text` string column, any other columns ignored, or a list or Series of strings": an unnamed
    # ColSpec keeps only the first column of a frame (so {lang, text} predicted on `lang` and {id, text}
    # failed on the int id); a named required `text` refuses lists and Series; a named optional one
    # drops every other column, so a list arrives as an empty frame. The input example still shows
    # the expected frame, and the params schema is enforced without an input schema.
    signature = ModelSignature(
        inputs=None,
        outputs=infer_signature(example, output_frame(fake_probs, label_names)).outputs,
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]),
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=python_model or TextClassifierPyfunc(),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
    )
    return info.model_uri


def serving_device() -> str:
    """Where a loaded model predicts: the GPU when there is one (TEXTCLF_DEVICE=cpu forces the CPU)."""
    import torch

    return os.environ.get("TEXTCLF_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def forced_device(device: str) -> Iterator[None]:
    """Models loaded inside this block predict on ``device``, whatever :func:`serving_device` would choose."""
    previous = os.environ.get("TEXTCLF_DEVICE")
    os.environ["TEXTCLF_DEVICE"] = device
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TEXTCLF_DEVICE", None)
        else:
            os.environ["TEXTCLF_DEVICE"] = previous


def pip_requirements() -> list[str]:
    """The serving environment, stated rather than inferred (inference loads the model: slow)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "tokenizers", "safetensors", "peft", "pandas", "numpy", "scikit-learn",
             "matplotlib", "pyarrow", "tqdm", "datasets"]
    try:
        tracking = f"mlflow=={version('mlflow')}"
    except PackageNotFoundError:  # a machine with only mlflow-skinny (a GPU box without the full package)
        tracking = f"mlflow-skinny=={version('mlflow-skinny')}"
    return [f"{name}=={version(name)}" for name in names] + [tracking]
