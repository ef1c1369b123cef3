"""`make ui-check`: a tiny sweep and baseline served by `mlflow ui`, checked in headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def load_script():
    spec = importlib.util.spec_from_file_location("ui_check", REPO / "scripts" / "ui_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mlflow_ui_shows_our_runs_metrics_and_artifacts(tmp_path):
    ui_check = load_script()
    if not ui_check.ensure_chromium():
        pytest.skip(f"{ui_check.CHROMIUM} is absent and could not be installed (needs root and apt-get: "
                    "`apt-get install chromium`)")
    if not ui_check.ensure_playwright():
        pytest.skip("the playwright Python package is absent and could not be installed (`pip install playwright`)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "ui_check.py"), "--output", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-3000:])
    report = json.loads((tmp_path / "ui_check.json").read_text())
    assert report["passed"] and len(report["checks"]) >= 8
    for name in ("1-runs-list", "2-sweep-parent", "3-child-model-metrics", "4-child-confusion-matrix",
                 "5-child-misclassified", "6-child-system-metrics", "7-child-overview"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
