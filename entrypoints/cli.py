"""The `textclf` command: every entry point as a subcommand."""

from __future__ import annotations

import click

from entrypoints.evaluate import evaluate
from entrypoints.predict import predict
from entrypoints.promote import promote
from entrypoints.sweep import sweep
from entrypoints.train import train


@click.group()
def main() -> None:
    """Fine-tune LLM text classifiers, tracked in MLflow."""


main.add_command(train)
main.add_command(evaluate)
main.add_command(sweep)
main.add_command(promote)
main.add_command(predict)

if __name__ == "__main__":
    main()
