"""The parts of a training run that the recipe (:mod:`textclf.recipes.training`) wires together, and that the bench
reuses so it times what ``train`` runs: precision and device, the prepared inputs (:func:`prepare`), the
Trainer's arguments, collator and optimizer groups, the rows and tokens it trains on, evaluation metrics,
the standardization of the head's input, and taking up a run whose last checkpoint was written.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from textclf.components.attention_dropout import use_fast_cpu_attention_dropout
from textclf.components.budget import EvenEvaluations, ScheduleLength
from textclf.components.checkpoints import WEIGHTS_FILE
from textclf.components.data import LabeledSplits, load_splits
from textclf.components.dropout import use_fast_cpu_dropout
from textclf.components.encoding import EncodedTexts, PromptEncoder, batches_by_length, longest_first, pad_batch
from textclf.components.evaluation import METRIC_NAMES, classification_metrics, confusion
from textclf.components.model import TextClassifier, base_of, build_classifier, load_trained_state, trained_state
from textclf.config import RunConfig
from textclf.errors import TextclfError

log = logging.getLogger(__name__)


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it, torch emulates
    bf16 and a matmul runs about 400x slower than fp32 (measured on a 2-core AMD EPYC with AVX2 only)."""
    try:
        flags = cpuinfo.read_text()
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


def adapt_to_device(model) -> None:
    """Device-specific speed-ups: on CPU, dropout with a cheaper random mask (same distribution, other draws), in
    the dropout layers and in the attention probabilities of models that drop those (encoders)."""
    if not torch.cuda.is_available():
        replaced = use_fast_cpu_dropout(model)
        attention = use_fast_cpu_attention_dropout(base_of(model.backbone))
        log.info("CPU training: %d dropout layers%s use the fast CPU mask", replaced,
                 " and the attention probabilities" if attention else "")


@dataclass
class Prepared:
    """What a run trains: its data, the fresh classifier and tokenizer, and the encoded splits."""

    splits: LabeledSplits
    model: TextClassifier
    tokenizer: PreTrainedTokenizerBase
    encoder: PromptEncoder
    train_set: Dataset
    eval_set: Dataset  # longest first
    train_encoded: EncodedTexts
    eval_encoded: EncodedTexts

    def data_metrics(self) -> dict[str, float]:
        return {"data/train_truncated": self.train_encoded.truncated,
                "data/validation_truncated": self.eval_encoded.truncated,
                "data/train_mean_tokens": float(np.mean(self.train_encoded.lengths))}


def prepare(config: RunConfig, splits: LabeledSplits | None = None) -> Prepared:
    """Load the splits (unless given), seed, build the classifier (with its device speed-ups) and encode the
    training and validation splits. Raises TextclfError on bad data or a base model that cannot be loaded.

    Under ZeRO-3, build the TrainingArguments first: they set up the DeepSpeed config that partitions the
    weights as they load.
    """
    splits = splits if splits is not None else load_splits(config.data)
    set_seed(config.seed)  # before the head is built: its initial weights come from the RNG
    model, tokenizer = build_classifier(config.model, config.mode, splits.label_names, config.data.prompt_template,
                                        config.data.max_length)
    adapt_to_device(model)
    encoder = PromptEncoder(tokenizer, config.data.prompt_template, splits.label_names, config.data.max_length)
    train_set, train_encoded = encoder.dataset(splits.train["text"], splits.train["label"])
    eval_set, eval_encoded = encoder.dataset(splits.validation["text"], splits.validation["label"])
    # With group_by_length the Trainer's sampler groups evaluation batches by length itself; without it, it
    # evaluates in dataset order: longest first, so that each batch pads little. Safe either way:
    # compute_metrics compares predictions with the labels of the same order.
    eval_set = eval_set.select(longest_first(eval_encoded.lengths))
    return Prepared(splits, model, tokenizer, encoder, train_set, eval_set, train_encoded, eval_encoded)


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
        # With evaluations=N, textclf.components.budget.EvenEvaluations decides when: the flow's cadence never fires.
        eval_steps=EvenEvaluations.NEVER if t.evaluations else t.eval_steps,
        save_strategy="steps",
        save_steps=EvenEvaluations.NEVER if t.evaluations else t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{t.metric_for_best}",
        greater_is_better=greater,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach our callback, not be averaged away
        report_to=[],  # MLflow logging is explicit, in textclf.records.tracking
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        # The sampler measures each row's input_ids (the Trainer drops any length column before building it).
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        average_tokens_across_devices=False,
        deepspeed=deepspeed,
        save_only_model=False,
        dataloader_num_workers=0,
    )


