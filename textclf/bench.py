"""Side-by-side performance measurements behind ``make bench``: the matmul peak, training throughput
against the original project's pad-to-512 setting, model FLOP utilization, and pyfunc prediction
against the bare forward pass. Every ratio compares runs made in the same process, one after the other.

Written by hand: the libraries time nothing side by side. Timing comes from a Trainer callback, so the
Trainer steps measured are the ones ``textclf train`` runs (same arguments, collator and sampler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import DataCollatorWithPadding, TrainerCallback

from textclf.config import RunConfig, build_config
from textclf.data import load_splits
from textclf.encoding import PromptEncoder, batches_by_length, pad_batch
from textclf.model import TextClassifier, base_of
from textclf.trainer_setup import (BatchCounts, ClassifierTrainer, prepare, resolve_precision, training_arguments,
                                   training_collator)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak(precision: str, size: int = 2048, repeats: int = 30) -> dict[str, float]:
    """GFLOP/s of ``repeats`` square matmuls of ``size`` (2 n^3 FLOPs each) in one precision: the best
    and the median. On the 2-core bench VM single 2048^3 matmuls ranged 62-126 GFLOP/s within seconds,
    so the median is the sustained rate a minutes-long training run can be held to."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device).to(DTYPES[precision])
    b = torch.randn(size, size, device=device).to(DTYPES[precision])
    a @ b  # warm-up: thread pool, kernels
    rates = []
    for _ in range(repeats):
        _synchronize()
        started = time.perf_counter()
        a @ b
        _synchronize()
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return {"best": max(rates), "median": statistics.median(rates)}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class FlopModel:
    """Training FLOPs per token of a classifier, from its linear layers and attention shape.

    Per token, a linear layer of N weights costs 2N forward; its backward costs 2N for the input
    gradient plus 2N for the weight gradient when it trains (LoRA, full) and nothing more when frozen.
    Attention scores and values cost 4 * layers * width * sequence_length forward and twice that
    backward. Embeddings are lookups (no FLOPs); the head runs once per sequence (ignored, <0.5%).
    Gradient-checkpointing recomputation is not counted: it is not useful work.
    """

    frozen_linear: int
    trained_linear: int
    layers: int
    attention_width: int

    @classmethod
    def of(cls, model: TextClassifier) -> "FlopModel":
        frozen = trained = 0
        for module in model.backbone.modules():
            if isinstance(module, nn.Linear):
                if module.weight.requires_grad:
                    trained += module.weight.numel()
                else:
                    frozen += module.weight.numel()
        config = base_of(model.backbone).config
        width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(frozen, trained, config.num_hidden_layers, width * config.num_attention_heads)

    def training_flops(self, real_tokens: int, padded_tokens: int, sequence_length: float) -> float:
        """Useful FLOPs: weights on real tokens, attention at the batch's padded length."""
        per_token = 4 * self.frozen_linear + 6 * self.trained_linear
        attention = 12 * self.layers * self.attention_width * sequence_length
        return real_tokens * (per_token + attention)


@dataclass
class Throughput:
    setting: str
    steps: int  # timed steps (the first step of each setting is a warm-up and not timed)
    samples: int
    real_tokens: int
    padded_tokens: int
    seconds: float
    flops: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / max(self.padded_tokens, 1)

    def summary(self, peak: dict[str, float]) -> dict[str, Any]:
        gflops = self.flops / self.seconds / 1e9
        return {**asdict(self), "samples_per_second": self.samples_per_second,
                "tokens_per_second": self.tokens_per_second, "padding_fraction": self.padding_fraction,
                "gflops": gflops, "mfu": gflops / peak["median"], "mfu_vs_best_matmul": gflops / peak["best"]}


