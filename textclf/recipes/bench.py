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

from textclf.components.data import load_splits
from textclf.components.encoding import PromptEncoder, batches_by_length, pad_batch
from textclf.components.model import TextClassifier, base_of
from textclf.components.trainer import (
    BatchCounts,
    ClassifierTrainer,
    prepare,
    resolve_precision,
    training_arguments,
    training_collator,
)
from textclf.config import RunConfig, build_config

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
    """Useful training FLOPs of a classifier, from what its linear layers and attention compute per token.

    A linear layer of N weights costs 2N per token forward; backward adds 2N for its input gradient when its
    input requires one (anything below it trains) and 2N for its weight gradient when it trains (LoRA adapters,
    or every weight in full mode). So layers below the lowest trained one (``frozen_layers``, LoRA on the upper
    layers only) cost their forward alone, as do the projections that read the frozen input of the lowest one.
    Which case each layer is in is read off one forward pass (:meth:`of`), not guessed from names. Attention
    costs 4 x width FLOPs per query-key pair of real tokens forward (scores and values) and twice that backward
    in the layers backward runs through, on each row's real length: padding is no useful work. Embeddings are
    lookups (no FLOPs), the head runs once per row (ignored, <0.5% of a real model), and recomputation under
    gradient checkpointing is not counted.
    """

    linear_weights: int  # every linear weight that runs: 2 FLOPs each per token forward
    input_gradient_weights: int  # those whose input needs a gradient: 2 more in backward
    trained_weights: int  # those that train: 2 more for their gradient
    layers: int  # transformer layers that backward runs through
    forward_only_layers: int
    attention_width: int

    @classmethod
    def of(cls, model: TextClassifier) -> "FlopModel":
        """Count ``model``'s linear weights by the gradients training computes for them, observed in one forward
        pass of a 4-token row with gradients enabled (which inputs require a gradient)."""
        from textclf.components.model import transformer_layers

        base = base_of(model.backbone)
        layers = transformer_layers(base)
        observed: dict[int, tuple[nn.Linear, bool, bool]] = {}  # id -> (module, input needs grad, output needs grad)

        def record(module, inputs, output):
            observed[id(module)] = (module, inputs[0].requires_grad, output.requires_grad)

        hooks = [m.register_forward_hook(record) for m in model.backbone.modules() if isinstance(m, nn.Linear)]
        try:
            device = next(model.parameters()).device
            ids = torch.arange(4, device=device).unsqueeze(0)
            with torch.enable_grad():
                model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            for hook in hooks:
                hook.remove()
        counts = dict(linear_weights=0, input_gradient_weights=0, trained_weights=0)
        for module, input_grad, _ in observed.values():
            weights = getattr(module.weight, "ds_numel", module.weight.numel())  # ZeRO-3 leaves numel() 0
            counts["linear_weights"] += weights
            counts["input_gradient_weights"] += weights if input_grad else 0
            counts["trained_weights"] += weights if module.weight.requires_grad else 0
        backward = sum(any(observed.get(id(m), (None, False, False))[2] for m in layer.modules()) for layer in layers)
        config = base.config
        width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(**counts, layers=backward, forward_only_layers=len(layers) - backward,
                   attention_width=width * config.num_attention_heads)

    def training_flops(self, real_tokens: float, attention_pairs: float) -> float:
        """Useful FLOPs of training on ``real_tokens`` tokens whose rows hold ``attention_pairs`` query-key pairs
        (the sum of each row's squared real length; textclf.components.trainer.BatchCounts counts both)."""
        per_token = 2 * (self.linear_weights + self.input_gradient_weights + self.trained_weights)
        per_pair = 4 * self.attention_width * (self.forward_only_layers + 3 * self.layers)
        return real_tokens * per_token + attention_pairs * per_pair


