"""What every entry point shares: the training options (derived from the run parameters declared in
textclf/config.py, as MLproject is), logging setup, and turning user errors into one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
from typing import Any, Callable

import click

from textclf.config import run_parameters
from textclf.errors import TextclfError, TrainingInterrupted
from textclf.parameters import Parameter


def _dashes_to_underscores(name: str) -> str:
    return name.replace("-", "_")


# Every command: `--batch-size` and `--batch_size` alike (the MLproject names use underscores), and
# defaults shown in --help.
COMMAND_SETTINGS = {"token_normalize_func": _dashes_to_underscores, "show_default": True}


def training_options(function: Callable) -> Callable:
    """One option per run parameter declared in textclf/config.py, named as in MLproject. An option left out is
    None: build_config then takes the mode's preset or the declared default. Ranges and choices are checked by
    config.validate, whose one-line refusal also ends a run that `mlflow run` created FAILED with the reason."""
    for parameter in reversed(run_parameters()):
        function = click.option(f"--{parameter.name}", type=_OptionValue(parameter.cli_type or parameter.kind),
                                default=None, metavar=_metavar(parameter),
                                help=f"{parameter.help} {_shown_default(parameter)}".rstrip())(function)
    return function


def _metavar(parameter: Parameter) -> str:
    """``[full|lora]``, else the declared type (INTEGER for seed too, which click reads as text)."""
    if parameter.choices:
        return "[" + "|".join(parameter.choices) + "]"
    return click.types.convert_type(parameter.kind).name.upper()


def _shown_default(parameter: Parameter) -> str:
    """``[preset: full 2e-05, lora 0.0005; x>0]`` or ``[default: 512; x>=16]``: what an option left out means,
    and the values it allows."""
    notes = []
    if parameter.follows_mode:
        notes.append("preset: " + ", ".join(f"{mode} {value}" for mode, value in parameter.presets.items()))
    elif parameter.default is not None:
        shown = str(parameter.default)
        notes.append(f"default: {shown if len(shown) <= 40 else shown[:37] + '...'}")
    if parameter.range is not None:
        notes.append(str(parameter.range))
    return "[" + "; ".join(notes) + "]" if notes else ""


class _OptionValue(click.ParamType):
    """A value of the wrapped type, with the two things MLproject and MLflow send that click alone refuses:
    "" (a parameter left at its MLproject default ""), read as None, which means "the preset" or "detect";
    and an integer written as a float ("100.0": MLflow passes a number given to it as a float that way, e.g.
    mlflow.projects.run(parameters={"max_steps": 100.0}) from a hyper-parameter search)."""

    def __init__(self, kind: Any):
        self.kind = kind
        self.inner = click.types.convert_type(kind)
        self.name = self.inner.name

    def convert(self, value, param, ctx):
        if value is None or value == "":
            return None
        if self.kind is int:
            return self._whole_number(value, param, ctx)
        return self.inner.convert(value, param, ctx)

    def _whole_number(self, value, param, ctx) -> int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number.is_integer():
            self.fail(f"{value!r} is not an integer", param, ctx)
        return int(number)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "filelock", "alembic", "mlflow.store", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `kill -USR1 <pid>` prints every thread's stack to stderr: where a command that seems stuck is waiting.
    if sys.__stderr__ is not None:  # None when started with stderr closed
        with contextlib.suppress(ValueError, OSError):  # no file descriptor (an embedding host's stream)
            faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    from textclf.process.console import quiet_library_noise

    quiet_library_noise()


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Print a TextclfError as one line and exit 2; an interrupt exits 130. ``debug`` keeps tracebacks.

    A tracking server's refusal (HTTP 401/403: wrong password, no permission) is a TextclfError too
    (textclf.records.server_errors), so it is one line that names the server and the user, never the password."""
    from textclf.records.server_errors import server_refusals

    try:
        with server_refusals():
            yield
    except TextclfError as exc:
        from textclf.records.tracking import fail_attached_run

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
