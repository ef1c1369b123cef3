"""`train` entry point: one training run (full or LoRA), tracked in MLflow."""

from __future__ import annotations

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, training_options, user_errors
from textclf.process.allocator import restart_under_jemalloc


@click.command(name="train", context_settings=COMMAND_SETTINGS)
@training_options
@debug_option
def train(debug: bool, **params) -> None:
    """Fine-tune a classifier and log params, metrics, artifacts and the model to MLflow."""
    setup_logging()
    with user_errors(debug):
        from textclf.config import build_config
        from textclf.recipes.training import run_training

        config = build_config(mode=params.pop("mode") or "lora", **params)
        report(run_training(config))


def report(result) -> None:
    """What a training produced, or which earlier run it recognised as already finished."""
    if result.already_finished:
        click.echo(f"already finished: {result.model_dir.parent} holds run {result.run_id}; nothing was trained, "
                   "logged or registered (choose another run_name to train again)")
    click.echo(f"run {result.run_id}: best validation {_fmt(result.best_metrics)}; test {_fmt(result.test_metrics)}")
    if result.offline_records:
        click.echo(f"the tracking server was unreachable: run {result.run_id}'s records are in {result.offline_records}; "
                   f"upload them with `textclf sync {result.offline_records.parent}` once it is back", err=True)
    if result.registered_version:
        click.echo(f"model: models:/{result.registered_model}/{result.registered_version} ({result.model_uri})")
    else:
        click.echo(f"model: {result.model_uri or result.model_dir}")


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "step") or "n/a"


if __name__ == "__main__":
    restart_under_jemalloc()
    train()
