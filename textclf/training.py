"""One training run, top to bottom: data -> model -> Trainer -> best checkpoint -> test -> MLflow.

:func:`run_training` is the recipe every entry point calls (``train``, each seed of ``sweep``, and each
process of ``train_deepspeed``); the components it wires live in the other modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from textclf import checkpoints, offline
from textclf.config import RunConfig, flatten
from textclf.console import ConsoleProgress
from textclf.data import LabeledSplits, load_splits
from textclf.encoding import PromptEncoder, batches_by_length, pad_batch
from textclf.dropout import use_fast_cpu_dropout
from textclf.errors import TextclfError
from textclf.evaluation import METRIC_NAMES, classification_metrics, confusion, write_test_artifacts
from textclf.inference import Predictor
from textclf.threads import configure_threads
from textclf.model import build_classifier, load_trained_state, save_classifier, trained_state
from textclf import serving
from textclf import tracking

log = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"  # what the Trainer names a checkpoint's weights


@dataclass
class TrainingResult:
    run_id: str | None
    model_dir: Path
    best_metrics: dict[str, float]
    test_metrics: dict[str, float]
    model_uri: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None
    already_finished: bool = False  # the folder's run had finished earlier: nothing was trained now
    offline_records: Path | None = None  # records kept on disk while the tracking server was unreachable


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it, torch emulates
    bf16 and a matmul runs about 400x slower than fp32 (measured on a 2-core AMD EPYC with AVX2 only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(requested: str) -> str:
    """``auto`` -> bf16 where fast (a bf16 GPU or a CPU with bf16 instructions), fp16 on older GPUs,
    fp32 otherwise. Raises TextclfError when the device lacks the requested precision."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and not cuda:
        raise TextclfError("precision fp16 needs a CUDA GPU; on this CPU use precision=bf16 or precision=fp32")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TextclfError("precision bf16 is not supported by this GPU; use precision=fp16 or precision=fp32")
    if requested == "bf16" and not cuda and not cpu_has_fast_bf16():
        log.warning("this CPU has no bf16 instructions: bf16 is emulated and much slower than fp32")
    return requested


def training_arguments(config: RunConfig, output_dir: Path, precision: str, deepspeed: dict | None = None) -> TrainingArguments:
    t = config.training
    greater = t.metric_for_best != "loss"
    return TrainingArguments(
        output_dir=str(output_dir),
        seed=config.seed,
        data_seed=config.seed,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=float(t.warmup_ratio),  # a float in [0, 1) is a ratio of the total steps
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{t.metric_for_best}",
        greater_is_better=greater,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach our callback, not be averaged away
        report_to=[],  # MLflow logging is explicit, in textclf.tracking
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        average_tokens_across_devices=False,
        deepspeed=deepspeed,
        save_only_model=False,
        dataloader_num_workers=0,
    )


class CheckpointCallback(TrainerCallback):
    """Makes each checkpoint describe itself (textclf.json, the run's recipe) and marks it complete last."""

    def __init__(self, spec, run_recipe: dict[str, str]):
        self.spec, self.run_recipe = spec, run_recipe

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                checkpoints.finalize(folder, self.spec, self.run_recipe)


class TimeBudgetCallback(TrainerCallback):
    """Ends training once it has run ``minutes`` (evaluations included, counted from this process's
    start or resume), evaluating and saving that last step so it competes for best checkpoint.

    The ranks of a multi-process run agree through an all-reduce: a rank that stopped alone would
    leave the others waiting on a collective forever.
    """

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = time.perf_counter() - self.started >= self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(over)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item())
        if over and not control.should_training_stop:
            log.info("time budget of %.1f min reached at step %d: evaluating, saving and stopping",
                     self.seconds / 60, state.global_step)
            control.should_training_stop = control.should_evaluate = control.should_save = True


def make_compute_metrics(num_labels: int, label_names: list[str], evaluation_state: dict[str, Any]):
    def compute_metrics(prediction) -> dict[str, float]:
        # label_ids come in the same (possibly length-grouped) order as the predictions: compare those.
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.asarray(logits).argmax(axis=-1)
        labels = np.asarray(prediction.label_ids)
        evaluation_state["confusion"] = confusion(labels, predicted, label_names)
        return classification_metrics(labels, predicted, num_labels)

    return compute_metrics


