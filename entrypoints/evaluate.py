"""`evaluate` entry point: score a trained model on a test split and log the results in a new run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, user_errors
from textclf.process.allocator import restart_under_jemalloc


@click.command(name="evaluate", context_settings=COMMAND_SETTINGS)
@click.option("--model_uri", required=True, help="models:/ or runs:/ URI, a saved model folder or a checkpoint")
@click.option("--data_path", required=True, help="a data folder with a test split, or one file")
@click.option("--text_column", default="", help="column holding the text (default: detected)")
@click.option("--label_column", default="", help="column holding the label (default: detected)")
@click.option("--max_test_samples", default="", help="cap on test rows (logged)")
@click.option("--batch_size", type=float, default=32, help="texts per forward pass")
@click.option("--experiment_name", default="", help="default textclf-<dataset>")
@debug_option
def evaluate(model_uri: str, data_path: str, text_column: str, label_column: str, max_test_samples: str,
             batch_size: float, experiment_name: str, debug: bool) -> None:
    """Evaluate MODEL_URI on the test split of DATA_PATH; log test metrics and artifacts to MLflow."""
    setup_logging()
    with user_errors(debug):
        from textclf.config import parse_positive_int

        max_test_samples = parse_positive_int("max_test_samples", max_test_samples) if max_test_samples else None
        batch_size = parse_positive_int("batch_size", batch_size)
        from textclf.components.data import load_test_split
        from textclf.records import tracking
        from textclf.serving.inference import Predictor
        from textclf.serving.sources import load_model_source

        loaded = load_model_source(model_uri)
        click.echo(f"{model_uri}: {loaded.kind}", err=True)
        names = loaded.model.spec.label_names
        test = load_test_split(Path(data_path), names, max_test_samples,
                               text_column=text_column or None, label_column=label_column or None)
        dataset = model_dataset(model_uri, loaded.model) or data_name(data_path)
        tags = {"dataset": dataset, "model_uri": model_uri, "model_kind": loaded.kind, "entry_point": "evaluate"}
        with tracking.tracked_run(experiment_name or f"textclf-{dataset}", f"{dataset}-evaluate", tags) as run:
            import mlflow

            mlflow.log_params({"model_uri": model_uri[:500], "data_path": data_path[:500],
                               "text_column": text_column, "label_column": label_column,
                               "max_test_samples": max_test_samples, "rows.test": len(test)})
            tracking.log_dataset(test, data_path, f"{data_name(data_path)}-test", "test")
            predictor = Predictor(loaded.model, loaded.tokenizer, batch_size=batch_size, progress=True)
            probabilities = predictor.predict_proba(test["text"].tolist())
            with tempfile.TemporaryDirectory() as tmp:
                metrics = tracking.log_test_results(Path(tmp), test["text"].tolist(), test["label"].tolist(),
                                                    probabilities, names)
            click.echo(f"run {run.info.run_id}: " + ", ".join(f"test {k}={v:.4f}" for k, v in metrics.items()))


def data_name(data_path: str) -> str:
    """The dataset's name from a data folder or one file in it: a file is named by its folder, the same way."""
    from textclf.config import DataConfig

    path = Path(data_path)
    return DataConfig(data_path=str(path if path.is_dir() else path.resolve().parent)).name


def model_dataset(model_uri: str, model) -> str | None:
    """The dataset the model was trained on, when it says so: its spec, the `dataset` tag of the run that
    logged it (found by MLflow's model info), or a registered name `textclf-<dataset>`. None for folders and
    checkpoints that do not say."""
    known = (getattr(model.spec, "extra", None) or {}).get("dataset")
    if known:
        return str(known)
    if not model_uri.startswith(("models:/", "runs:/")):
        return None
    import mlflow

    try:
        run_id = mlflow.models.get_model_info(model_uri).run_id
        tag = mlflow.MlflowClient().get_run(run_id).data.tags.get("dataset") if run_id else None
    except mlflow.exceptions.MlflowException:
        tag = None
    if tag:
        return tag
    name = model_uri[len("models:/"):].split("/")[0].split("@")[0] if model_uri.startswith("models:/") else ""
    return name[len("textclf-"):] if name.startswith("textclf-") else None


if __name__ == "__main__":
    restart_under_jemalloc()
    evaluate()
