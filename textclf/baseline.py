"""Baseline models logged before textclf's modules moved name their pyfunc class ``textclf.baseline.ZeroShotPyfunc``
(MLflow pickles it by reference): it still imports from here. The baseline itself is textclf.recipes.baseline."""

from textclf.recipes.baseline import ZeroShotPyfunc  # noqa: F401
