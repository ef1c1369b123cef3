"""The pyfunc model: raw text in, label, label id, score and one probability per class out."""

from __future__ import annotations

from typing import Any, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd

from textclf.errors import TextclfError

DEFAULT_BATCH_SIZE = 32


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

    Raises TextclfError on a missing column, nulls or non-strings, naming the first bad row.
    """
    if isinstance(model_input, pd.DataFrame):
        if "text" not in model_input.columns:
            if len(model_input.columns) == 1 and len(model_input):
                column = model_input.columns[0]
            else:
                raise TextclfError(f"input has no 'text' column (columns: {', '.join(map(str, model_input.columns))})")
        else:
            column = "text"
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
            kind = "null" if value is None or (isinstance(value, float) and np.isnan(value)) else type(value).__name__
            raise TextclfError(f"row {row}: text must be a string, got {kind}")
    return values


class TextClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the saved model folder from the ``model_dir`` artifact; predicts in length-sorted batches."""

    def load_context(self, context) -> None:
        from textclf.inference import Predictor
        from textclf.model import load_classifier

        model, tokenizer = load_classifier(context.artifacts["model_dir"])
        self.predictor = Predictor(model, tokenizer, batch_size=DEFAULT_BATCH_SIZE)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        texts = texts_from_input(model_input)
        batch_size = int((params or {}).get("batch_size", self.predictor.batch_size))
        self.predictor.batch_size = batch_size
        label_names = self.predictor.spec.label_names
        if not texts:
            return output_frame(np.zeros((0, len(label_names))), label_names)
        return output_frame(self.predictor.predict_proba(texts), label_names)