@dataclass
class Throughput:
    setting: str
    steps: int  # timed steps (the first step of each setting is a warm-up and not timed)
    samples: int
    real_tokens: int
    padded_tokens: int
    attention_pairs: int
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
    """Wall time and tokens of every step after the first ``warmup`` ones, read off the Trainer's batch counts
    (the first step allocates the optimizer state; torch.compile compiles during the first steps, once per new
    shape until it marks the sequence length dynamic)."""

    def __init__(self, counts: BatchCounts, flop_model: FlopModel, warmup: int = 1):
        self.counts, self.flop_model, self.warmup = counts, flop_model, warmup
        self.last_end: float | None = None
        self.last_counters: dict[str, float] = {}
        self.totals = dict(steps=0, samples=0, real_tokens=0, padded_tokens=0, attention_pairs=0, seconds=0.0, flops=0.0)

    def on_step_end(self, args, state, control, **kwargs):
        now, counters = time.perf_counter(), self.counts.totals()
        if state.global_step > self.warmup:
            delta = {k: counters[k] - self.last_counters[k] for k in counters}
            self.totals["steps"] += 1
            self.totals["seconds"] += now - self.last_end
            self.totals["flops"] += self.flop_model.training_flops(delta["real_tokens"], delta["attention_pairs"])
            for key in ("samples", "real_tokens", "padded_tokens", "attention_pairs"):
                self.totals[key] += int(delta[key])
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


def measure_training(config: RunConfig, pad_to_max_length: bool, setting: str, *, attention: str | None = None,
                     optim: str | None = None, compile_backend: str | None = None,
                     gradient_checkpointing: bool = False, warmup: int = 1) -> tuple[Throughput, FlopModel, dict]:
    """Train ``config.training.max_steps`` steps with the Trainer textclf uses; time all but the first ``warmup``.

    The levers (an attention implementation, a Trainer ``optim``, a torch.compile backend, gradient
    checkpointing) change one thing each from what ``textclf train`` runs; the GPU check measures them. Returns the
    throughput, the FLOP model and what ran (attention, optimizer, compile, checkpointing)."""
    precision = resolve_precision(config.training.precision)
    prepared = prepare(config)
    model, tokenizer = prepared.model, prepared.tokenizer
    base = base_of(model.backbone)
    if attention:
        base.set_attn_implementation(attention)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()  # as textclf.recipes.training.run_training does
    if pad_to_max_length:
        collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=config.data.max_length)
    else:
        collator = training_collator(tokenizer)
    flop_model = FlopModel.of(model)
    counts = BatchCounts()
    timer = StepTimer(counts, flop_model, warmup)
    # textclf's arguments without evaluation and checkpoints, which are not what is timed here.
    changes: dict[str, Any] = {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}
    if optim:
        changes["optim"] = optim
    if compile_backend:
        changes.update(torch_compile=True, torch_compile_backend=compile_backend)
    with tempfile.TemporaryDirectory() as tmp:
        args = dataclasses.replace(training_arguments(config, Path(tmp), precision), **changes)
        trainer = ClassifierTrainer(model=model, args=args, train_dataset=prepared.train_set, data_collator=collator,
                                    callbacks=[timer], head_learning_rate=config.training.head_learning_rate,
                                    batch_counts=counts)
        trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
        ran = {"attn_implementation": str(base.config._attn_implementation),
               "optim": str(getattr(args.optim, "value", args.optim)),
               "optimizer": f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})",
               "torch_compile": compile_backend or False, "gradient_checkpointing": gradient_checkpointing}
    return Throughput(setting=setting, **timer.totals), flop_model, ran


def measure_prediction(model_dir: Path, model_uri: str, texts: list[str], batch_size: int,
                       repeats: int = 2) -> dict[str, float]:
    """Samples/s of the logged pyfunc model on ``texts`` and of the bare forward pass of the same saved
    model on the same length-sorted, pre-tokenized batches (what the pyfunc adds: input checks,
    tokenization, padding, softmax, the output frame). Passes alternate and the best of ``repeats``
    counts for each, so neither side alone pays the warm-up or a noisy moment."""
    import mlflow.pyfunc
    import pandas as pd

    from textclf.components.model import load_classifier

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
    from textclf.components.model import save_classifier

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
            throughput, flop_model, _ = measure_training(config, pad_to_max_length, setting)
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
             "MFU: useful training GFLOP/s (textclf.recipes.bench.FlopModel) over the matmul rate measured on this machine in "
             "the same precision (median / best of its square matmuls), not a datasheet peak",
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
