"""Temperature scaling (Guo et al., 2017): one scalar T that divides every logit, fitted on validation.

Dividing a row's logits by the same T > 0 keeps their order, so labels never change; only the scores
do. The fitted T is stored in the model's spec (``spec.extra["temperature"]``) and applied by
:class:`textclf.serving.inference.Predictor`. Calibration is measured by the expected calibration error (ECE)
over 15 equal-width bins of the top probability, and drawn as a reliability diagram.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

TEMPERATURE_KEY = "temperature"  # in ClassifierSpec.extra; a spec without it means T = 1
ECE_BINS = 15
# T is searched in [1/100, 100]: a validation set the model gets at chance level pushes the optimum to
# T -> infinity (uniform scores), and a nearly separable one towards T -> 0; the bounds keep both
# finite, and a fit that lands on one is reported.
TEMPERATURE_BOUNDS = (1e-2, 1e2)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, in the logits' dtype (numerically stable)."""
    scaled = np.asarray(logits) / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True) if scaled.size else scaled
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``labels`` under softmax(logits / temperature), in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The T > 0 that minimizes the mean NLL of ``labels`` under softmax(logits / T).

    Bounded Brent search on log T rather than LBFGS or a grid: the problem has one variable, the NLL
    is convex in 1/T (so it has one minimum along log T), Brent finds it to 1e-5 in about 30
    evaluations, and unlike LBFGS it stays inside TEMPERATURE_BOUNDS when the optimum is at infinity.
    Returns 1.0 for no rows, and for rows all predicted right: their NLL keeps falling as T -> 0, and
    scores sharpened without limit would make the first mistake on new data infinitely sure.
    Raises ValueError on a label outside the logits' columns.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")
    if np.all(logits.argmax(axis=1) == labels):
        log.warning("every one of the %d validation rows is predicted right: the temperature has no optimum "
                    "(T -> 0); scores are left uncalibrated (T = 1)", len(labels))
        return 1.0
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    found = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    temperature = math.exp(found.x)
    if min(found.x - low, high - found.x) < 1e-3:
        log.warning("fitted temperature %.4g is at the edge of %s: the validation set does not bound it "
                    "(all right, or at chance level)", temperature, TEMPERATURE_BOUNDS)
    return temperature


def reliability(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS):
    """Per bin of top probability, (0, 1/bins], ..., the bin's mean confidence, accuracy and row count."""
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels)
    confidence = probabilities.max(axis=1) if len(probabilities) else np.zeros(0)
    correct = (probabilities.argmax(axis=1) == labels) if len(probabilities) else np.zeros(0, dtype=bool)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=bins) / counts
    return mean_confidence, accuracy, counts


def expected_calibration_error(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """ECE: the row-weighted mean over bins of |accuracy - mean confidence| (0 for no rows)."""
    mean_confidence, accuracy, counts = reliability(probabilities, labels, bins)
    if counts.sum() == 0:
        return 0.0
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(accuracy[filled] - mean_confidence[filled])) / counts.sum())


@dataclass(frozen=True)
class Calibration:
    temperature: float
    ece_before: float  # on the data it was fitted on
    ece_after: float


def calibrate(logits: np.ndarray, labels: Sequence[int]) -> Calibration:
    """Fit the temperature on ``logits``/``labels`` and measure the ECE there before and after."""
    temperature = fit_temperature(logits, labels)
    return Calibration(temperature, expected_calibration_error(softmax(logits), labels),
                       expected_calibration_error(softmax(logits, temperature), labels))


def write_reliability_diagram(path: Path, labels: Sequence[int], curves: Mapping[str, np.ndarray],
                              bins: int = ECE_BINS) -> Path:
    """Accuracy against confidence per bin, one line per named probability matrix, the diagonal for
    reference, and each curve's ECE in the legend. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # headless: figures are written to files only
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for name, probabilities in curves.items():
        mean_confidence, accuracy, counts = reliability(probabilities, labels, bins)
        filled = counts > 0
        ece = expected_calibration_error(probabilities, labels, bins)
        ax.plot(mean_confidence[filled], accuracy[filled], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability ({bins} bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
