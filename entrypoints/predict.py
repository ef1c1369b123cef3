"""`textclf predict`: predictions with probabilities for a JSONL, CSV or Parquet file."""

from __future__ import annotations

from pathlib import Path

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, user_errors
from textclf.process.allocator import restart_under_jemalloc

WRITERS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@click.command(name="predict", context_settings=COMMAND_SETTINGS)
@click.option("--model", "model_uri", required=True, help="models:/ or runs:/ URI, a saved model folder or a checkpoint")
@click.option("--input", "input_path", required=True, help="a .jsonl, .json, .csv or .parquet file with a text column")
@click.option("--output", "output_path", required=True, help="where to write predictions (.jsonl, .csv or .parquet)")
@click.option("--batch_size", "--batch-size", type=int, default=32, help="texts per forward pass")
@debug_option
def predict(model_uri: str, input_path: str, output_path: str, batch_size: int, debug: bool) -> None:
    """Predict the class of every text in INPUT; write the input columns plus label, score and probabilities."""
    setup_logging()
    with user_errors(debug):
        import pandas as pd

        from textclf.components.data import FORMATS, TEXT_COLUMNS, pick_column, read_table
        from textclf.errors import TextclfError
        from textclf.serving.inference import Predictor
        from textclf.serving.pyfunc import output_frame
        from textclf.serving.sources import load_model_source

        source, target = Path(input_path), Path(output_path)
        if not source.exists():
            raise TextclfError(f"{source}: input file does not exist")
        if source.suffix.lower() not in FORMATS:
            raise TextclfError(f"{source}: unsupported format; use one of {', '.join(FORMATS)}")
        if target.suffix.lower() not in WRITERS:
            raise TextclfError(f"{target}: unsupported output format; use one of {', '.join(WRITERS)}")
        frame, _ = read_table(source)
        column = pick_column(frame, TEXT_COLUMNS, "text", source)
        loaded = load_model_source(model_uri)
        predictor = Predictor(loaded.model, loaded.tokenizer, batch_size=batch_size, progress=True)
        texts = frame[column].tolist()
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise TextclfError(f"{source}: row {bad[0] + 1} has no text")
        result = pd.concat([frame.reset_index(drop=True),
                            output_frame(predictor.predict_proba(texts), loaded.model.spec.label_names)], axis=1)
        partial = target.with_name(target.name + ".partial")  # never leave a half-written output
        target.parent.mkdir(parents=True, exist_ok=True)
        kind = WRITERS[target.suffix.lower()]
        if kind == "jsonl":
            result.to_json(partial, orient="records", lines=True, force_ascii=False)
        elif kind == "csv":
            result.to_csv(partial, index=False)
        else:
            result.to_parquet(partial, index=False)
        partial.replace(target)
        click.echo(f"{len(result)} prediction{'' if len(result) == 1 else 's'} written to {target}", err=True)


if __name__ == "__main__":
    restart_under_jemalloc()
    predict()
