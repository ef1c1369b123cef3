"""One training run, top to bottom: data -> model -> Trainer -> best checkpoint -> test -> MLflow.

:func:`run_training` is the recipe every entry point calls (``train``, each seed of ``sweep``, and each
process of ``train_deepspeed``); :func:`finish_run` is its second half, once the best checkpoint is chosen.
The components they wire live in the other modules: textclf.components.trainer (inputs, Trainer, metrics),
textclf.components.callbacks, textclf.process.signals, textclf.components.checkpoints (output folders), textclf.records.tracking (MLflow),
textclf.distributed.zero3.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from transformers.trainer_callback import EarlyStoppingCallback, ProgressCallback

from textclf import serving
from textclf.components import checkpoints
from textclf.components.budget import EvenEvaluations, FitToBudget, ScheduleLength
from textclf.components.callbacks import BestOfResumedRun, CheckpointCallback, TimeBudgetCallback
from textclf.components.data import load_splits
from textclf.components.model import save_classifier
from textclf.components.trainer import (
    BatchCounts,
    ClassifierTrainer,
    best_validation_metrics,
    make_compute_metrics,
    prepare,
    resolve_precision,
    restore_finished_training,
    standardize_head_inputs,
    training_arguments,
    training_collator,
)
from textclf.config import RunConfig
from textclf.distributed.ranks import is_main_process
from textclf.distributed.threads import configure_threads
from textclf.distributed.zero3 import consolidate
from textclf.process import signals
from textclf.process.allocator import loaded_allocator
from textclf.process.console import ConsoleProgress
from textclf.records import offline, tracking
from textclf.serving.inference import Predictor

log = logging.getLogger(__name__)


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


def run_training(
    config: RunConfig, deepspeed: dict | None = None, extra_tags: dict[str, str] | None = None, nested: bool = False,
    extra_callbacks: list | None = None,
) -> TrainingResult:
    """Train, select the best checkpoint, test it, and record everything in one MLflow run.

    ``extra_callbacks``: Trainer callbacks added after textclf's own (a search trial's pruning callback).

    A folder whose run already finished with the same recipe is recognised: nothing is trained, logged
    or registered, and the result names that run (``already_finished``). Raises TextclfError on bad
    input (before any run is started when the data, parameters or output folder are wrong); the run
    ends FAILED on any error and KILLED on SIGINT/SIGTERM.
    """
    threads = configure_threads()
    precision = resolve_precision(config.training.precision)
    splits = load_splits(config.data)  # bad data fails here, before an MLflow run exists
    output_dir = config.run_output_dir
    run_recipe = checkpoints.recipe_of(config, splits, precision, deepspeed)
    plan = checkpoints.plan_output_dir(output_dir, config.resume, run_recipe)
    if plan.finished is not None:
        result = already_finished(plan.finished, output_dir)
        if not nested:
            tracking.discard_attached_run(f"{output_dir} had already finished as run {result.run_id}")
        return result
    if config.register:  # before training, not after: a run that could not be registered would be wasted
        tracking.check_registrable(config.dataset_name, splits.dataset_digest)
    resume_from = plan.resume_from
    tags = {"dataset": config.dataset_name, "mode": config.mode, "seed": str(config.seed),
            "base_model": config.model.base_model, "output_dir": str(output_dir.resolve()), **(extra_tags or {})}
    ended = tracking.end_dead_runs(tags["output_dir"])
    if ended and resume_from:
        tags["resumes_runs"] = ",".join(ended)
    with tracking.tracked_run(config.experiment_name, config.default_run_name, tags, nested=nested,
                              offline_dir=output_dir) as run:
        if run is not None:
            tracking.log_run_inputs(config, splits, precision, resume_from,
                                    {**threads.as_params(), "process.malloc": loaded_allocator()}, deepspeed)
        # Arguments before the model: under ZeRO-3 they set up the DeepSpeed config that partitions weights as they load.
        args = training_arguments(config, output_dir, precision, deepspeed)
        prepared = prepare(config, splits)
        model, tokenizer = prepared.model, prepared.tokenizer
        model.spec.extra["precision"] = precision
        tracking.log_metrics(prepared.data_metrics())
        if config.model.standardization_samples:
            standardize_head_inputs(model, prepared.encoder, splits.train["text"],
                                    config.model.standardization_samples, config.seed, args.device,
                                    partitioned=deepspeed is not None)
        if config.training.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        counts, evaluation_state = BatchCounts(), {}
        evaluations = EvenEvaluations(config.training.evaluations) if config.training.evaluations else None
        callbacks = [signals.InterruptCallback(),  # first: no other callback acts on an interrupted step
                     # Next: it decides which steps evaluate, which the others read (FitToBudget, the step timers).
                     *([evaluations] if evaluations else []),
                     tracking.MlflowTrainingCallback(counts, evaluation_state),
                     CheckpointCallback(model.spec, run_recipe, config.to_dict()), BestOfResumedRun()]
        schedule_length = None
        if config.training.max_train_minutes:
            callbacks.append(TimeBudgetCallback(config.training.max_train_minutes))
        if config.training.fit_to_budget:
            schedule_length = ScheduleLength(total=0, warmup=0, warmup_ratio=config.training.warmup_ratio)
            callbacks.append(FitToBudget(config.training.max_train_minutes, schedule_length, counts,
                                         float(np.mean(prepared.train_encoded.lengths)),
                                         sum(prepared.eval_encoded.lengths), evaluations))
        if config.training.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(config.training.early_stopping_patience))
        trainer = ClassifierTrainer(
            model=model, args=args, train_dataset=prepared.train_set, eval_dataset=prepared.eval_set,
            data_collator=training_collator(tokenizer), callbacks=callbacks + list(extra_callbacks or []),
            compute_metrics=make_compute_metrics(len(splits.label_names), splits.label_names, evaluation_state),
            head_learning_rate=config.training.head_learning_rate, batch_counts=counts, schedule_length=schedule_length,
        )
        if resume_from and checkpoints.is_last_step(resume_from):
            restore_finished_training(trainer, model, resume_from, deepspeed is not None)
        else:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(ConsoleProgress())
            with signals.deferred_interrupts():
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        best = best_validation_metrics(trainer)
        tracking.log_metrics({f"best/{k}": v for k, v in best.items()})
        if deepspeed is not None:
            # The ranks part in consolidate; rank 0 finishes alone, on its training device, with the cores the others
            # leave (textclf.distributed.zero3.leave_process_group).
            model = consolidate(trainer, model, output_dir / "consolidated")
            if model is not None:
                model.to(args.device)
        result = finish_run(config, model, tokenizer, splits, best, run, output_dir)
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


def finish_run(config, model, tokenizer, splits, best, run, output_dir: Path) -> TrainingResult:
    """Calibrate the selected model's scores on validation, save it, test it, log it as the pyfunc model,
    and register it (rank 0 only)."""
    from textclf.components.calibration import TEMPERATURE_KEY, calibrate, softmax

    result = TrainingResult(run.info.run_id if run else None, output_dir / "model", best, {})
    if not is_main_process():
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
    staging = output_dir / "model.partial"  # written aside, then renamed: a reader never sees half a model
    shutil.rmtree(staging, ignore_errors=True)
    save_classifier(model, tokenizer, staging, config.to_dict())
    shutil.rmtree(result.model_dir, ignore_errors=True)
    staging.rename(result.model_dir)
    if splits.test is not None:
        texts, labels = splits.test["text"].tolist(), splits.test["label"].tolist()
        logits = predictor.logits(texts)
        probabilities = softmax(logits, predictor.temperature)  # = predictor.predict_proba(texts), one pass
        result.test_metrics = tracking.log_test_results(output_dir / "test", texts, labels, probabilities,
                                                        splits.label_names, uncalibrated=softmax(logits) if fitted else None)
    if run is not None:
        examples = splits.validation["text"].tolist()[:3]
        result.model_uri = tracking.keep_or_call(
            "model", lambda: serving.log_model(result.model_dir, splits.label_names, examples),
            model_dir=str(result.model_dir.resolve()), label_names=splits.label_names, examples=examples)
        if config.register:
            from textclf.records.registry import data_tags, register_run_model, registered_model_name

            data = data_tags(splits)
            result.registered_model = registered_model_name(config.dataset_name)
            result.registered_version = tracking.keep_or_call(
                "register", lambda: register_run_model(run.info.run_id, result.model_uri, config, best,
                                                       result.test_metrics, data),
                config=config.to_dict(), best=best, test=result.test_metrics, model_uri=result.model_uri, data=data)
    log.info("best validation %s; test %s", best, result.test_metrics)
    return result


def already_finished(record: dict[str, Any], output_dir: Path) -> TrainingResult:
    """The result of the run that finished in ``output_dir`` earlier, checked against the tracking store.

    Raises TextclfError when the store no longer has that run (deleted, or another store is in use).
    """
    run_id = record.get("run_id")
    if run_id:
        tracking.confirm_finished_run(run_id, output_dir, record.get("tracking_uri"))
    log.info("%s: already finished as run %s; nothing to train", output_dir, run_id)
    return TrainingResult(run_id, output_dir / "model", record.get("best", {}), record.get("test", {}),
                          model_uri=record.get("model_uri"), registered_model=record.get("registered_model"),
                          registered_version=record.get("registered_version"), already_finished=True)
