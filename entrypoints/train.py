"""`train` entry point: one training run (full or LoRA), tracked in MLflow."""

from __future__ import annotations

import click

from entrypoints.common import debug_option, setup_logging, training_options, user_errors


@click.command(name="train")
@training_options
@debug_option
def train(debug: bool, **params) -> None:
    """Fine-tune a classifier and log params, metrics, artifacts and the model to MLflow."""
    setup_logging()
    with user_errors(debug):
        from textclf.config import build_config
        from textclf.training import run_training

        config = build_config(mode=params.pop("mode") or "lora", **params)
        result = run_training(config)
        click.echo(f"run {result.run_id}: best validation {_fmt(result.best_metrics)}; test {_fmt(result.test_metrics)}")
        click.echo(f"model: {result.model_uri or result.model_dir}"
                   + (f" (registered version {result.registered_version})" if result.registered_version else ""))


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "step") or "n/a"


if __name__ == "__main__":
    train()
