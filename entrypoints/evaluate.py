"""`evaluate` entry point: score a trained model on a test split and log the results in a new run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from entrypoints.common import debug_option, setup_logging, user_errors


@click.command(name="evaluate")
@click.option("--model_uri", required=True, help="models:/ or runs:/ URI, a saved model folder or a checkpoint")
@click.option("--data_path", required=True, help="a data folder with a test split, or one file")
@click.option("--max_test_samples", default="", help="cap on test rows (logged)")
@click.option("--batch_size", type=float, default=32, help="texts per forward pass")
@click.option("--experiment_name", default="", help="default textclf-<dataset>")
@debug_option
def evaluate(model_uri: str, data_path: str, max_test_samples: str, batch_size: float,
             experiment_name: str, debug: bool) -> None:
    """Evaluate MODEL_URI on the test split of DATA_PATH; log test metrics and artifacts to MLflow."""
    setup_logging()
    with user_errors(debug):
        max_test_samples = int(max_test_samples) if max_test_samples else None
        batch_size = int(batch_size)
        from textclf.config import DataConfig
        from textclf.data import load_test_split
        from textclf.evaluation import write_test_artifacts
        from textclf.inference import Predictor
        from textclf.model_sources import load_model_source
        from textclf import tracking

        loaded = load_model_source(model_uri)
        click.echo(f"{model_uri}: {loaded.kind}", err=True)
        names = loaded.model.spec.label_names
        test = load_test_split(Path(data_path), names, max_test_samples)
        dataset = DataConfig(data_path=data_path).name if Path(data_path).is_dir() else Path(data_path).parent.name
        tags = {"dataset": dataset, "model_uri": model_uri, "model_kind": loaded.kind, "entry_point": "evaluate"}
        with tracking.tracked_run(experiment_name or f"textclf-{dataset}", f"{dataset}-evaluate", tags) as run:
            import mlflow

            mlflow.log_params({"model_uri": model_uri[:500], "data_path": data_path[:500],
                               "max_test_samples": max_test_samples, "rows.test": len(test)})
            tracking.log_dataset(test, data_path, f"{dataset}-test", "test")
            predictor = Predictor(loaded.model, loaded.tokenizer, batch_size=batch_size, progress=True)
            probabilities = predictor.predict_proba(test["text"].tolist())
            with tempfile.TemporaryDirectory() as tmp:
                metrics = write_test_artifacts(Path(tmp), test["text"].tolist(), test["label"].tolist(),
                                               probabilities, names)
                mlflow.log_artifacts(tmp, artifact_path="test")
            tracking.log_metrics({f"test/{k}": v for k, v in metrics.items()})
            click.echo(f"run {run.info.run_id}: " + ", ".join(f"test {k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    evaluate()
