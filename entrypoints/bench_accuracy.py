"""`bench-accuracy` entry point (`make bench-accuracy`): the SST-2 and R8 accuracy recipes, each a
tracked MLflow run, with their times and test accuracy beside the goals. Prints a table, writes JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from entrypoints.common import debug_option, setup_logging, user_errors
from textclf.process.allocator import restart_under_jemalloc


@click.command(name="bench-accuracy")
@click.option("--datasets", default="sst2,r8", show_default=True, help="comma-separated: sst2, r8")
@click.option("--output", default="bench-results/accuracy.json", show_default=True, type=click.Path(dir_okay=False))
@debug_option
def bench_accuracy(datasets: str, output: str, debug: bool) -> None:
    """Train each dataset's recipe within its time budget and test it."""
    setup_logging()
    with user_errors(debug):
        from textclf.errors import TextclfError
        from textclf.recipes.bench_accuracy import RECIPES, format_accuracy, run_accuracy

        names = [name.strip() for name in datasets.split(",") if name.strip()]
        unknown = [name for name in names if name not in RECIPES]
        if unknown or not names:
            raise TextclfError(f"no accuracy recipe for {', '.join(unknown) or 'an empty list'}: choose from {', '.join(RECIPES)}")
        rows = []
        for name in names:
            rows.append(run_accuracy(name))
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(rows, indent=2))  # after each recipe: a later failure loses nothing
        click.echo(format_accuracy(rows))
        click.echo(f"written to {output}")


if __name__ == "__main__":
    restart_under_jemalloc()
    bench_accuracy()
