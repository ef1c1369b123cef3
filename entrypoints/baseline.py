"""`baseline` entry point: the untrained base LM, prompted zero-shot, scored and logged like a trained run."""

from __future__ import annotations

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, user_errors
from textclf.process.allocator import restart_under_jemalloc


def _int_or_none(name: str, value: str | float | None) -> int | None:
    """MLproject passes "" for "not set" and floats as "32.0"."""
    from textclf.errors import TextclfError

    if value in ("", None):
        return None
    try:
        number = float(value)
    except ValueError:
        raise TextclfError(f"{name} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise TextclfError(f"{name} must be an integer, got {value!r}")
    return int(number)


def _or(value, default):
    return default if value is None else value


@click.command(name="baseline", context_settings=COMMAND_SETTINGS)
@click.option("--dataset", default="sst2", help="shipped dataset: sst2 or r8")
@click.option("--data_path", default="", help="folder with train/dev/test files; overrides dataset")
@click.option("--text_column", default="", help="column holding the text (default: detected)")
@click.option("--label_column", default="", help="column holding the label (default: detected)")
@click.option("--base_model", default="", help="decoder LM folder or hub id (default ckpt/SmolLM2-135M-Instruct)")
@click.option("--max_test_samples", default="", help="cap on test rows (logged; the same rows a trained run tests on)")
@click.option("--batch_size", default="32", help="prompts per forward pass")
@click.option("--max_length", default="512", help="max tokens per prompt; the text is cut, never the template")
@click.option("--prompt_template", default="", help="prompt with {text} and {class_labels} (default: training's)")
@click.option("--run_name", default="", help="default <dataset>-zero-shot")
@click.option("--register", type=click.BOOL, default=False,
              help="register the model as a version of textclf-<dataset> (scores the validation split too)")
@debug_option
def baseline(dataset: str, data_path: str, text_column: str, label_column: str, base_model: str,
             max_test_samples: str, batch_size: str, max_length: str, prompt_template: str, run_name: str,
             register: bool, debug: bool) -> None:
    """Classify the test split with the base model, untrained: each class name scored by its log-probability
    after the training prompt. Logs test metrics, artifacts and a pyfunc model to MLflow."""
    setup_logging()
    with user_errors(debug):
        from textclf.recipes.baseline import BaselineConfig, run_baseline

        defaults = BaselineConfig()
        config = BaselineConfig(
            dataset=dataset or defaults.dataset, data_path=data_path or None, text_column=text_column or None,
            label_column=label_column or None, base_model=base_model or defaults.base_model,
            max_test_samples=_int_or_none("max_test_samples", max_test_samples),
            batch_size=_or(_int_or_none("batch_size", batch_size), defaults.batch_size),
            max_length=_or(_int_or_none("max_length", max_length), defaults.max_length),
            prompt_template=prompt_template or defaults.prompt_template, run_name=run_name or None, register=register,
        )
        result = run_baseline(config)
        scores = ", ".join(f"{k}={v:.4f}" for k, v in result.test_metrics.items())
        click.echo(f"run {result.run_id}: zero-shot test {scores} ({result.seconds:.0f} s)")
        if result.registered_version:
            click.echo(f"model: models:/textclf-{config.data.name}/{result.registered_version} ({result.model_uri})")
        else:
            click.echo(f"model: {result.model_uri}")


if __name__ == "__main__":
    restart_under_jemalloc()
    baseline()