def run_training(
    config: RunConfig, deepspeed: dict | None = None, extra_tags: dict[str, str] | None = None, nested: bool = False
) -> TrainingResult:
    """Train, select the best checkpoint, test it, and record everything in one MLflow run.

    A folder whose run already finished with the same recipe is recognised: nothing is trained, logged
    or registered, and the result names that run (``already_finished``). Raises TextclfError on bad
    input (before any run is started when the data, parameters or output folder are wrong); the run
    ends FAILED on any error and KILLED on SIGINT/SIGTERM.
    """
    threads = configure_threads()
    precision = resolve_precision(config.training.precision)
    splits = load_splits(config.data)  # bad data fails here, before an MLflow run exists
    output_dir = config.run_output_dir
    run_recipe = recipe_of(config, splits, precision, deepspeed)
    plan = checkpoints.plan_output_dir(output_dir, config.resume, run_recipe)
    if plan.finished is not None:
        result = already_finished(plan.finished, output_dir)
        if not nested:
            tracking.discard_attached_run(f"{output_dir} had already finished as run {result.run_id}")
        return result
    resume_from = plan.resume_from
    tags = {"dataset": config.dataset_name, "mode": config.mode, "seed": str(config.seed),
            "base_model": config.model.base_model, "output_dir": str(output_dir.resolve()), **(extra_tags or {})}
    ended = tracking.end_dead_runs(tags["output_dir"])
    if ended and resume_from:
        tags["resumes_runs"] = ",".join(ended)
    with tracking.tracked_run(config.experiment_name, config.default_run_name, tags, nested=nested,
                              offline_dir=output_dir) as run:
        if run is not None:
            _log_run_inputs(config, splits, precision, resume_from)
            tracking.log_process_params(threads.as_params())
            if deepspeed is not None:
                mlflow.log_dict(deepspeed, "deepspeed_config.json")
                mlflow.log_param("deepspeed.world_size", os.environ.get("WORLD_SIZE", "1"))
        # Arguments before the model: under ZeRO-3 they set up the DeepSpeed config that partitions weights as they load.
        args = training_arguments(config, output_dir, precision, deepspeed)
        set_seed(config.seed)  # before the head is built: its initial weights come from the RNG
        model, tokenizer = build_classifier(
            config.model, config.mode, splits.label_names, config.data.prompt_template, config.data.max_length
        )
        model.spec.extra["precision"] = precision
        adapt_to_device(model)
        encoder = PromptEncoder(tokenizer, config.data.prompt_template, splits.label_names, config.data.max_length)
        train_set, train_encoded = encoder.dataset(splits.train["text"], splits.train["label"])
        eval_set, eval_encoded = encoder.dataset(splits.validation["text"], splits.validation["label"])
        # With group_by_length the Trainer's sampler groups evaluation batches by length itself; without it,
        # it evaluates in dataset order, so sort by length. Safe either way: compute_metrics compares
        # predictions with the labels of the same order.
        eval_set = eval_set.sort("length", reverse=True)
        tracking.log_metrics({"data/train_truncated": train_encoded.truncated,
                              "data/validation_truncated": eval_encoded.truncated,
                              "data/train_mean_tokens": float(np.mean(train_encoded.lengths))})
        if config.model.calibration_samples:
            calibrate_head(model, encoder, splits.train["text"], config.model.calibration_samples, config.seed,
                           args.device, partitioned=deepspeed is not None)
        if config.training.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        evaluation_state: dict[str, Any] = {}
        callbacks = [tracking.MlflowTrainingCallback(model, evaluation_state),
                     CheckpointCallback(model.spec, run_recipe)]
        if config.training.max_train_minutes:
            callbacks.append(TimeBudgetCallback(config.training.max_train_minutes))
        trainer = ClassifierTrainer(
            head_learning_rate=config.training.head_learning_rate,
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=training_collator(tokenizer),
            compute_metrics=make_compute_metrics(len(splits.label_names), splits.label_names, evaluation_state),
            callbacks=callbacks,
        )
        if resume_from and checkpoint_ended_training(resume_from):
            restore_finished_training(trainer, model, resume_from, deepspeed is not None)
        else:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(ConsoleProgress())
            with tracking.deferred_interrupts():
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        best = _best_validation_metrics(trainer)
        tracking.log_metrics({f"best/{k}": v for k, v in best.items()})
        if deepspeed is not None:
            model = consolidate(trainer, model, tokenizer, output_dir / "consolidated")
        result = _finish(config, trainer, model, tokenizer, splits, best, run, output_dir)
    if any(record["run_id"] == result.run_id for record in offline.pending(output_dir)):
        result.offline_records = output_dir / offline.FOLDER
    if run is not None:
        checkpoints.record_finished(
            output_dir, run_recipe, run_id=result.run_id, experiment_id=run.info.experiment_id,
            tracking_uri=mlflow.get_tracking_uri(), model_uri=result.model_uri,
            registered_model=result.registered_model, registered_version=result.registered_version,
            best=result.best_metrics, test=result.test_metrics,
        )
        checkpoints.drop_resume_state(output_dir)
    return result


