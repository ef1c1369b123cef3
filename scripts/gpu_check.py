#!/usr/bin/env python
"""`make gpu-check`: the prepared check of textclf on a GPU, in one call, on whatever device it finds.

    python scripts/gpu_check.py --output DIR [--budget SECONDS] [--skip lora_torch_compile,padding_free,...]
    python scripts/gpu_check.py --dryrun --output DIR     # CPU, tiny Llama, few steps: < 3 min on 2 cores

What it does, section by section (DIR/gpu_check.json is rewritten after each one, so a call cut short keeps
what it measured; the table printed last summarises it):

- environment: versions and device. On a machine without mlflow (the GPU machine) it first installs the
  wheels `scripts/gpu_wheels.sh` put in gpu-wheels/, into a folder of its own, with pip --no-index.
- model: a random Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
  vocab 128256) and a byte-level BPE trained on SST-2 sentences, written to a temp folder; nothing downloads.
- correctness: `python -m entrypoints.train` in lora (precision auto) and full (bf16) mode, each run FINISHED;
  the pyfunc model on CPU, and on the GPU by moving its model there, gives the same labels;
  `python -m entrypoints.evaluate` on a checkpoint folder; auto resolves to bf16 on CUDA; fp16 trains on CUDA
  and is refused on CPU.
- deepspeed: `python -m entrypoints.train_deepspeed --num_procs 1` (NCCL on GPU, gloo on CPU), run FINISHED,
  consolidated weights written.
- throughput: samples/s, tokens/s and MFU of LoRA and full training at one batch size against the matmul rate
  measured in the same call, counted as `make bench` counts (textclf.recipes.bench.FlopModel); pad-to-512 for the ratio;
  levers measured one at a time: eager attention (against SDPA), the unfused AdamW (against the fused one,
  transformers' default), padding-free batches, torch.compile. Peak GPU memory of each setting.
- memory: full fine-tuning at batch 32, padded to 512 tokens, without and with gradient checkpointing.

Every measurement runs textclf's own code: the entry points as subprocesses, and in-process the Trainer setup of
textclf.recipes.bench (measure_training where no lever is changed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
SST2 = REPO / "data" / "datasets" / "sst2" / "data"
REPORT_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"
EXPERIMENT = "textclf-sst2"

# Llama-3.2-1B's shape (its config.json); the weights are random.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5)
# tests/conftest.py's tiny Llama, with grouped KV heads as in the real shape.
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=None, tie_word_embeddings=False, rms_norm_eps=1e-5)


@dataclasses.dataclass
class Plan:
    """Sizes of one call. The GPU defaults are an estimate (not yet run): 8-12 minutes on an H200, so pass
    --budget (and --skip lora_torch_compile, the slowest lever) to fit a device call."""

    shape: dict[str, Any]
    tokenizer_vocab: int
    tokenizer_rows: int  # SST-2 training sentences the BPE is trained on
    train_steps: int  # steps of each correctness training run
    train_batch: int
    eval_rows: int  # validation, test, pyfunc and evaluate rows
    standardization_rows: int
    bench_batch: int
    bench_steps: int  # timed steps + 1 warm-up step
    compile_warmup: int  # steps before timing starts under torch.compile (its compilations)
    memory_batch: int
    memory_steps: int
    matmul_size: int
    matmul_repeats: int
    subprocess_timeout: int
    default_attention: str = "?"  # what transformers picks for the model, read once it is built
    default_optim: str = "?"  # TrainingArguments' default optimizer in this transformers


def make_plan(dryrun: bool, cuda: bool, args: argparse.Namespace) -> Plan:
    if dryrun:
        plan = Plan(LLAMA_TINY, 600, 2000, train_steps=4, train_batch=4, eval_rows=16, standardization_rows=8,
                    bench_batch=4, bench_steps=3, compile_warmup=2, memory_batch=8, memory_steps=2,
                    matmul_size=2048, matmul_repeats=5, subprocess_timeout=240)
    else:
        plan = Plan(LLAMA_1B, 8000, 100_000, train_steps=24, train_batch=8, eval_rows=32, standardization_rows=16,
                    bench_batch=16, bench_steps=11, compile_warmup=4, memory_batch=32, memory_steps=3,
                    matmul_size=8192 if cuda else 2048, matmul_repeats=20, subprocess_timeout=900)
    for name in ("train_steps", "bench_batch", "bench_steps"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    return plan


# ----------------------------------------------------------------------------------------------------------
# Report, log and section bookkeeping
# ----------------------------------------------------------------------------------------------------------

class Check:
    """The JSON report, rewritten after every section, and a log of every subprocess's output."""

    def __init__(self, output: Path, work: Path, budget: float | None, skip: set[str]):
        self.output, self.work, self.budget, self.skip = output, work, budget, skip
        self.started = time.perf_counter()
        self.report: dict[str, Any] = {"version": 1}
        self.log_path = output / LOG_NAME
        self.env: dict[str, str] = {}

    def say(self, message: str) -> None:
        print(f"[gpu-check {time.perf_counter() - self.started:6.0f}s] {message}", flush=True)

    def write(self) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.started, 1)
        path = self.output / REPORT_NAME
        path.with_suffix(".tmp").write_text(json.dumps(self.report, indent=2, default=str))
        path.with_suffix(".tmp").replace(path)

    def section(self, where: dict[str, Any], name: str, function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one check; its dict (or the failure) lands in ``where[name]`` and the report is written."""
        if name in self.skip:
            where[name] = {"status": "skipped: --skip"}
        elif self.budget is not None and time.perf_counter() - self.started > self.budget:
            where[name] = {"status": f"skipped: time budget of {self.budget:.0f} s spent"}
        else:
            self.say(f"{name} ...")
            started = time.perf_counter()
            try:
                result = function()
                result.setdefault("status", "ok")
            except Exception as exc:  # one failed check must not cost the others their (scarce GPU) time
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
            result["check_seconds"] = round(time.perf_counter() - started, 1)
            where[name] = result
            self.say(f"{name}: {result['status']} ({result['check_seconds']} s)")
        self.write()
        return where[name]

    def run(self, name: str, module: str, *args: str, timeout: int, env: dict[str, str] | None = None) -> dict[str, Any]:
        """``python -m module args`` from the work folder, in its own process group (DeepSpeed's launcher
        starts children: a timeout must stop them too). Its output goes to the log."""
        command = [sys.executable, "-m", module, *args]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=self.work, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            code = "timeout"
        with self.log_path.open("a") as log:
            log.write(f"\n===== {name}: {' '.join(command[1:])} -> {code}\n--- stdout\n{stdout[-100_000:]}\n"
                      f"--- stderr\n{stderr[-200_000:]}\n")
        result = {"command": " ".join(["python", *command[1:]]), "exit_code": code,
                  "process_seconds": round(time.perf_counter() - started, 1), "stdout": stdout, "stderr": stderr}
        return result


def tail(text: str, chars: int = 1500) -> str:
    return text[-chars:]


def finished_run(check: Check, result: dict[str, Any], run_name: str | None = None) -> dict[str, Any]:
    """The MLflow run a subprocess made (by the id it printed, else by run name), with what the report keeps."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if result["exit_code"] != 0:
        raise RuntimeError(f"exit code {result['exit_code']}: {tail(result['stderr'])}")
    match = re.search(r"^run ([0-9a-f]{32})", result["stdout"], re.MULTILINE)
    if match:
        run = client.get_run(match.group(1))
    else:
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                  f"tags.`mlflow.runName` = '{run_name}'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if not runs:
            raise RuntimeError(f"no MLflow run named {run_name}")
        run = runs[0]
    history = client.get_metric_history(run.info.run_id, "train/loss") if "train/loss" in run.data.metrics else []
    return {"run_id": run.info.run_id, "run_status": run.info.status, "command": result["command"],
            "process_seconds": result["process_seconds"],
            "resolved_precision": run.data.params.get("resolved.precision"),
            "train_loss": [round(m.value, 4) for m in sorted(history, key=lambda m: m.step)],
            "metrics": {k: v for k, v in run.data.metrics.items() if k.startswith(("test/", "best/"))},
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}}


