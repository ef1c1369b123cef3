"""`sweep` entry point: the same training once per seed, as nested runs of one parent run."""

from __future__ import annotations

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, training_options, user_errors
from textclf.config import DEFAULT_SEEDS
from textclf.process.allocator import restart_under_jemalloc


@click.command(name="sweep", context_settings=COMMAND_SETTINGS)
@click.option("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
@training_options
@debug_option
def sweep(seeds: str, debug: bool, **params) -> None:
    """Train once per seed; the parent run aggregates validation and test metrics across seeds."""
    setup_logging()
    with user_errors(debug):
        from textclf.config import build_config
        from textclf.errors import TextclfError
        from textclf.recipes.sweep import parse_seeds, run_sweep

        if params.pop("seed", None) is not None:
            raise TextclfError("sweep takes --seeds (comma-separated), not --seed")
        seed_list = parse_seeds(seeds)
        config = build_config(mode=params.pop("mode") or "lora", seed=seed_list[0], **params)
        result = run_sweep(config, seed_list)
        if result.already_finished:
            click.echo("already finished: nothing was trained, logged or registered "
                       "(choose another run_name to sweep again)")
        click.echo(f"parent run {result.parent_run_id}")
        click.echo(result.table.to_string(index=False))
        if result.failed:
            click.echo(f"failed seeds: {', '.join(map(str, result.failed))}", err=True)


if __name__ == "__main__":
    restart_under_jemalloc()
    sweep()
