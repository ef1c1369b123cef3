"""`search` entry point: hyper-parameter search on Optuna, every trial a nested textclf training run."""

from __future__ import annotations

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, training_options, user_errors
from textclf.process.allocator import restart_under_jemalloc


@click.command(name="search", context_settings=COMMAND_SETTINGS)
@click.option("--space", default="", help="what to search: inline (learning_rate=log(1e-5,1e-3);lora_r=choice(8,16,64);"
              "warmup_ratio=uniform(0,0.2)) or a YAML/JSON file; empty: the mode's default space")
@click.option("--n_trials", type=float, default=20, help="trials in all, across reruns and workers (grid: at most "
              "its number of combinations)")
@click.option("--timeout_minutes", type=float, default=0, help="start no trial after this long (0: no limit)")
@click.option("--sampler", type=click.Choice(["tpe", "random", "grid"]), default="tpe",
              help="grid: every combination of the space's choices")
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default="median",
              help="stops unpromising trials at an evaluation")
@click.option("--pruner_startup_trials", type=float, default=5, help="median pruner: trials that finish before "
              "any is pruned")
@click.option("--study", default="", help="study name (default <dataset>-<mode>-search); the same name and storage "
              "continue or join the study")
@click.option("--storage", default="", help="Optuna storage: empty for the journal file <output_dir>/<study>/"
              "optuna.journal (processes of one machine), or a database URL such as "
              "postgresql+psycopg://user@host:5432/optuna (several machines)")
@click.option("--workers", type=float, default=1, help="processes on this machine sharing the study, each with "
              "its share of the cores (and one GPU each when CUDA_VISIBLE_DEVICES lists enough)")
@click.option("--seeds", default="", help="comma-separated seeds: each configuration trains once per seed, the "
              "objective is their mean")
@training_options
@debug_option
def search(space: str, n_trials: float, timeout_minutes: float, sampler: str, pruner: str,
           pruner_startup_trials: float, study: str, storage: str, workers: float, seeds: str, debug: bool,
           **params) -> None:
    """Search training parameters with Optuna: a parent run for the study, a nested run per trial, the best
    trial's model registered."""
    setup_logging()
    with user_errors(debug):
        from textclf.config import parse_positive_int
        from textclf.errors import TextclfError
        from textclf.recipes.search_space import parse_space
        from textclf.recipes.sweep import parse_seeds

        if pruner_startup_trials < 0 or not float(pruner_startup_trials).is_integer():
            raise TextclfError(f"pruner_startup_trials must be an integer >= 0, got {pruner_startup_trials}")
        mode = params.pop("mode")
        settings_space = parse_space(space, mode or "lora")
        worker_args = _worker_args(click.get_current_context().params)
        from textclf.recipes.search import SearchSettings, run_search

        settings = SearchSettings(
            space=settings_space, n_trials=parse_positive_int("n_trials", n_trials),
            timeout_minutes=timeout_minutes or None, sampler=sampler, pruner=pruner,
            pruner_startup_trials=int(pruner_startup_trials), study=study or None, storage=storage or None,
            workers=parse_positive_int("workers", workers), seeds=tuple(parse_seeds(seeds)) if seeds else (),
            worker_args=tuple(worker_args))
        if timeout_minutes < 0:
            raise TextclfError(f"timeout_minutes must be >= 0, got {timeout_minutes}")
        result = run_search(mode, params, settings)
        report(result)


def _worker_args(params: dict) -> list[str]:
    """This command's options as a worker process repeats them (workers are added by the search)."""
    args = []
    for name, value in params.items():
        if value is None or name in ("workers", "debug"):
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        args += [f"--{name}", text]
    return args


def report(result) -> None:
    counts = result.counts
    if result.already_finished:
        click.echo(f"already finished: study {result.study} has its {counts.counted} trials; nothing was trained, "
                   "logged or registered (raise n_trials to continue it, or choose another study name)")
    if not result.owner:
        click.echo(f"worker of study {result.study}: its trials are children of parent run {result.parent_run_id}, "
                   "whose owner logs the summary")
    else:
        click.echo(f"parent run {result.parent_run_id} (study {result.study})")
    click.echo(f"trials: {counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed")
    if result.best:
        best = result.best
        click.echo(f"best: trial {best['trial']}, value {best['value']:.4f}, "
                   + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    if result.registered_version:
        click.echo(f"registered version {result.registered_version} of the best trial's model")
    if len(result.table):
        columns = [c for c in result.table.columns if c not in ("run_ids",)]
        click.echo(result.table[columns].to_string(index=False))
    failed = [code for code in result.worker_exit_codes if code != 0]
    if failed:  # their trials were ended and retried or counted as failed; their output is above
        click.echo(f"{len(failed)} of {len(result.worker_exit_codes)} worker processes exited with an error "
                   f"(exit codes {', '.join(map(str, failed))})", err=True)


if __name__ == "__main__":
    restart_under_jemalloc()
    search()
