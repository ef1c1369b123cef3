"""`bench` entry point (`make bench`): training throughput against pad-to-512, matmul peak and MFU,
pyfunc prediction against the bare forward pass. Prints a table and writes JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from entrypoints.common import debug_option, setup_logging, user_errors
from textclf.config import DEFAULT_BASE_MODEL
from textclf.process.allocator import restart_under_jemalloc


@click.command(name="bench")
@click.option("--base_model", default=DEFAULT_BASE_MODEL, show_default=True)
@click.option("--dataset", default="sst2", show_default=True)
@click.option("--mode", default="lora", show_default=True)
@click.option("--rows", default=240, show_default=True, help="training rows timed per setting (one epoch)")
@click.option("--baseline_steps", default=3, show_default=True, help="timed steps of the pad-to-512 setting")
@click.option("--predict_rows", default=192, show_default=True, help="validation rows predicted")
@click.option("--output", default="bench-results/bench.json", show_default=True, type=click.Path(dir_okay=False))
@debug_option
def bench(debug: bool, output: str, **params) -> None:
    """Measure side by side and print the tables of docs/benchmarks.md."""
    setup_logging()
    with user_errors(debug):
        from textclf.recipes.bench import format_report, run_bench

        report = run_bench(**params)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
        click.echo(format_report(report))
        click.echo(f"written to {output}")


if __name__ == "__main__":
    restart_under_jemalloc()
    bench()
