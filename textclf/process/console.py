"""What a person sees in the terminal: our log lines and one progress bar, not the libraries' noise.

Each silenced message below was read and judged harmless for textclf (the reason is beside it); any
other warning still shows.
"""

from __future__ import annotations

import logging
import os
import warnings

from tqdm.auto import tqdm
from transformers import TrainerCallback

from textclf.distributed.ranks import is_main_process

# (category, message regex): warnings about choices textclf makes on purpose.
HARMLESS_WARNINGS = [
    # mlflow.data.from_pandas with a local path: MLflow lists two equivalent source types.
    (UserWarning, r"The specified dataset source can be interpreted in multiple ways"),
    # Our label ids are integers and never missing.
    (UserWarning, r"Hint: Inferred schema contains integer column"),
    # The pyfunc validates its own input (textclf/serving/pyfunc.py) and states its signature.
    (UserWarning, r".*Add type hints to the `predict` method"),
    # transformers' own gradient-checkpointing internals and datasets' sort options.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"Specifying null_placement in SortOptions is deprecated"),
]

# (logger, message start): log lines that say nothing a user acts on.
HARMLESS_LOG_LINES = [
    ("transformers", "mtime may not be reliable"),  # checkpoint rotation falls back to step numbers: ours
    ("mlflow.pyfunc", "Passing a Python object as `python_model`"),  # our own class, logged with its code
]


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(prefix) for prefix in self.prefixes)


def quiet_library_noise() -> None:
    """Silence the known-harmless warnings, log lines and progress bars of the libraries we use."""
    for category, pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    by_logger: dict[str, list[str]] = {}
    for name, prefix in HARMLESS_LOG_LINES:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(prefixes))
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "started/stopped monitoring"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for local file copies
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed (imported by transformers' integrations) otherwise warns "Setting accelerator to CPU"
        # in every run, DeepSpeed or not.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars


class ConsoleProgress(TrainerCallback):
    """One training bar (its total right after a resume too) and one line per evaluation, in place of the
    Trainer's bar, its nested evaluation bar (stray ``[A`` in logs) and its printed metric dicts. The
    metrics themselves go to MLflow."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if is_main_process():
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            if self.bar.total != state.max_steps:  # fit_to_budget planned another length
                self.bar.total = state.max_steps
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.bar is not None and metrics:
            shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()
                              if k in ("eval_loss", "eval_accuracy", "eval_f1_macro"))
            self.bar.write(f"step {state.global_step}: validation {shown}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
