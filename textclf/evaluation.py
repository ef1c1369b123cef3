"""Metrics, classification report, confusion matrix (figure + JSON) and per-example predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support  # noqa: E402

METRIC_NAMES = ("accuracy", "f1_macro", "precision_macro", "recall_macro")


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over all ``num_labels`` classes."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=list(range(num_labels)), average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_macro": float(f1),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
    }


def confusion(labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str]) -> dict:
    """The confusion matrix as JSON-ready data: rows are true labels, columns predictions."""
    matrix = confusion_matrix(labels, predictions, labels=list(range(len(label_names))))
    return {"labels": list(label_names), "matrix": matrix.tolist()}


def write_confusion(data: dict, stem: Path, title: str) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.png``; return both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(data, indent=2))
    names, matrix = data["labels"], np.array(data["matrix"])
    size = max(4.0, 0.7 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [json_path, png_path]


def write_test_artifacts(
    folder: Path, texts: Sequence[str], labels: Sequence[int], probabilities: np.ndarray, label_names: Sequence[str]
) -> dict[str, float]:
    """Score predictions and write the test artifacts into ``folder``; return the metrics.

    Files: confusion_matrix.png/json, classification_report.json, test_results.json,
    test_summary.txt, predictions.parquet (one row per example, in input order).
    """
    folder.mkdir(parents=True, exist_ok=True)
    predictions = probabilities.argmax(axis=1)
    metrics = classification_metrics(labels, predictions, len(label_names))
    write_confusion(confusion(labels, predictions, label_names), folder / "confusion_matrix", "test")
    report = classification_report(
        labels, predictions, labels=list(range(len(label_names))), target_names=list(label_names),
        output_dict=True, zero_division=0,
    )
    (folder / "classification_report.json").write_text(json.dumps(report, indent=2))
    results = {**metrics, "num_examples": len(labels)}
    (folder / "test_results.json").write_text(json.dumps(results, indent=2))
    text_report = classification_report(
        labels, predictions, labels=list(range(len(label_names))), target_names=list(label_names), zero_division=0
    )
    summary = "\n".join(f"{name}: {value:.4f}" for name, value in metrics.items())
    (folder / "test_summary.txt").write_text(f"{len(labels)} test examples\n{summary}\n\n{text_report}")
    frame = pd.DataFrame({
        "text": list(texts),
        "label_id": np.asarray(labels, dtype=np.int64),
        "label": [label_names[i] for i in labels],
        "predicted_id": predictions.astype(np.int64),
        "predicted": [label_names[i] for i in predictions],
        "score": probabilities.max(axis=1),
    })
    frame.to_parquet(folder / "predictions.parquet", index=False)
    return metrics