class StepTimer(TrainerCallback):
    """Wall time and tokens of every step after the first, read off the Trainer's batch counts."""

    def __init__(self, counts: BatchCounts, flop_model: FlopModel):
        self.counts, self.flop_model = counts, flop_model
        self.last_end: float | None = None
        self.last_counters: dict[str, int] = {}
        self.totals = dict(steps=0, samples=0, real_tokens=0, padded_tokens=0, seconds=0.0, flops=0.0)

    def on_step_end(self, args, state, control, **kwargs):
        now, counters = time.perf_counter(), asdict(self.counts)
        if self.last_end is not None:  # the first step (allocations, optimizer state) is the warm-up
            delta = {k: counters[k] - self.last_counters[k] for k in counters}
            # Batches are padded to a rectangle: padded tokens / rows is the step's sequence length.
            length = delta["padded_tokens"] / max(delta["samples"], 1)
            self.totals["steps"] += 1
            self.totals["seconds"] += now - self.last_end
            self.totals["flops"] += self.flop_model.training_flops(delta["real_tokens"], delta["padded_tokens"], length)
            for key in ("samples", "real_tokens", "padded_tokens"):
                self.totals[key] += delta[key]
        self.last_end, self.last_counters = now, counters


# The settings compared: (name, pad every input to max_length, group batches by length).
TRAINING_SETTINGS = [
    ("pad to 512, random batches (original project)", True, False),
    ("pad per batch, random batches", False, False),
    ("textclf: pad per batch, length-grouped batches", False, True),
]


def bench_config(base_model: str, dataset: str, rows: int, steps: int, max_length: int, group_by_length: bool,
                 output_dir: str, mode: str = "lora") -> RunConfig:
    """The run config of ``textclf train`` with only its length, sampling and step count changed."""
    return build_config(mode, base_model=base_model, dataset=dataset, max_samples=rows, max_steps=steps,
                        max_length=max_length, group_by_length=group_by_length, output_dir=output_dir,
                        logging_steps=10**6, register=False, resume=False)


def measure_training(config: RunConfig, pad_to_max_length: bool, setting: str) -> tuple[Throughput, FlopModel]:
    """Train ``config.training.max_steps`` steps with the Trainer textclf uses; time all but the first."""
    precision = resolve_precision(config.training.precision)
    prepared = prepare(config)
    model, tokenizer = prepared.model, prepared.tokenizer
    if pad_to_max_length:
        collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=config.data.max_length)
    else:
        collator = training_collator(tokenizer)
    flop_model = FlopModel.of(model)
    counts = BatchCounts()
    timer = StepTimer(counts, flop_model)
    with tempfile.TemporaryDirectory() as tmp:
        # textclf's arguments without evaluation and checkpoints, which are not what is timed here.
        args = dataclasses.replace(training_arguments(config, Path(tmp), precision), eval_strategy="no",
                                   save_strategy="no", load_best_model_at_end=False)
        trainer = ClassifierTrainer(model=model, args=args, train_dataset=prepared.train_set, data_collator=collator,
                                    callbacks=[timer], head_learning_rate=config.training.head_learning_rate,
                                    batch_counts=counts)
        trainer.train()
    return Throughput(setting=setting, **timer.totals), flop_model


def measure_prediction(model_dir: Path, model_uri: str, texts: list[str], batch_size: int,
                       repeats: int = 2) -> dict[str, float]:
    """Samples/s of the logged pyfunc model on ``texts`` and of the bare forward pass of the same saved
    model on the same length-sorted, pre-tokenized batches (what the pyfunc adds: input checks,
    tokenization, padding, softmax, the output frame). Passes alternate and the best of ``repeats``
    counts for each, so neither side alone pays the warm-up or a noisy moment."""
    import mlflow.pyfunc
    import pandas as pd

    from textclf.model import load_classifier

    model, tokenizer = load_classifier(model_dir)
    encoder = PromptEncoder(tokenizer, model.spec.prompt_template, model.spec.label_names, model.spec.max_length)
    encoded = encoder.encode(texts)
    batches = [pad_batch(tokenizer, [encoded.input_ids[i] for i in indices])
               for indices in batches_by_length(encoded.lengths, batch_size)]
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"text": texts})

    @torch.inference_mode()
    def bare_pass() -> float:
        started = time.perf_counter()
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return time.perf_counter() - started

    def pyfunc_pass() -> float:
        started = time.perf_counter()
        pyfunc.predict(frame, params={"batch_size": batch_size})
        return time.perf_counter() - started

    bare = served = float("inf")
    for _ in range(repeats):
        bare, served = min(bare, bare_pass()), min(served, pyfunc_pass())
    return {"rows": len(texts), "batch_size": batch_size, "repeats": repeats,
            "bare_forward_samples_per_second": len(texts) / bare, "pyfunc_samples_per_second": len(texts) / served,
            "ratio": bare / served}


