"""The `textclf` command: every entry point as a subcommand."""

from __future__ import annotations

import click

from entrypoints.evaluate import evaluate
from entrypoints.train import train


@click.group()
def main() -> None:
    """Fine-tune LLM text classifiers, tracked in MLflow."""


main.add_command(train)
main.add_command(evaluate)

if __name__ == "__main__":
    main()