def checkpoint_ended_training(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the last step of its schedule (the process died after it, before finishing)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"]


def restore_finished_training(trainer: Trainer, model, checkpoint: Path, partitioned: bool) -> None:
    """Take up a training whose last checkpoint was written: its state and its best weights, no new step.

    Written by hand because the Trainer, resumed from the final checkpoint, trains one step past
    ``max_steps`` (transformers 5: it skips the trained batches, then runs the next one before it checks
    the step count). Raises TextclfError under ZeRO-3, whose sharded weights only the engine can load.
    """
    from transformers import TrainerState

    if partitioned:
        raise TextclfError(f"{checkpoint}: is the last step of its run, which did not finish; DeepSpeed cannot take it "
                           "up without training past max_steps: evaluate it with `evaluate`, or choose another run_name")
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = Path(trainer.state.best_model_checkpoint or checkpoint)
    best = checkpoint.parent / best.name  # the folder may have moved since the state was written
    load_trained_state(model, best / WEIGHTS_FILE)
    log.info("%s is the last step of the schedule: nothing left to train; best checkpoint %s", checkpoint, best.name)


def recipe_of(config: RunConfig, splits: LabeledSplits, precision: str, deepspeed: dict | None,
              world_size: int | None = None) -> dict[str, str]:
    """What determines the training in this folder: parameters, engine, precision and the data's content.
    ``world_size`` defaults to this process's (the launcher, before its processes exist, passes it)."""
    engine = {"engine": "trainer", "world_size": 1}
    if deepspeed is not None:
        engine = {"engine": "deepspeed", "world_size": world_size or os.environ.get("WORLD_SIZE", "1"),
                  "deepspeed_config": json.dumps(deepspeed, sort_keys=True)}
    return checkpoints.recipe(flatten(config), resolved_precision=precision, **engine, **data_digests(splits))


def data_digests(splits: LabeledSplits) -> dict[str, str]:
    """A content hash per split: a checkpoint never resumes onto other rows under the same parameters."""
    frames = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    return {f"data.digest.{name}": hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values).hexdigest()[:16]
            for name, frame in frames.items() if frame is not None}


def already_finished(record: dict[str, Any], output_dir: Path) -> TrainingResult:
    """The result of the run that finished in ``output_dir`` earlier, checked against the tracking store.

    Raises TextclfError when the store no longer has that run (deleted, or another store is in use).
    """
    run_id = record.get("run_id")
    if run_id:
        try:
            run = mlflow.MlflowClient().get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            if offline.connection_error(exc) is not None:
                raise TextclfError(f"{output_dir}: holds finished run {run_id}, but the tracking server at "
                                   f"{mlflow.get_tracking_uri()} cannot be reached to confirm it") from None
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            raise TextclfError(
                f"{output_dir}: holds finished run {run_id}, which the tracking store {mlflow.get_tracking_uri()} "
                f"does not have (recorded in {record.get('tracking_uri')}); remove the folder, or choose another "
                "run_name or output_dir"
            )
    log.info("%s: already finished as run %s; nothing to train", output_dir, run_id)
    return TrainingResult(run_id, output_dir / "model", record.get("best", {}), record.get("test", {}),
                          model_uri=record.get("model_uri"), registered_model=record.get("registered_model"),
                          registered_version=record.get("registered_version"), already_finished=True)


def adapt_to_device(model) -> None:
    """Device-specific speed-ups: on CPU, dropout with a cheaper random mask (same distribution, other draws)."""
    if not torch.cuda.is_available():
        replaced = use_fast_cpu_dropout(model)
        log.info("CPU training: %d dropout layers use the fast CPU mask", replaced)


def training_collator(tokenizer) -> DataCollatorWithPadding:
    """Pads each batch to its own longest row (the sampler groups rows of similar length)."""
    return DataCollatorWithPadding(tokenizer, padding="longest")