def require_finished(summary: dict[str, Any]) -> dict[str, Any]:
    if summary["run_status"] != "FINISHED":
        summary["status"] = "failed"
        summary["error"] = f"run ended {summary['run_status']}"
    return summary


# ----------------------------------------------------------------------------------------------------------
# Environment: carried wheels, versions, device
# ----------------------------------------------------------------------------------------------------------

def ensure_carried_packages(wheels: Path, site: Path) -> dict[str, Any]:
    """Where mlflow is missing (the GPU machine: no registry there), install the wheels that
    scripts/gpu_wheels.sh downloaded, each one whose version is not the one installed, into ``site``,
    which then comes first on sys.path and on every subprocess's PYTHONPATH. Raises RuntimeError
    when there is nothing to install from."""
    from importlib import metadata

    if importlib.util.find_spec("mlflow") is not None:
        return {"installed": [], "note": "mlflow importable: nothing installed"}
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise RuntimeError(f"mlflow is not installed and {wheels} holds no wheels: run scripts/gpu_wheels.sh "
                         "where PyPI can be reached and bring gpu-wheels/ along")
    wanted: dict[str, str] = {}
    for path in found:
        name, version = path.name.split("-")[:2]
        wanted[name] = version
    todo = []
    for name, version in sorted(wanted.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            todo.append(f"{name}=={version}")
    # Names, not files: pip picks the wheel of this Python where gpu-wheels/ holds one per version.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--find-links", str(wheels), "--target", str(site), *todo],
                   check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    notes = []
    try:
        metadata.version("mlflow")
    except metadata.PackageNotFoundError:
        # textclf.serving.pyfunc.pip_requirements asks for the distribution "mlflow"; only mlflow-skinny (same
        # package, fewer dependencies) is carried. A metadata-only record lets the model log; the logged
        # requirement mlflow==<version> is what a serving environment needs anyway.
        version = metadata.version("mlflow-skinny")
        stub = site / f"mlflow-{version}.dist-info"
        stub.mkdir(exist_ok=True)
        (stub / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mlflow\nVersion: {version}\n")
        importlib.invalidate_caches()
        notes.append(f"wrote a metadata-only mlflow-{version}.dist-info: only mlflow-skinny is carried")
    return {"installed": todo, "site": str(site), "notes": notes}


def environment(carried: dict[str, Any], dryrun: bool) -> dict[str, Any]:
    import platform
    from importlib import metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "datasets", "mlflow-skinny", "mlflow",
                 "deepspeed", "pydantic", "sqlalchemy", "protobuf", "pandas", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    device = {"type": "cuda" if cuda else "cpu", "threads": torch.get_num_threads()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                      capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                      bf16_supported=torch.cuda.is_bf16_supported())
    else:
        device["cpu_fast_bf16"] = cpu_fast_bf16()
    return {"dryrun": dryrun, "python": platform.python_version(), "versions": versions, "device": device,
            "carried_wheels": carried, "deepspeed_installed": importlib.util.find_spec("deepspeed") is not None}


def cpu_fast_bf16() -> bool:
    """Read here rather than through textclf: the check compares textclf's choice with this."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------

def build_base_model(folder: Path, plan: Plan) -> dict[str, Any]:
    """A random Llama of ``plan.shape`` and a byte-level BPE trained on SST-2 sentences, saved to ``folder``.

    The 1B shape keeps Llama's vocabulary of 128256 rows although the tokenizer uses fewer: the unused rows
    cost memory and optimizer time as in the real model. Initialised on the GPU when there is one (a
    1.2 B-parameter random init takes a while on a CPU) and saved in bf16 (half the disk); textclf loads fp32.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = (SST2 / "train.json").read_text().splitlines()[: plan.tokenizer_rows]
    texts = [json.loads(line)["text"] for line in rows]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts + ['Please carefully read the following reference text:"", answer: ["Negative", "Positive"]'],
        trainers.BpeTrainer(vocab_size=plan.tokenizer_vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    shape = dict(plan.shape)
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    big = shape["hidden_size"] >= 1024
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16 if big else torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    free_memory()
    return {"folder": str(folder), "shape": shape, "parameters": parameters, "tokenizer_vocab": len(tokenizer),
            "saved_dtype": "bf16" if big else "fp32",
            "attn_implementation_default": default_attention(folder)}


def default_attention(folder: Path) -> str:
    """The attention implementation transformers picks for this model by default (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    return str(model.config._attn_implementation)


def default_optimizer() -> str:
    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        optim = TrainingArguments(output_dir=tmp, use_cpu=True).optim
    return str(getattr(optim, "value", optim))


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Correctness: the entry points as a user runs them
# ----------------------------------------------------------------------------------------------------------

def train_args(check: Check, plan: Plan, model_dir: Path, mode: str, precision: str, run_name: str,
               steps: int) -> list[str]:
    # One evaluation and one checkpoint, at the last step: a 1B full-mode checkpoint with its optimizer is 15 GB.
    return ["--base_model", str(model_dir), "--dataset", "sst2", "--mode", mode, "--precision", precision,
            "--max_samples", str(steps * plan.train_batch), "--max_steps", str(steps), "--eval_steps", str(steps),
            "--save_steps", str(steps), "--logging_steps", str(max(1, steps // 6)), "--batch_size", str(plan.train_batch),
            "--eval_batch_size", "32", "--max_eval_samples", str(plan.eval_rows), "--max_test_samples",
            str(plan.eval_rows), "--standardization_samples", str(plan.standardization_rows), "--max_length", "128",
            "--warmup_ratio", "0.1", "--output_dir", str(check.work / "outputs"), "--run_name", run_name,
            "--register", "false", "--resume", "false"]


def expected_auto_precision() -> str:
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_fast_bf16() else "fp32"


def check_train(check: Check, plan: Plan, model_dir: Path, mode: str, precision: str, steps: int) -> dict[str, Any]:
    run_name = f"gpu-check-{mode}-{precision}"
    result = check.run(run_name, "entrypoints.train", *train_args(check, plan, model_dir, mode, precision, run_name, steps),
                       timeout=plan.subprocess_timeout)
    summary = require_finished(finished_run(check, result, run_name))
    summary["output_dir"] = str(check.work / "outputs" / run_name)
    losses = summary["train_loss"]
    if summary.get("status") != "failed" and (not losses or any(v != v for v in losses)):
        summary.update(status="failed", error=f"train/loss not logged or NaN: {losses}")
    return summary


def check_pyfunc(run_id: str, texts: list[str]) -> dict[str, Any]:
    """Load the logged model as a user does (on the GPU where there is one) and a copy with the CPU forced, and
    compare their predictions. Each copy must have loaded where it was meant to: a "CPU" copy that moved itself
    to the GPU would compare the GPU with itself."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    import torch

    from textclf.serving.pyfunc import forced_device

    uri = f"runs:/{run_id}/model"
    frame = pd.DataFrame({"text": texts})
    started = time.perf_counter()
    with own_textclf(), forced_device("cpu"):
        cpu_model = mlflow.pyfunc.load_model(uri)
    load_seconds = time.perf_counter() - started
    cpu_device = str(cpu_model.unwrap_python_model().predictor.device)
    on_cpu = cpu_model.predict(frame)
    result: dict[str, Any] = {"uri": uri, "rows": len(texts), "load_seconds": round(load_seconds, 1),
                              "cpu_copy_loaded_on": cpu_device, "cpu_labels": on_cpu["label"].value_counts().to_dict()}
    if cpu_device != "cpu":
        result.update(status="failed", error=f"the copy loaded with the CPU forced is on {cpu_device}")
        return result
    if not torch.cuda.is_available():
        result["gpu"] = "skipped: no CUDA"
        return result
    with own_textclf():
        gpu_model = mlflow.pyfunc.load_model(uri)
    result["loaded_on"] = str(gpu_model.unwrap_python_model().predictor.device)
    if not result["loaded_on"].startswith("cuda"):
        result.update(status="failed", error=f"the pyfunc model loaded on {result['loaded_on']} although CUDA is available")
        return result
    on_gpu = gpu_model.predict(frame)
    columns = [c for c in on_cpu.columns if c.startswith("prob_")]
    cpu_probs, gpu_probs = on_cpu[columns].to_numpy(), on_gpu[columns].to_numpy()
    difference = float(np.abs(cpu_probs - gpu_probs).max())
    top2 = np.sort(cpu_probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    disagree = (on_cpu["label"] != on_gpu["label"]).to_numpy()
    # A label may differ only where CPU and GPU round a near tie differently.
    unexplained = int((disagree & (margin > 2 * difference)).sum())
    result["gpu"] = {"labels_equal": float(1 - disagree.mean()), "disagreements": int(disagree.sum()),
                     "max_abs_probability_difference": difference, "unexplained_disagreements": unexplained}
    if unexplained or difference > 1e-2:
        result.update(status="failed", error="CPU and GPU predictions differ")
    del gpu_model
    return result


@contextlib.contextmanager
def own_textclf():
    """Keep this process on the repository's textclf. Loading a pyfunc model puts the copy of textclf logged with
    it (code_paths) first on sys.path and drops the imported textclf modules, so later imports would come from
    that temporary copy, whose REPO_ROOT has no data/ folder."""
    saved_path = list(sys.path)
    saved = {name: module for name, module in sys.modules.items() if name == "textclf" or name.startswith("textclf.")}
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == "textclf" or n.startswith("textclf.")]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path[:] = saved_path


def check_evaluate(check: Check, plan: Plan, output_dir: Path) -> dict[str, Any]:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not checkpoints:
        raise RuntimeError(f"no checkpoint folder in {output_dir}")
    result = check.run("evaluate", "entrypoints.evaluate", "--model_uri", str(checkpoints[-1]), "--data_path", str(SST2),
                       "--max_test_samples", str(plan.eval_rows), timeout=plan.subprocess_timeout)
    summary = require_finished(finished_run(check, result))
    summary["model_uri"] = str(checkpoints[-1])
    return summary


def check_fp16(check: Check, plan: Plan, model_dir: Path) -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        summary = check_train(check, plan, model_dir, "lora", "fp16", max(4, plan.train_steps // 3))
        if summary.get("status") != "failed" and summary["resolved_precision"] != "fp16":
            summary.update(status="failed", error=f"resolved.precision is {summary['resolved_precision']}")
        return summary
    # The refusal comes before anything is loaded: the train command is invoked in this process (as
    # click's test runner does), saving a subprocess's imports.
    from click.testing import CliRunner

    from entrypoints.train import train

    run_name = "gpu-check-lora-fp16"
    result = CliRunner().invoke(train, train_args(check, plan, model_dir, "lora", "fp16", run_name, 2))
    output = result.output.strip()
    refused = result.exit_code == 2 and "fp16 needs a CUDA GPU" in output
    return {"status": "ok" if refused else "failed", "expected": "refused on CPU (no CUDA)",
            "outcome": "refused" if refused else "not refused as expected", "exit_code": result.exit_code,
            "command": "entrypoints.train.train (in process) " + " ".join(train_args(check, plan, model_dir, "lora", "fp16", run_name, 2)),
            "message": output.splitlines()[-1][:300] if output else ""}


def check_deepspeed(check: Check, plan: Plan, model_dir: Path) -> dict[str, Any]:
    import torch

    if importlib.util.find_spec("deepspeed") is None:
        return {"status": "skipped: deepspeed not installed"}
    run_name = "gpu-check-deepspeed"
    args = train_args(check, plan, model_dir, "lora", "auto", run_name, plan.train_steps)
    # NCCL_DEBUG=VERSION: NCCL prints its version once when a process group starts on it (gloo prints nothing).
    result = check.run(run_name, "entrypoints.train_deepspeed", "--num_procs", "1", *args,
                       timeout=plan.subprocess_timeout, env={"NCCL_DEBUG": "VERSION"})
    summary = require_finished(finished_run(check, result, run_name))
    consolidated = check.work / "outputs" / run_name / "consolidated" / "model.safetensors"
    output = result["stdout"] + result["stderr"]
    accelerator = re.search(r"Setting accelerator to (\w+)", output)
    summary.update(consolidated=str(consolidated), consolidated_bytes=consolidated.stat().st_size if consolidated.exists() else 0,
                   backend_expected="nccl" if torch.cuda.is_available() else "gloo",
                   nccl_started="NCCL version" in output, deepspeed_accelerator=accelerator.group(1) if accelerator else None,
                   output_dir=str(consolidated.parent.parent))
    if summary.get("status") != "failed" and not summary["consolidated_bytes"]:
        summary.update(status="failed", error=f"{consolidated} missing")
    return summary


def remove_run_files(check: Check, summary: dict[str, Any]) -> None:
    """A 1B run leaves ~15-25 GB (checkpoint, model folder, and the logged model's copy of it); the GPU machine
    has 64 GB of disk. Removed once its checks are done, unless --keep; the runs stay in mlflow.db."""
    if check.report["environment"].get("keep"):
        return
    import mlflow

    if summary.get("output_dir"):
        shutil.rmtree(summary["output_dir"], ignore_errors=True)
    if not summary.get("run_id"):
        return
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    # MLflow 3 keeps a logged model's files beside the run's, under <experiment>/models/<model id>.
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run.info.run_id}'")
    for location in [run.info.artifact_uri, *(m.artifact_location for m in models)]:
        path = Path(location[len("file://"):] if location.startswith("file://") else location)
        if path.is_absolute() and path.resolve().is_relative_to(check.work.resolve()):
            shutil.rmtree(path, ignore_errors=True)
    summary["files_removed"] = True


# ----------------------------------------------------------------------------------------------------------
# Throughput, MFU and memory: textclf.recipes.bench's Trainer setup, one lever at a time
# ----------------------------------------------------------------------------------------------------------

def oom_error() -> type[BaseException]:
    import torch

    return torch.cuda.OutOfMemoryError  # also defined in CPU builds of torch


def measured(function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one setting with the GPU's peak-memory counter reset; an out-of-memory error is a result."""
    import torch

    cuda = torch.cuda.is_available()
    free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        result = function()
    except oom_error() as exc:
        result = {"status": "out of memory", "error": str(exc).splitlines()[0][:300]}
    free_memory()
    result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else "skipped: no CUDA"
    return result


def bench_setting(plan: Plan, model_dir: Path, tmp: str, mode: str, *, pad_to_512: bool = False,
                  batch: int | None = None, steps: int | None = None, **levers):
    """One training setting of the 1B (or tiny) model on SST-2 rows, its Throughput and what ran."""
    from textclf.recipes.bench import bench_config, measure_training

    batch = batch or plan.bench_batch
    steps = steps or plan.bench_steps
    if levers.get("warmup"):
        steps += levers["warmup"] - 1
    # max_length 512 as in `make bench`: SST-2 prompts are shorter, so only the pad-to-512 setting pads to it.
    config = bench_config(str(model_dir), "sst2", steps * batch, steps, 512, not pad_to_512, tmp, mode)
    config = dataclasses.replace(config, training=dataclasses.replace(config.training, batch_size=batch))
    name = f"{mode}, {'pad to 512, random batches' if pad_to_512 else 'pad per batch, length-grouped'}"
    throughput, _, ran = measure_training(config, pad_to_512, name, **levers)  # without levers: what `make bench` times
    return throughput, ran


def throughput_settings(plan: Plan, cuda: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, mode, options): the baselines first, then one lever each, torch.compile last (it compiles for
    minutes on a 1B model)."""
    compile_backend = "inductor" if cuda else "eager"  # eager on CPU: traces with dynamo, compiles nothing
    return [
        ("lora_pad512", "lora", {"pad_to_512": True}),
        ("lora", "lora", {}),
        ("full", "full", {}),
        ("lora_eager_attention", "lora", {"attention": "eager"}),
        # The other AdamW than the default (fused since transformers 5.x, with torch >= 2.8).
        (("full_adamw_unfused", "full", {"optim": "adamw_torch"}) if plan.default_optim == "adamw_torch_fused" else
         ("full_adamw_fused", "full", {"optim": "adamw_torch_fused"})),
        ("lora_torch_compile", "lora", {"compile_backend": compile_backend, "warmup": plan.compile_warmup}),
    ]


def check_throughput(check: Check, plan: Plan, model_dir: Path) -> dict[str, Any]:
    import torch

    from textclf.components.trainer import resolve_precision
    from textclf.recipes.bench import matmul_peak

    cuda = torch.cuda.is_available()
    section = check.report["throughput"]
    section["precision"] = resolve_precision("auto")
    peak_dtype = "bf16" if cuda else "fp32"
    section["matmul"] = {"dtype": peak_dtype, "size": plan.matmul_size, "repeats": plan.matmul_repeats,
                         "gflops": matmul_peak(peak_dtype, plan.matmul_size, plan.matmul_repeats)}
    free_memory()
    peak = section["matmul"]["gflops"]
    section["batch_size"] = plan.bench_batch
    section["flops"] = "textclf.recipes.bench.FlopModel: per real token 2 x linear weights below the lowest trained layer, " \
                       "4 x frozen and 6 x trained above it, + attention on each row's real length; padding, " \
                       "embeddings, head and recomputation not counted. MFU divides by the matmul rate measured " \
                       "here (the median of section matmul), not a datasheet peak"
    settings = section.setdefault("settings", {})
    with tempfile.TemporaryDirectory(dir=check.work) as tmp:
        for key, mode, options in throughput_settings(plan, cuda):
            if key == "lora_torch_compile":
                check.section(section, "padding_free", lambda: padding_free(plan, model_dir, tmp))
                check.section(check.report["memory"], "gradient_checkpointing",
                              lambda: memory_check(plan, model_dir, tmp))

            def one(mode=mode, options=options):
                result = measured(lambda: summary_of(*bench_setting(plan, model_dir, tmp, mode, **options), peak))
                result.update(mode=mode, batch_size=plan.bench_batch)
                return result

            check.section(settings, key, one)
    base, padded = settings.get("lora", {}), settings.get("lora_pad512", {})
    if "samples_per_second" in base and "samples_per_second" in padded:
        section["lora_vs_pad512"] = base["samples_per_second"] / padded["samples_per_second"]
    for key, lever in (("lora_eager_attention", "lora"), ("full_adamw_unfused", "full"), ("full_adamw_fused", "full"),
                       ("lora_torch_compile", "lora")):
        if "samples_per_second" in settings.get(key, {}) and "samples_per_second" in settings.get(lever, {}):
            settings[key]["vs_baseline"] = settings[key]["samples_per_second"] / settings[lever]["samples_per_second"]
    return {"status": "ok" if all(s.get("status") == "ok" for s in settings.values()) else "failed"}


def summary_of(throughput, ran: dict[str, Any], peak: dict[str, float]) -> dict[str, Any]:
    result = throughput.summary(peak)
    result.update(ran)
    if throughput.steps <= 0 or throughput.seconds <= 0:
        result.update(status="failed", error="no timed step")
    return result


def padding_free(plan: Plan, model_dir: Path, tmp: str) -> dict[str, Any]:
    """Padded batches against the same rows flattened into one row with position_ids
    (transformers.DataCollatorWithFlattening), LoRA, forward + backward + AdamW step.

    A throughput measurement of the backbone with textclf's head on top, in a plain loop rather than the
    Trainer: TextClassifier pools the last real token through the attention mask, and a flattened batch
    has none, so textclf cannot train on it as it is. Here the last token of each sequence is taken at
    the flattened sequence ends. transformers turns position_ids into a block-diagonal mask for
    SDPA/eager (flash-attention kernels, which skip the masked work, are not installed), so attention
    still spans the whole row; the saving is in the linear layers, which see no padding. First, in
    fp32 and without dropout, the pooled features of both layouts must agree.
    """
    import torch
    from transformers import DataCollatorWithFlattening

    from textclf.components.encoding import batches_by_length, pad_batch
    from textclf.components.trainer import prepare, resolve_precision
    from textclf.recipes.bench import FlopModel, bench_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    batch, steps = plan.bench_batch, plan.bench_steps
    config = bench_config(str(model_dir), "sst2", steps * batch, steps, 512, True, tmp, "lora")
    precision = resolve_precision(config.training.precision)
    prepared = prepare(config)  # config.mode is lora
    splits, model, tokenizer, encoded = prepared.splits, prepared.model, prepared.tokenizer, prepared.train_encoded
    model.to(device)
    labels = torch.tensor(splits.train["label"].tolist())
    groups = batches_by_length(encoded.lengths, batch)[:steps]
    flatten = DataCollatorWithFlattening(return_position_ids=True)
    flop_model = FlopModel.of(model)

    def padded(indices):
        b = pad_batch(tokenizer, [encoded.input_ids[i] for i in indices])
        return {k: v.to(device) for k, v in b.items()}

    def packed(indices):
        b = flatten([{"input_ids": encoded.input_ids[i]} for i in indices])
        ends = torch.tensor([len(encoded.input_ids[i]) for i in indices]).cumsum(0) - 1
        return {"input_ids": b["input_ids"].to(device), "position_ids": b["position_ids"].to(device), "ends": ends.to(device)}

    def features(layout: str, batch_inputs):
        if layout == "padded":
            hidden = model.backbone(input_ids=batch_inputs["input_ids"], attention_mask=batch_inputs["attention_mask"],
                                    use_cache=False).last_hidden_state
            return model.pooled(hidden, batch_inputs["attention_mask"])
        # use_cache=False: transformers only reads packed sequences from position_ids when there is no cache.
        hidden = model.backbone(input_ids=batch_inputs["input_ids"], position_ids=batch_inputs["position_ids"],
                                use_cache=False).last_hidden_state
        return hidden[0, batch_inputs["ends"]].to(model.head[-1].weight.dtype)

    model.eval()
    with torch.no_grad():
        first = groups[0]
        a, b = features("padded", padded(first)), features("packed", packed(first))
        agreement = float((a - b).abs().max() / a.abs().max().clamp(min=1e-6))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
    results = {"precision": precision, "batch_size": batch, "timed_steps": steps - 1,
               "attn_implementation": str(model.config._attn_implementation),
               "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32 in the check
               "pooled_features_max_relative_difference": agreement, "layouts_agree": agreement < 1e-3}
    real = sum(encoded.lengths[i] for g in groups[1:] for i in g)
    padded_tokens = sum(len(g) * max(encoded.lengths[i] for i in g) for g in groups[1:])
    # The same rows in both layouts: the same useful FLOPs, counted as for the padded batches.
    flops = sum(flop_model.training_flops(sum(encoded.lengths[i] for i in g), sum(encoded.lengths[i] ** 2 for i in g))
                for g in groups[1:])
    for layout, make in (("padded", padded), ("packed", packed)):
        def run(layout=layout, make=make):
            seconds = 0.0
            for step, indices in enumerate(groups):
                inputs = make(indices)
                synchronize()
                started = time.perf_counter()
                with autocast:
                    logits = model.head(features(layout, inputs))
                loss = torch.nn.functional.cross_entropy(logits.float(), labels[indices].to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize()
                if step:  # the first step is the warm-up
                    seconds += time.perf_counter() - started
            rows = sum(len(g) for g in groups[1:])
            return {"seconds": seconds, "samples_per_second": rows / seconds, "tokens_per_second": real / seconds,
                    "padded_tokens": padded_tokens if layout == "padded" else real, "real_tokens": real,
                    "gflops": flops / seconds / 1e9}
        results[layout] = measured(run)
    results["packed_vs_padded"] = results["packed"]["samples_per_second"] / results["padded"]["samples_per_second"]
    if not results["layouts_agree"]:
        results.update(status="failed", error="padded and flattened batches give different pooled features")
    return results


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_check(plan: Plan, model_dir: Path, tmp: str) -> dict[str, Any]:
    """Full fine-tuning at batch 32 (8 in the dryrun), every row padded to 512 tokens, without then with
    gradient checkpointing. On an H200 (141 GB) the 1B shape may fit either way: the peaks say by how much."""
    import torch

    peak = {"median": float("nan"), "best": float("nan")}  # memory only; MFU is measured above
    results: dict[str, Any] = {"mode": "full", "batch_size": plan.memory_batch, "sequence_length": 512,
                               "gpu_memory_gib": check_gpu_memory()}
    for key, enabled in (("without", False), ("with", True)):
        def run(enabled=enabled):
            throughput, ran = bench_setting(plan, model_dir, tmp, "full", pad_to_512=True, batch=plan.memory_batch,
                                            steps=plan.memory_steps, gradient_checkpointing=enabled)
            out = summary_of(throughput, ran, peak)
            out.pop("mfu"), out.pop("mfu_vs_best_matmul")
            out.setdefault("status", "ok")
            return out
        results[f"{key}_gradient_checkpointing"] = measured(run)
    fits = {k: results[f"{k}_gradient_checkpointing"].get("status") == "ok" for k in ("without", "with")}
    results["fits"] = fits
    if not torch.cuda.is_available():
        results["note"] = "peak memory skipped: no CUDA; both settings ran to exercise the code"
    if not fits["with"]:
        results.update(status="failed", error=f"full fine-tuning at batch {plan.memory_batch} does not fit even with "
                                              "gradient checkpointing")
    return results


def check_gpu_memory() -> float | str:
    import torch

    return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else "no CUDA"


# ----------------------------------------------------------------------------------------------------------
# The table printed last
# ----------------------------------------------------------------------------------------------------------

def table(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    device = env.get("device", {})
    lines = [f"gpu-check on {device.get('name', device.get('type', '?'))}{' (dryrun)' if env.get('dryrun') else ''}, "
             f"{report.get('seconds', 0):.0f} s", "", "| check | status | detail |", "| --- | --- | --- |"]
    checks = {**report.get("correctness", {}), "deepspeed_zero3": report.get("deepspeed", {}).get("zero3", {})}
    for name, item in checks.items():
        if item.get("status") == "failed":
            detail = item.get("error", "")[:100]
        elif "run_status" in item:
            detail = f"{item['run_status']}, {item.get('process_seconds')} s"
            if item.get("resolved_precision"):
                detail += f", precision {item['resolved_precision']}"
            if "consolidated_bytes" in item:
                detail += f", consolidated {item['consolidated_bytes'] / 2**20:.0f} MiB"
        elif name == "pyfunc":
            gpu = item.get("gpu")
            detail = (f"CPU copy on {item.get('cpu_copy_loaded_on')}, default copy on {item.get('loaded_on', '-')}; "
                      "GPU: ") + (gpu if isinstance(gpu, str) else
                                                                     f"labels equal {gpu.get('labels_equal') if gpu else '?'}")
        elif name == "precision_auto":
            detail = f"auto -> {item.get('resolved')} (expected {item.get('expected')})"
        else:
            detail = item.get("outcome", "")
        lines.append(f"| {name} | {item.get('status', '?')} | {detail} |")
    tp = report.get("throughput", {})
    matmul = tp.get("matmul", {})
    if matmul:
        lines += ["", f"matmul {matmul['dtype']} {matmul['size']}^3: median {matmul['gflops']['median']:.0f} GFLOP/s, "
                      f"best {matmul['gflops']['best']:.0f}; training precision {tp.get('precision')}, "
                      f"batch {tp.get('batch_size')}"]
    lines += ["", "| setting | status | samples/s | tokens/s | padding | MFU | peak GiB | vs baseline |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, s in tp.get("settings", {}).items():
        if "samples_per_second" not in s:
            lines.append(f"| {key} | {s.get('status')} | | | | | | |")
            continue
        ratio = f"{s['vs_baseline']:.2f}x" if "vs_baseline" in s else ""
        lines.append(f"| {key} | {s.get('status')} | {s['samples_per_second']:.1f} | {s['tokens_per_second']:.0f} | "
                     f"{s['padding_fraction']:.0%} | {s['mfu']:.0%} | {_gib(s.get('peak_memory_gib'))} | {ratio} |")
    if "lora_vs_pad512" in tp:
        lines.append(f"\nLoRA, pad per batch vs pad to 512: {tp['lora_vs_pad512']:.1f}x")
    free = tp.get("padding_free", {})
    if "packed_vs_padded" in free:
        lines.append(f"padding-free (own loop, {free['attn_implementation']}): {free['packed_vs_padded']:.2f}x the padded "
                     f"batches; layouts agree: {free['layouts_agree']}")
    elif free:
        lines.append(f"padding-free: {free.get('status')} {free.get('error', '')[:100]}")
    memory = report.get("memory", {}).get("gradient_checkpointing", {})
    if "fits" in memory:
        parts = [f"{k}: {memory[f'{k}_gradient_checkpointing'].get('status')} "
                 f"({_gib(memory[f'{k}_gradient_checkpointing'].get('peak_memory_gib'))} GiB)" for k in ("without", "with")]
        lines.append(f"full FT, batch {memory['batch_size']} x 512 tokens, gradient checkpointing " + "; ".join(parts))
    elif memory:
        lines.append(f"gradient checkpointing: {memory.get('status')} {memory.get('error', '')[:100]}")
    failed = report.get("summary", {}).get("failed", [])
    lines.append("\n" + ("all checks passed" if not failed else "FAILED: " + ", ".join(failed)))
    return "\n".join(lines)


def _gib(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


def failures(report: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key, value in report.items():
        if isinstance(value, dict):
            if value.get("status") == "failed":
                found.append(f"{prefix}{key}")
            found += failures(value, f"{prefix}{key}.")
    return found


# ----------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.environ.get("GPU_CHECK_OUTPUT", "gpu-check-results"),
                        help="folder for gpu_check.json, gpu_check.log and mlflow.db (default $GPU_CHECK_OUTPUT)")
    parser.add_argument("--dryrun", action="store_true", help="tiny Llama, few steps, CPU")
    parser.add_argument("--workdir", default=None, help="models, checkpoints and artifacts (default: a temp folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and every run's files")
    parser.add_argument("--wheels", default=str(REPO / "gpu-wheels"), help="wheels to install where mlflow is missing")
    parser.add_argument("--budget", type=float, default=None, help="seconds: sections not started by then are skipped")
    parser.add_argument("--skip", default="", help="comma-separated section names (train_full, fp16, evaluate, zero3, "
                        "padding_free, gradient_checkpointing, lora_torch_compile, ...)")
    parser.add_argument("--train_steps", type=int, default=None)
    parser.add_argument("--bench_batch", type=int, default=None)
    parser.add_argument("--bench_steps", type=int, default=None)
    args = parser.parse_args()

    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    for name in (REPORT_NAME, LOG_NAME, "mlflow.db"):
        (output / name).unlink(missing_ok=True)
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(output, work, args.budget, {s.strip() for s in args.skip.split(",") if s.strip()})
    try:
        run_checks(check, args)
    except Exception as exc:  # the report and the table still come out
        check.report["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        os.chdir(REPO)
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    failed = failures(check.report) + (["error"] if "error" in check.report else [])
    check.report["summary"] = {"failed": failed, "ok": not failed}
    check.write()
    print(table(check.report), flush=True)
    print(f"report: {output / REPORT_NAME}", flush=True)
    return 0 if not failed else 1


def run_checks(check: Check, args: argparse.Namespace) -> None:
    """Every section, most important first: under --budget, what is left out is the end."""
    carried = ensure_carried_packages(Path(args.wheels), check.work / "site")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tracking_uri = f"sqlite:///{check.output / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(key, None)
    check.env = {**os.environ, "PYTHONPATH": os.pathsep.join([*filter(None, [os.environ.get("PYTHONPATH")]), str(REPO)])}
    sys.path.insert(0, str(REPO))

    import torch

    plan = make_plan(args.dryrun, torch.cuda.is_available(), args)
    report = check.report
    report["environment"] = {**environment(carried, args.dryrun), "tracking_uri": tracking_uri, "work": str(check.work),
                             "keep": args.keep, "plan": dataclasses.asdict(plan)}
    report.update(model={}, correctness={}, deepspeed={}, throughput={}, memory={})
    model_dir = check.work / "base-model"
    if check.section(report, "model", lambda: build_base_model(model_dir, plan)).get("status") != "ok":
        raise RuntimeError("the model could not be built: nothing else can run")
    plan.default_attention = report["model"]["attn_implementation_default"]
    plan.default_optim = default_optimizer()
    report["environment"]["plan"] = dataclasses.asdict(plan)
    os.chdir(check.work)  # MLflow's default artifact root (./mlruns) goes to the work folder, not the output
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    correctness = report["correctness"]
    lora = check.section(correctness, "train_lora",
                         lambda: check_train(check, plan, model_dir, "lora", "auto", plan.train_steps))
    if lora.get("run_id"):
        rows = [json.loads(line) for line in (SST2 / "dev.json").read_text().splitlines()[: plan.eval_rows]]
        check.section(correctness, "pyfunc", lambda: check_pyfunc(lora["run_id"], [row["text"] for row in rows]))
        check.section(correctness, "evaluate", lambda: check_evaluate(check, plan, Path(lora["output_dir"])))
        expected = expected_auto_precision()
        correctness["precision_auto"] = {"resolved": lora["resolved_precision"], "expected": expected,
                                         "status": "ok" if lora["resolved_precision"] == expected else "failed"}
        remove_run_files(check, lora)
    else:
        for name in ("pyfunc", "evaluate", "precision_auto"):
            correctness[name] = {"status": "failed", "error": "train_lora made no run"}
    remove_run_files(check, check.section(correctness, "train_full",
                                          lambda: check_train(check, plan, model_dir, "full", "bf16", plan.train_steps)))
    remove_run_files(check, check.section(correctness, "fp16", lambda: check_fp16(check, plan, model_dir)))
    remove_run_files(check, check.section(report["deepspeed"], "zero3", lambda: check_deepspeed(check, plan, model_dir)))
    check.section(report["throughput"], "measurements", lambda: check_throughput(check, plan, model_dir))


if __name__ == "__main__":
    sys.exit(main())
