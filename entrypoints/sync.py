"""`textclf sync`: upload the records a training kept on disk while its tracking server was unreachable."""

from __future__ import annotations

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, user_errors


@click.command(name="sync", context_settings=COMMAND_SETTINGS)
@click.argument("output_dir", type=click.Path(file_okay=False))
@debug_option
def sync(output_dir: str, debug: bool) -> None:
    """Upload OUTPUT_DIR's offline records (metrics, artifacts, model, registration, end status) into its run."""
    setup_logging()
    with user_errors(debug):
        from pathlib import Path

        from textclf.records.offline import sync as upload

        done = upload(Path(output_dir))
        click.echo(f"run {done['run_id']}: uploaded {done.get('metrics', 0)} metric records, "
                   f"{done.get('artifacts', 0)} artifact sets"
                   + (f", the model ({done['model_uri']})" if "model_uri" in done else "")
                   + (f", registered version {done['registered_version']}" if "registered_version" in done else "")
                   + (f"; run ended {done['status']}" if done.get("status") else ""))


if __name__ == "__main__":
    sync()
