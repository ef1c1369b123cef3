"""`promote` entry point: alias `champion` (and stage Production) for the best seed by validation metric."""

from __future__ import annotations

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, user_errors


@click.command(name="promote", context_settings=COMMAND_SETTINGS)
@click.option("--dataset", required=True, help="promote among the versions of textclf-<dataset>")
@click.option("--metric", default="f1_macro",
              help="validation metric to rank by: f1_macro, accuracy, precision_macro, recall_macro (highest wins) "
                   "or loss (lowest wins); never a test metric")
@click.option("--no-stage", "no_stage", is_flag=True, help="set the alias only, leave registry stages alone")
@click.option("--stage", type=click.BOOL, default=True, help="false: same as --no-stage (for MLproject's -P stage=false)")
@click.option("--validation_digest", default="",
              help="rank only the versions validated on these rows (tag validation_digest, or its first characters; "
                   "'unrecorded' for versions without it): needed when versions were validated on different rows")
@debug_option
def promote(dataset: str, metric: str, no_stage: bool, stage: bool, validation_digest: str, debug: bool) -> None:
    """Point alias `champion` at the registered version with the best validation METRIC."""
    setup_logging()
    with user_errors(debug):
        from textclf.records.registry import promote as promote_best

        result = promote_best(dataset, metric=metric, use_stage=stage and not no_stage,
                              validation_digest=validation_digest or None)
        state = "now champion" if result.changed else "already champion (nothing changed)"
        click.echo(f"{result.name} version {result.version} is {state}: {result.reason}")
        record_in_mlflow_run(result)


def record_in_mlflow_run(result) -> None:
    """Under `mlflow run`, which creates a run for every command, that run records the decision."""
    import os

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in {"promote.model": result.name, "promote.metric": result.metric,
                       "promote.version": result.version, "promote.run_id": result.run_id}.items():
        client.log_param(run_id, key, value)
    client.set_tag(run_id, "promote.reason", result.reason[:5000])
    client.set_tag(run_id, "promote.changed", str(result.changed).lower())


if __name__ == "__main__":
    promote()
