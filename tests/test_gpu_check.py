"""`make gpu-check-dryrun`: the GPU check script, run on CPU with a tiny Llama, writes a complete report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SKIPPED_NO_CUDA = "skipped: no CUDA"


def test_dryrun_runs_every_section_and_reports_it(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dryrun", "--output", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert done.returncode == 0, (report.get("summary"), done.stdout[-3000:], done.stderr[-3000:])
    assert "all checks passed" in done.stdout.splitlines()[-2]  # the table comes last, then the report's path
    assert seconds < 300  # the dryrun's budget is 3 minutes on 2 cores; leave room for a loaded machine
    assert_complete_cpu_report(report)
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "gpu_check.log").exists()


def assert_complete_cpu_report(report: dict) -> None:
    """Every section ran and passed; what needs CUDA says it was skipped for want of it."""
    assert report["summary"] == {"failed": [], "ok": True}
    env_report = report["environment"]
    assert env_report["dryrun"] is True and env_report["device"]["type"] == "cpu"
    assert report["model"]["status"] == "ok" and report["model"]["shape"]["num_hidden_layers"] == 2

    correctness = report["correctness"]
    for name in ("train_lora", "train_full", "evaluate"):
        assert correctness[name]["status"] == "ok", correctness[name]
        assert correctness[name]["run_status"] == "FINISHED"
    assert correctness["train_lora"]["train_loss"] and correctness["train_full"]["resolved_precision"] == "bf16"
    auto = correctness["precision_auto"]
    assert auto["status"] == "ok" and auto["resolved"] == auto["expected"] == correctness["train_lora"]["resolved_precision"]
    assert correctness["pyfunc"]["status"] == "ok" and correctness["pyfunc"]["cpu_copy_loaded_on"] == "cpu"
    assert correctness["pyfunc"]["gpu"] == SKIPPED_NO_CUDA
    fp16 = correctness["fp16"]
    assert fp16["status"] == "ok" and fp16["outcome"] == "refused" and fp16["exit_code"] == 2

    zero3 = report["deepspeed"]["zero3"]
    if env_report["deepspeed_installed"]:
        assert zero3["status"] == "ok" and zero3["run_status"] == "FINISHED", zero3
        assert zero3["consolidated_bytes"] > 0 and zero3["backend_expected"] == "gloo" and zero3["nccl_started"] is False
    else:
        assert zero3["status"] == "skipped: deepspeed not installed"

    throughput = report["throughput"]
    assert throughput["matmul"]["gflops"]["median"] > 0
    settings = throughput["settings"]
    assert {"lora_pad512", "lora", "full", "lora_eager_attention", "lora_torch_compile"} <= set(settings)
    assert {"full_adamw_unfused", "full_adamw_fused"} & set(settings)
    for name, setting in settings.items():
        assert setting["status"] == "ok", (name, setting)
        assert setting["steps"] > 0 and setting["samples_per_second"] > 0 and setting["tokens_per_second"] > 0
        assert setting["mfu"] > 0 and setting["peak_memory_gib"] == SKIPPED_NO_CUDA
    assert settings["lora_eager_attention"]["attn_implementation"] == "eager"
    assert settings["lora"]["attn_implementation"] == "sdpa"
    assert settings["lora_torch_compile"]["torch_compile"] == "eager"
    assert throughput["lora_vs_pad512"] > 0
    free = throughput["padding_free"]
    assert free["status"] == "ok" and free["layouts_agree"] is True
    assert free["padded"]["samples_per_second"] > 0 and free["packed"]["samples_per_second"] > 0
    assert free["packed"]["padded_tokens"] == free["packed"]["real_tokens"] < free["padded"]["padded_tokens"]

    memory = report["memory"]["gradient_checkpointing"]
    assert memory["status"] == "ok" and memory["fits"] == {"without": True, "with": True}
    assert memory["with_gradient_checkpointing"]["gradient_checkpointing"] is True
    assert memory["without_gradient_checkpointing"]["peak_memory_gib"] == SKIPPED_NO_CUDA