def save_logged_model(config: RunConfig, folder: Path) -> tuple[Path, str]:
    """A freshly built classifier saved as textclf saves its best checkpoint, and logged as the pyfunc
    model to a throwaway MLflow store in ``folder``. Returns the model folder and the model URI."""
    import mlflow

    from textclf import serving
    from textclf.model import save_classifier

    prepared = prepare(config)
    model_dir = folder / "model"
    save_classifier(prepared.model.eval(), prepared.tokenizer, model_dir, config.to_dict())
    mlflow.set_experiment("textclf-bench")
    with mlflow.start_run():
        uri = serving.log_model(model_dir, prepared.splits.label_names, prepared.splits.validation["text"].tolist())
    return model_dir, uri


@contextlib.contextmanager
def throwaway_store(folder: Path) -> Iterator[None]:
    """An MLflow store in ``folder`` for the bench's model, so the user's store gets no bench runs."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def run_bench(base_model: str, dataset: str = "sst2", rows: int = 240, baseline_steps: int = 3,
              predict_rows: int = 192, mode: str = "lora", max_length: int = 512) -> dict[str, Any]:
    """All measurements of ``make bench``, as one JSON-ready dict (see docs/benchmarks.md)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = bench_config(base_model, dataset, rows, 1, max_length, True, tmp, mode)
        precision = resolve_precision(probe.training.precision)
        peak = matmul_peak(precision)
        batch = probe.training.batch_size
        results = []
        for setting, pad_to_max_length, grouped in TRAINING_SETTINGS:
            steps = baseline_steps + 1 if pad_to_max_length else rows // batch
            config = bench_config(base_model, dataset, rows, steps, max_length, grouped, tmp, mode)
            throughput, flop_model = measure_training(config, pad_to_max_length, setting)
            results.append(throughput.summary(peak))
        baseline = results[0]["samples_per_second"]
        for result in results:
            result["speedup_vs_pad_to_512"] = result["samples_per_second"] / baseline
        with throwaway_store(Path(tmp)):
            model_dir, uri = save_logged_model(probe, Path(tmp))
            texts = load_splits(probe.data).validation["text"].tolist()[:predict_rows]
            prediction = measure_prediction(model_dir, uri, texts, probe.training.eval_batch_size)
    return {
        "base_model": base_model, "dataset": dataset, "mode": mode, "batch_size": batch, "precision": precision,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "matmul_gflops": peak, "flop_model": asdict(flop_model), "training": results, "prediction": prediction,
    }


def format_report(report: dict[str, Any]) -> str:
    """The tables ``make bench`` prints."""
    lines = [f"{report['base_model']} ({report['mode']}), {report['dataset']}, batch {report['batch_size']}, "
             f"{report['precision']} on {report['device']} ({report['threads']} threads); "
             f"matmul {report['matmul_gflops']['median']:.1f} GFLOP/s median, {report['matmul_gflops']['best']:.1f} best",
             "", "| setting | samples/s | tokens/s | padding | GFLOP/s | MFU (median / best matmul) | vs pad-to-512 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["training"]:
        lines.append(f"| {r['setting']} | {r['samples_per_second']:.2f} | {r['tokens_per_second']:.0f} | "
                     f"{r['padding_fraction']:.0%} | {r['gflops']:.1f} | {r['mfu']:.0%} / {r['mfu_vs_best_matmul']:.0%} | "
                     f"{r['speedup_vs_pad_to_512']:.1f}x |")
    p = report["prediction"]
    lines += ["", f"prediction, {p['rows']} rows in batches of {p['batch_size']}: bare forward "
              f"{p['bare_forward_samples_per_second']:.2f} samples/s, pyfunc {p['pyfunc_samples_per_second']:.2f} "
              f"samples/s, ratio {p['ratio']:.2f}"]
    return "\n".join(lines)
