"""Keeping a run's final state under `mlflow run`, whose own bookkeeping would overwrite it.

When its command exits, `mlflow run` (MLflow 3.17, ``mlflow/projects/__init__.py``,
``_maybe_set_run_terminated``) means to end the run only if the command has not, but it compares the
status string with integer codes, so it always ends the run itself: FINISHED after a zero exit, FAILED
otherwise, and FAILED on Ctrl-C. A run textclf ended KILLED (interrupted) would read FAILED, and a run
textclf deleted (an empty duplicate of an already finished one) makes `mlflow run` crash.

So textclf leaves the run to `mlflow run` and hands the final word to a small detached process that
waits for `mlflow run` to exit, then sets the status textclf decided, or deletes the duplicate. Written
by hand: MLflow has no hook for this. Remove it once `mlflow run` honours a terminated run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import click


def parent_is_mlflow_run() -> bool:
    """Whether this process was started by `mlflow run` (directly, as bash execs a single command)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            arguments = handle.read().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"mlflow") for arg in arguments[:2]) and b"run" in arguments


def finish_after_mlflow_run(run_id: str, status: str | None = None, delete: bool = False) -> bool:
    """Once `mlflow run` (this process's parent) has exited, set ``status`` on ``run_id`` or delete it.
    Returns False (doing nothing) when the parent is not `mlflow run`."""
    if not parent_is_mlflow_run():
        return False
    command = [sys.executable, "-m", "textclf.records.project_run", "--wait-pid", str(os.getppid()), "--run-id", run_id]
    command += ["--status", status] if status else []
    command += ["--delete"] if delete else []
    subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, env=os.environ.copy())
    return True


@click.command()
@click.option("--wait-pid", type=int, required=True)
@click.option("--run-id", required=True)
@click.option("--status", default=None)
@click.option("--delete", is_flag=True)
@click.option("--timeout", type=float, default=600.0)
def main(wait_pid: int, run_id: str, status: str | None, delete: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{wait_pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    import mlflow

    client = mlflow.MlflowClient()
    if status:
        client.set_terminated(run_id, status)
    if delete:
        client.delete_run(run_id)


if __name__ == "__main__":
    main()