def training_collator(tokenizer) -> DataCollatorWithPadding:
    """Pads each batch to its own longest row (the sampler groups rows of similar length)."""
    return DataCollatorWithPadding(tokenizer, padding="longest")


@dataclass
class BatchCounts:
    """Rows and tokens of the training micro-batches this process ran, for throughput metrics (the Trainer
    reports no tokens/s): each micro-batch of a gradient-accumulation step, only this rank's under DeepSpeed.
    ``attention_pairs`` sums each row's squared real length, the query-key pairs useful attention computes.

    Token counts stay tensors on the batch's device until read (:meth:`totals`): reading them per micro-batch
    would wait for the GPU at every step."""

    samples: int = 0
    real_tokens: Any = 0  # an int, or a tensor on the batch's device once a batch was counted
    padded_tokens: int = 0
    attention_pairs: Any = 0

    def add(self, batch: dict[str, Any]) -> None:
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        lengths = mask.sum(dim=1) if mask is not None else torch.full((input_ids.shape[0],), input_ids.shape[1],
                                                                      device=input_ids.device)
        self.samples += int(input_ids.shape[0])
        self.real_tokens = self.real_tokens + lengths.sum()
        self.padded_tokens += int(input_ids.numel())
        self.attention_pairs = self.attention_pairs + (lengths.double() ** 2).sum()

    def totals(self) -> dict[str, float]:
        """Everything counted so far, as numbers."""
        return {"samples": float(self.samples), "real_tokens": float(self.real_tokens),
                "padded_tokens": float(self.padded_tokens), "attention_pairs": float(self.attention_pairs)}

    def reset(self) -> None:
        self.samples = self.real_tokens = self.padded_tokens = self.attention_pairs = 0


class ClassifierTrainer(Trainer):
    """The Trainer with five changes: the classification head may learn at its own rate, a LoRA checkpoint
    holds only what training changes, the rows and tokens of each training batch are counted, only a
    saved step can become the best one, and the learning-rate schedule may follow a ``schedule_length`` that
    changes while training (``fit_to_budget``).

    Overriding ``create_optimizer`` (rather than passing ``optimizers=``) keeps one code path for plain
    training and DeepSpeed, which calls it when its config names no optimizer.

    The model is a plain ``nn.Module``, whose whole state dict the Trainer saves in every checkpoint: under
    LoRA mostly the frozen base model, a copy of what is on disk already. ``_save`` (the weights of each
    checkpoint) writes :func:`trained_state` instead, and the two readers of those weights, ``_load_from_checkpoint``
    (resume) and ``_load_best_model`` (``load_best_model_at_end``), load it onto the base weights the model
    already holds. Under DeepSpeed the engine writes and reads its own files: those paths stay the Trainer's.

    ``training_step`` runs once per micro-batch, in training only: it fills ``batch_counts`` (pass one
    to share it with the callbacks that read it).
    """

    def __init__(self, *args, head_learning_rate: float | None = None, batch_counts: BatchCounts | None = None,
                 schedule_length: ScheduleLength | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate
        self.batch_counts = batch_counts if batch_counts is not None else BatchCounts()
        self.schedule_length = schedule_length

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batch_counts.add(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = parameter_groups(model, self.args.learning_rate, self.head_learning_rate or self.args.learning_rate,
                                      self.args.weight_decay, set(self.get_decay_parameter_names(model)))
            if self._offloads_optimizer():
                # ZeRO-Offload keeps the optimizer state on the CPU, where DeepSpeed accepts only its own vectorized
                # CPU Adam (a torch optimizer there is refused as slow); AdamW's settings carry over.
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer_class = DeepSpeedCPUAdam
                optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k in ("lr", "betas", "eps")}
            self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.schedule_length is not None:
            # The linear schedule over a length that textclf.components.budget.FitToBudget may change.
            self.schedule_length.resize(num_training_steps)
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.schedule_length)
            self._created_lr_scheduler = True  # as the Trainer's own: a second train() builds it anew
        return super().create_scheduler(num_training_steps, optimizer)

    def _offloads_optimizer(self) -> bool:
        config = self.args.hf_deepspeed_config.config if self.is_deepspeed_enabled else {}
        return config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        # transformers 5 makes every evaluation the best one if it scores highest, saved or not, but moves
        # best_model_checkpoint only to a folder that exists: after an unsaved high score, no later saved
        # checkpoint could be selected, and early stopping counted from a score no checkpoint holds. Only an
        # evaluation of a step saved now competes (the Trainer saves right after this call).
        if not self.control.should_save:
            return False
        return super()._determine_best_metric(metrics, trial)

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


