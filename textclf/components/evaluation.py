"""Metrics, classification report, confusion matrix (figure + JSON), per-class metrics (figure),
per-example predictions and the table of misclassified examples."""

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

from textclf.components.calibration import expected_calibration_error, write_reliability_diagram  # noqa: E402

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


def write_per_class_metrics(labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str],
                            path: Path, title: str) -> Path:
    """A grouped bar chart of precision, recall and F1 per class (with each class's support); returns ``path``."""
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=list(range(len(label_names))), average=None, zero_division=0
    )
    positions = np.arange(len(label_names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(label_names) + 2), 4))
    for offset, (name, values) in zip((-width, 0, width), (("precision", precision), ("recall", recall), ("f1", f1))):
        ax.bar(positions + offset, values, width, label=name)
    ax.set_xticks(positions, [f"{name}\n(n={n})" for name, n in zip(label_names, support)],
                  rotation=45 if len(label_names) > 6 else 0, ha="right" if len(label_names) > 6 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_test_artifacts(
    folder: Path, texts: Sequence[str], labels: Sequence[int], probabilities: np.ndarray, label_names: Sequence[str],
    uncalibrated: np.ndarray | None = None,
) -> dict[str, float]:
    """Score predictions and write the test artifacts into ``folder``; return the metrics.

    Files: confusion_matrix.png/json, classification_report.json, test_results.json,
    test_summary.txt, per_class_metrics.png, reliability_diagram.png, predictions.parquet (one row
    per example, in input order, with ``prob_<class>`` columns). Metrics include ``ece``, the expected
    calibration error of ``probabilities``; given the scores before temperature scaling
    (``uncalibrated``), also ``ece_uncalibrated``, and the diagram shows both.
    """
    folder.mkdir(parents=True, exist_ok=True)
    predictions = probabilities.argmax(axis=1)
    metrics = classification_metrics(labels, predictions, len(label_names))
    metrics["ece"] = expected_calibration_error(probabilities, labels)
    curves = {"model": probabilities}
    if uncalibrated is not None:
        metrics["ece_uncalibrated"] = expected_calibration_error(uncalibrated, labels)
        curves = {"uncalibrated": uncalibrated, "calibrated": probabilities}
    write_confusion(confusion(labels, predictions, label_names), folder / "confusion_matrix", "test")
    write_per_class_metrics(labels, predictions, label_names, folder / "per_class_metrics.png", "test: per class")
    write_reliability_diagram(folder / "reliability_diagram.png", labels, curves)
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
        **{f"prob_{name}": probabilities[:, i] for i, name in enumerate(label_names)},
    })
    frame.to_parquet(folder / "predictions.parquet", index=False)
    return metrics


def misclassified_frame(texts: Sequence[str], labels: Sequence[int], probabilities: np.ndarray,
                        label_names: Sequence[str]) -> pd.DataFrame:
    """The wrongly predicted rows: text, label, predicted, score and ``prob_<class>`` for each class,
    the most confident mistakes first (ties keep input order)."""
    texts, labels = list(texts), np.asarray(labels, dtype=np.int64)
    predictions = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=np.int64)
    wrong = np.flatnonzero(predictions != labels)
    wrong = wrong[np.argsort(-probabilities[wrong].max(axis=1), kind="stable")] if len(wrong) else wrong
    return pd.DataFrame({
        "text": pd.Series([texts[i] for i in wrong], dtype=object),
        "label": pd.Series([label_names[labels[i]] for i in wrong], dtype=object),
        "predicted": pd.Series([label_names[predictions[i]] for i in wrong], dtype=object),
        "score": probabilities[wrong].max(axis=1).astype(np.float64) if len(wrong) else np.zeros(0),
        **{f"prob_{name}": probabilities[wrong, i].astype(np.float64) for i, name in enumerate(label_names)},
    })


def log_misclassified(texts: Sequence[str], labels: Sequence[int], probabilities: np.ndarray,
                      label_names: Sequence[str], artifact_file: str = "test/misclassified.json") -> int:
    """Log the misclassified rows as an MLflow table (the UI shows, sorts and filters it) in the active
    run; return the number of rows. A table already in the run is left as it is: MLflow would append
    to it, and a retried finish must not list each mistake twice."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    folder = artifact_file.rsplit("/", 1)[0] if "/" in artifact_file else None
    frame = misclassified_frame(texts, labels, probabilities, label_names)
    if artifact_file in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}:
        return len(frame)
    mlflow.log_table(frame, artifact_file=artifact_file, run_id=run_id)
    return len(frame)
