"""What every entry point shares: the training options (one per config field, as in MLproject),
logging setup, and turning user errors into one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Any, Callable

import click

from textclf.errors import TextclfError, TrainingInterrupted

# (option, click type, help). Names match the MLproject parameters exactly; empty means "preset".
# Choices are checked by textclf.config.validate, which says what is wrong in one line.
TRAINING_OPTIONS: list[tuple[str, Any, str]] = [
    ("dataset", str, "shipped dataset: sst2 or r8"),
    ("data_path", str, "folder with train/dev/test files (json, jsonl, parquet, csv); overrides dataset"),
    ("text_column", str, "name of the text column (default: detected: text, sentence, review, ...)"),
    ("label_column", str, "name of the label column (default: detected: label, category, class, ...)"),
    ("mode", str, "full or lora"),
    ("seed", str, "training seed, an integer (0, 42 and 123 are the sweep's defaults)"),
    ("max_samples", int, "cap on training rows"),
    ("max_eval_samples", int, "cap on validation rows (logged)"),
    ("max_test_samples", int, "cap on test rows (logged)"),
    ("max_length", int, "max tokens per prompt; the text is cut, never the template"),
    ("prompt_template", str, "prompt with {text} and {class_labels}"),
    ("base_model", str, "local Hugging Face folder or hub id"),
    ("head", str, "classification head: mlp or linear"),
    ("head_dropout", float, "dropout in the head"),
    ("pooling", str, "auto, last or mean; auto: last token (decoders), mean (encoders)"),
    ("calibration_samples", int, "train rows that standardize the head's input features (0: off)"),
    ("lora_r", int, "LoRA rank"),
    ("lora_alpha", int, "LoRA alpha"),
    ("lora_dropout", float, "LoRA dropout"),
    ("lora_targets", str, "comma-separated module names"),
    ("learning_rate", float, "peak learning rate"),
    ("head_learning_rate", float, "peak learning rate of the classification head (default: learning_rate)"),
    ("batch_size", int, "training batch size per device"),
    ("eval_batch_size", int, "evaluation batch size"),
    ("epochs", float, "training epochs"),
    ("max_steps", int, "stop after this many steps (overrides epochs when > 0)"),
    ("max_train_minutes", float, "time budget: evaluate, save and stop once training has run this long"),
    ("eval_steps", int, "evaluate every N steps"),
    ("save_steps", int, "checkpoint every N steps (a multiple of eval_steps)"),
    ("logging_steps", int, "log train metrics every N steps"),
    ("save_total_limit", int, "checkpoints kept (the best one always survives)"),
    ("metric_for_best", str, "validation metric that selects the best checkpoint: f1_macro, accuracy, "
     "precision_macro, recall_macro or loss"),
    ("weight_decay", float, "AdamW weight decay"),
    ("warmup_ratio", float, "fraction of steps for learning-rate warmup"),
    ("gradient_accumulation_steps", int, "micro-batches per optimizer step"),
    ("gradient_checkpointing", click.BOOL, "recompute activations to save memory"),
    ("precision", str, "auto, fp32, bf16 or fp16; auto: bf16 where fast, else fp32"),
    ("group_by_length", click.BOOL, "batch rows of similar length together"),
    ("calibrate", click.BOOL, "fit a temperature on validation after training so that scores are calibrated"),
    ("output_dir", str, "checkpoints and the final model go to <output_dir>/<run_name>/"),
    ("run_name", str, "default <dataset>-<mode>-seed<seed>"),
    ("register", click.BOOL, "register the model in the MLflow model registry"),
    ("resume", click.BOOL, "continue from the latest complete checkpoint of the output folder"),
]


def _empty_is_none(_ctx, _param, value):
    # MLproject passes "" for a parameter left at its default: that means "use the preset".
    return None if value == "" else value


def _dashes_to_underscores(name: str) -> str:
    return name.replace("-", "_")


# Every command: `--batch-size` and `--batch_size` alike (the MLproject names use underscores), and
# defaults shown in --help.
COMMAND_SETTINGS = {"token_normalize_func": _dashes_to_underscores, "show_default": True}


def training_options(function: Callable) -> Callable:
    for name, kind, help_text in reversed(TRAINING_OPTIONS):
        function = click.option(f"--{name}", type=_Lenient(kind), default=None, callback=_empty_is_none,
                                help=f"{help_text} {_default_of(name)}")(function)
    return function


def _default_of(name: str) -> str:
    """``[preset: full 2e-05, lora 0.0005]`` or ``[default: 512]``: what an option left out means."""
    from textclf.config import MODE_PRESETS, DataConfig, ModelConfig, RunConfig, TrainingConfig

    presets = {mode: values[name] for mode, values in MODE_PRESETS.items() if name in values}
    if presets:
        return "[preset: " + ", ".join(f"{mode} {value}" for mode, value in presets.items()) + "]"
    for section in (RunConfig, DataConfig, ModelConfig, TrainingConfig):
        field = next((f for f in dataclasses.fields(section) if f.name == name), None)
        if field is not None and field.default is not dataclasses.MISSING and field.default is not None:
            shown = str(field.default)
            return f"[default: {shown if len(shown) <= 40 else shown[:37] + '...'}]"
    return ""


class _Lenient(click.ParamType):
    """Accepts "" (an MLproject default) as well as values of the wrapped type."""

    def __init__(self, inner: Any):
        self.inner = click.types.convert_type(inner)
        self.name = self.inner.name

    def convert(self, value, param, ctx):
        if value == "" or value is None:
            return ""
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        return self.inner.get_metavar(param, ctx) if hasattr(self.inner, "get_metavar") else None


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "filelock", "alembic", "mlflow.store", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from textclf.console import quiet_library_noise

    quiet_library_noise()


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Print a TextclfError as one line and exit 2; an interrupt exits 130. ``debug`` keeps tracebacks.

    A tracking server's refusal (HTTP 401/403: wrong password, no permission) is a TextclfError too
    (textclf.server_errors), so it is one line that names the server and the user, never the password."""
    from textclf.server_errors import server_refusals

    try:
        with server_refusals():
            yield
    except TextclfError as exc:
        from textclf.tracking import fail_attached_run

        fail_attached_run(f"TextclfError: {exc}")
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        if debug:
            raise
        click.echo(f"stopped: {exc or 'interrupted'}; the MLflow run was ended KILLED", err=True)
        sys.exit(130)


debug_option = click.option("--debug", is_flag=True, default=False, help="show tracebacks")
