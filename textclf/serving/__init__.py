"""Serving a trained model: the pyfunc model MLflow loads and serves (pyfunc), batched prediction on raw texts
(inference), and what `evaluate` and `predict` can load (sources).

Models logged before these modules moved name their pyfunc class ``textclf.serving.TextClassifierPyfunc`` (MLflow
pickles it by reference): it is exported here so that they still load.
"""

from textclf.serving.pyfunc import TextClassifierPyfunc, forced_device, log_model, serving_device

__all__ = ["TextClassifierPyfunc", "forced_device", "log_model", "serving_device"]