class ClassifierTrainer(Trainer):
    """The Trainer with two changes: the classification head may learn at its own rate, and a LoRA
    checkpoint holds only what training changes.

    Overriding ``create_optimizer`` (rather than passing ``optimizers=``) keeps one code path for plain
    training and DeepSpeed, which calls it when its config names no optimizer.

    The model is a plain ``nn.Module``, whose whole state dict the Trainer saves in every checkpoint: under
    LoRA mostly the frozen base model, a copy of what is on disk already. ``_save`` (the weights of each
    checkpoint) writes :func:`trained_state` instead, and the two readers of those weights, ``_load_from_checkpoint``
    (resume) and ``_load_best_model`` (``load_best_model_at_end``), load it onto the base weights the model
    already holds. Under DeepSpeed the engine writes and reads its own files: those paths stay the Trainer's.
    """

    def __init__(self, *args, head_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = parameter_groups(model, self.args.learning_rate, self.head_learning_rate or self.args.learning_rate,
                                      self.args.weight_decay, set(self.get_decay_parameter_names(model)))
            self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # A given state_dict comes from an engine (DeepSpeed's gathered weights): saved as it is.
        if state_dict is None and not self.is_deepspeed_enabled:
            state_dict = trained_state(self.model)
        super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_trained_state(model or self.model, Path(resume_from_checkpoint) / WEIGHTS_FILE)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super()._load_best_model()
            return
        load_trained_state(self.model, Path(self.state.best_model_checkpoint) / WEIGHTS_FILE)


def parameter_groups(model, learning_rate: float, head_learning_rate: float, weight_decay: float,
                     decay_names: set[str]) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups: backbone/head x decayed/not. Biases and norm weights are
    never decayed (the Trainer's own rule, ``get_decay_parameter_names``)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((name.startswith("head."), name in decay_names), []).append(parameter)
    return [{"params": params, "lr": head_learning_rate if head else learning_rate,
             "weight_decay": weight_decay if decayed else 0.0}
            for (head, decayed), params in sorted(groups.items())]


def calibrate_head(model, encoder: PromptEncoder, texts, count: int, seed: int, device: torch.device,
                   partitioned: bool = False) -> None:
    """Standardize the head's input on ``count`` training rows (the same rows on every rank), on the
    training device (the Trainer would move the model there anyway).

    Under ZeRO-3 (``partitioned``) each rank holds a slice of the backbone's weights, already on its
    device: they are gathered for these few forward passes, as DeepSpeed documents for using a model
    outside its engine.
    """
    sample = texts.sample(n=min(count, len(texts)), random_state=seed).tolist()
    encoded = encoder.encode(sample)
    batches = [{k: v.to(device) for k, v in pad_batch(encoder.tokenizer, [encoded.input_ids[i] for i in indices]).items()}
               for indices in batches_by_length(encoded.lengths, 16)]
    gathered = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        model.head.to(device)
        gathered = deepspeed.zero.GatheredParameters(list(model.backbone.parameters()), modifier_rank=None)
    else:
        model.to(device)
    with gathered:
        rows = model.calibrate(batches)
    log.info("head input standardized on %d training rows", rows)


def _log_run_inputs(config: RunConfig, splits: LabeledSplits, precision: str, resume_from: Path | None) -> None:
    tracking.log_config(config)
    mlflow.log_params({"resolved.precision": precision, "data.label_names": json.dumps(splits.label_names)[:500],
                       "data.label_source": splits.label_source,
                       **{f"data.rows.{k}": v for k, v in splits.summary().items()}})
    if splits.notes:
        mlflow.log_text("\n".join(splits.notes) + "\n", "data_notes.txt")
    if resume_from:
        mlflow.set_tag("resumed_from", str(resume_from))
    source = str(config.data.resolved_path())
    tracking.log_dataset(splits.train, source, f"{config.dataset_name}-train", "training")
    tracking.log_dataset(splits.validation, source, f"{config.dataset_name}-validation", "validation")
    if splits.test is not None:
        tracking.log_dataset(splits.test, source, f"{config.dataset_name}-test", "test")


def _best_validation_metrics(trainer: Trainer) -> dict[str, float]:
    """The validation metrics of the selected checkpoint, read from the log history (no re-evaluation).

    When training ended before any evaluation, evaluates once now.
    """
    state = trainer.state
    evaluations = [entry for entry in state.log_history if "eval_loss" in entry]
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
        evaluations = [entry for entry in evaluations if entry.get("step") == best_step] or evaluations
    if not evaluations:
        evaluations = [{**trainer.evaluate(), "step": state.global_step}]
    entry = evaluations[-1]
    best = {name: entry[f"eval_{name}"] for name in METRIC_NAMES if f"eval_{name}" in entry}
    best["loss"] = entry["eval_loss"]
    best["step"] = entry.get("step", state.global_step)
    return best


def consolidate(trainer: Trainer, model, tokenizer, folder: Path):
    """Gather ZeRO-3 shards into one state dict (every rank must call this), and on rank 0 rebuild a
    plain in-memory model from it. Raises TextclfError when the gathered weights are incomplete
    (a ZeRO-3 save of a few hundred KB is a known failure)."""
    from textclf.model import rebuild_from_state

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    trainer.save_model(str(folder))
    # Training is over: without this, loading the base model below would start a ZeRO-3 partitioned
    # load, a collective that rank 0 alone waits on forever.
    unset_hf_deepspeed_config()
    if not trainer.is_world_process_zero():
        return None
    model.spec.save(folder)
    tokenizer.save_pretrained(str(folder))
    rebuilt, _ = rebuild_from_state(folder, folder / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        saved = sum(int(np.prod(weights.get_slice(key).get_shape())) for key in weights.keys())
    expected = sum(p.numel() for p in rebuilt.state_dict().values())
    if saved != expected:
        raise TextclfError(f"{folder}: consolidated weights hold {saved} values, the model has {expected}")
    log.info("consolidated %d parameters into %s", saved, folder)
    return rebuilt


def _finish(config, trainer, model, tokenizer, splits, best, run, output_dir: Path) -> TrainingResult:
    """Calibrate the selected model's scores on validation, save it, test it, log it as the pyfunc model,
    and register it (rank 0 only)."""
    from textclf.calibration import TEMPERATURE_KEY, calibrate, softmax
    from textclf.evaluation import log_misclassified

    result = TrainingResult(run.info.run_id if run else None, output_dir / "model", best, {})
    if not trainer.is_world_process_zero():
        return result
    model = model.float().eval()
    predictor = Predictor(model, tokenizer, batch_size=config.training.eval_batch_size, progress=True)
    fitted = None
    model.spec.extra.pop(TEMPERATURE_KEY, None)
    if config.training.calibrate and len(splits.validation):
        # Fitted before saving: the temperature travels in the saved folder's spec, so every later
        # prediction (pyfunc, evaluate, predict) is calibrated. It never changes a label.
        fitted = calibrate(predictor.logits(splits.validation["text"].tolist()), splits.validation["label"].to_numpy())
        model.spec.extra[TEMPERATURE_KEY] = fitted.temperature
        log.info("temperature %.4f: validation ECE %.4f -> %.4f", fitted.temperature, fitted.ece_before, fitted.ece_after)
        if run is not None:
            tracking.log_metrics({"calibration/temperature": fitted.temperature,
                                  "calibration/validation_ece_before": fitted.ece_before,
                                  "calibration/validation_ece_after": fitted.ece_after})
    staging = output_dir / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save_classifier(model, tokenizer, staging)
    shutil.rmtree(result.model_dir, ignore_errors=True)
    staging.rename(result.model_dir)
    if splits.test is not None:
        texts, labels = splits.test["text"].tolist(), splits.test["label"].tolist()
        logits = predictor.logits(texts)
        probabilities = softmax(logits, predictor.temperature)  # = predictor.predict_proba(texts), one pass
        test_dir = output_dir / "test"
        result.test_metrics = write_test_artifacts(test_dir, texts, labels, probabilities, splits.label_names,
                                                   uncalibrated=softmax(logits) if fitted else None)
        if run is not None:
            tracking.log_metrics({f"test/{k}": v for k, v in result.test_metrics.items()})
            tracking.log_artifacts(test_dir, artifact_path="test")
            tracking.keep_or_call("misclassified", lambda: log_misclassified(texts, labels, probabilities, splits.label_names),
                                  predictions=str((test_dir / "predictions.parquet").resolve()),
                                  label_names=splits.label_names)
    if run is not None:
        examples = splits.validation["text"].tolist()[:3]
        result.model_uri = tracking.keep_or_call(
            "model", lambda: serving.log_model(result.model_dir, splits.label_names, examples),
            model_dir=str(result.model_dir.resolve()), label_names=splits.label_names, examples=examples)
        if config.register:
            from textclf.registry import register_run_model, registered_model_name

            result.registered_model = registered_model_name(config.dataset_name)
            result.registered_version = tracking.keep_or_call(
                "register", lambda: register_run_model(run.info.run_id, result.model_uri, config, best, result.test_metrics),
                config=config.to_dict(), best=best, test=result.test_metrics, model_uri=result.model_uri)
    log.info("best validation %s; test %s", best, result.test_metrics)
    return result