def make_compute_metrics(num_labels: int, label_names: list[str], evaluation_state: dict[str, Any]):
    def compute_metrics(prediction) -> dict[str, float]:
        # label_ids come in the same (possibly length-grouped) order as the predictions: compare those.
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.asarray(logits).argmax(axis=-1)
        labels = np.asarray(prediction.label_ids)
        evaluation_state["confusion"] = confusion(labels, predicted, label_names)
        return classification_metrics(labels, predicted, num_labels)

    return compute_metrics


def best_validation_metrics(trainer: Trainer) -> dict[str, float]:
    """The validation metrics of the selected checkpoint, read from the log history.

    Never another step's metrics: where the history lacks the evaluation of the step whose weights the model holds
    (the selected checkpoint's, loaded at the end of training, or else the last step's), the model is measured
    once now.
    """
    state = trainer.state
    step = state.global_step
    if state.best_model_checkpoint:
        step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
    evaluations = [entry for entry in state.log_history if "eval_loss" in entry and entry.get("step") == step]
    if not evaluations and step == state.global_step:
        # The last step's weights: evaluated, logged and drawn like any evaluation.
        evaluations = [{**trainer.evaluate(), "step": step}]
    elif not evaluations:
        # An earlier step's weights: predict() logs nothing, which would otherwise file them under the last step.
        evaluations = [{**trainer.predict(trainer.eval_dataset, metric_key_prefix="eval").metrics, "step": step}]
    entry = evaluations[-1]
    best = {name: entry[f"eval_{name}"] for name in METRIC_NAMES if f"eval_{name}" in entry}
    best["loss"] = entry["eval_loss"]
    best["step"] = entry.get("step", state.global_step)
    return best


def standardize_head_inputs(model, encoder: PromptEncoder, texts, count: int, seed: int, device: torch.device,
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
        rows = model.standardize_head_inputs(batches)
    log.info("head input standardized on %d training rows", rows)


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
    from textclf.components.callbacks import select_best_saved

    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    # Re-chosen among the folder's checkpoints: the folder may have moved since the state was written.
    select_best_saved(trainer.state, checkpoint.parent, trainer.args.metric_for_best_model,
                      trainer.args.greater_is_better)
    best = Path(trainer.state.best_model_checkpoint or checkpoint)
    load_trained_state(model, best / WEIGHTS_FILE)
    log.info("%s is the last step of the schedule: nothing left to train; best checkpoint %s", checkpoint, best.name)
