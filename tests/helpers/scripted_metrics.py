"""Validation scores scripted per evaluation, so a test can decide which step scores best.

Wraps textclf.components.trainer.classification_metrics, the metrics of every evaluation during training (the test
split is scored elsewhere): the n-th call returns the real metrics with ``f1_macro`` replaced by the n-th value,
or raises when that value is "raise"; calls past the script return the real metrics."""

from __future__ import annotations


def scripted_f1(real, values):
    calls = iter(values)

    def classification_metrics(labels, predictions, num_labels):
        metrics = real(labels, predictions, num_labels)
        value = next(calls, None)
        if value == "raise":
            raise RuntimeError("evaluation failed on purpose")
        if value is not None:
            metrics["f1_macro"] = float(value)
        return metrics

    return classification_metrics


def install_from_environment(variable: str = "TEXTCLF_TEST_SCRIPTED_F1") -> None:
    """In a subprocess (a DeepSpeed rank): script the scores listed, comma-separated, in ``variable``."""
    import os

    if os.environ.get(variable):
        import textclf.components.trainer as trainer_setup

        trainer_setup.classification_metrics = scripted_f1(trainer_setup.classification_metrics,
                                                           os.environ[variable].split(","))
