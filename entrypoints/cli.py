"""The `textclf` command: every entry point as a subcommand."""

from __future__ import annotations

import click

from entrypoints.baseline import baseline
from entrypoints.common import COMMAND_SETTINGS
from entrypoints.evaluate import evaluate
from entrypoints.predict import predict
from entrypoints.promote import promote
from entrypoints.search import search
from entrypoints.sweep import sweep
from entrypoints.sync import sync
from entrypoints.train import train
from entrypoints.train_deepspeed import train_deepspeed
from textclf.process.allocator import restart_under_jemalloc


@click.group(context_settings=COMMAND_SETTINGS)
@click.version_option(package_name="textclf", prog_name="textclf")
def main() -> None:
    """Fine-tune LLM text classifiers, tracked in MLflow."""


main.add_command(train)
main.add_command(evaluate)
main.add_command(sweep)
main.add_command(search)
main.add_command(promote)
main.add_command(predict)
main.add_command(train_deepspeed)
main.add_command(baseline)
main.add_command(sync)


def run() -> None:
    """The installed `textclf` command: under jemalloc where installed (textclf.process.allocator)."""
    restart_under_jemalloc()
    main()


if __name__ == "__main__":
    run()
