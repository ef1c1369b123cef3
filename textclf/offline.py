"""A run's records kept on disk while its tracking server is unreachable, and uploaded later.

MLflow's client already retries every request for about four minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``):
an outage shorter than that only pauses training, and nothing is lost. Past it, MLflow raises, and a
training of hours would die with its checkpoints but without its records. So the run's main process
switches to offline mode: from then on each record (metrics, params, tags, artifacts, the model, its
registration, the end status) is appended to ``<output_dir>/offline/journal.jsonl``, artifacts copied beside
it, and training goes on. ``textclf sync <output_dir>`` uploads them into the same run once the server is
back. Written by hand: MLflow has no offline mode for a run that started online.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

FOLDER = "offline"
JOURNAL = "journal.jsonl"


def connection_error(exc: BaseException | None) -> BaseException | None:
    """The connection error or timeout behind an exception (MLflow wraps requests' errors), if any."""
    import requests

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class OfflineRecords:
    """The journal of one run: what could not reach the tracking server, in order."""

    def __init__(self, output_dir: Path, run_id: str):
        self.folder = Path(output_dir) / FOLDER
        self.run_id = run_id
        self.active = False  # True once the server was found unreachable: everything goes to the journal

    def go_offline(self, exc: BaseException) -> None:
        self.active = True
        self.folder.mkdir(parents=True, exist_ok=True)
        # Later calls (the end of the run, MLflow's own exit hook) must fail at once, not retry for minutes.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
        log.warning("the tracking server is unreachable (%s): training goes on and run %s's records are kept in %s; "
                    "upload them with `textclf sync %s` once it is back", type(exc).__name__, self.run_id,
                    self.folder, self.folder.parent)

    def add(self, op: str, **payload: Any) -> None:
        with open(self.folder / JOURNAL, "a") as journal:
            journal.write(json.dumps({"op": op, "run_id": self.run_id, "time": time.time(), **payload}) + "\n")

    def _add_files(self, local_path: str | Path, artifact_path: str | None) -> None:
        """Copy a file or folder aside (it may be temporary) and journal it as artifacts to upload."""
        local_path = Path(local_path)
        target = self.folder / "artifacts" / f"{time.time_ns()}"
        if local_path.is_dir():
            shutil.copytree(local_path, target)
        else:
            target.mkdir(parents=True)
            shutil.copy2(local_path, target / local_path.name)
        self.add("artifacts", local_dir=str(target.relative_to(self.folder)), artifact_path=artifact_path)

    def call(self, op: str, online: Callable[[], Any], files: Path | None = None, **payload: Any) -> Any:
        """Run ``online``; once the server is unreachable, journal ``op`` with ``payload`` instead (``files``:
        artifacts to copy aside). Returns what ``online`` returned, or None when journaled."""
        if not self.active:
            try:
                return online()
            except Exception as exc:  # noqa: BLE001 - only an unreachable server is turned into offline mode
                if connection_error(exc) is None:
                    raise
                self.go_offline(exc)
        if files is not None:
            self._add_files(files, payload["artifact_path"])
        else:
            self.add(op, **payload)
        return None


def pending(output_dir: Path) -> list[dict[str, Any]]:
    """The journal of ``output_dir`` not yet uploaded."""
    path = Path(output_dir) / FOLDER / JOURNAL
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sync(output_dir: Path) -> dict[str, Any]:
    """Upload the journal of ``output_dir`` into its run, in order; register the model if that was pending;
    end the run as it ended. Returns what was uploaded. Raises TextclfError when there is nothing to upload."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from textclf.errors import TextclfError

    output_dir = Path(output_dir)
    records = pending(output_dir)
    if not records:
        raise TextclfError(f"{output_dir}: no offline records to upload ({FOLDER}/{JOURNAL} is absent or empty)")
    client = mlflow.MlflowClient()
    run_id = records[-1]["run_id"]  # the folder's latest run (the one finished_run.json names)
    counts: dict[str, int] = {}
    end_status: dict[str, str] = {}
    for record in records:
        op, run_id = record["op"], record["run_id"]  # a resumed run may follow one that went offline
        counts[op] = counts.get(op, 0) + 1
        if op == "metrics":
            metrics = [Metric(k, float(v), int(record["time"] * 1000), record.get("step") or 0)
                       for k, v in record["metrics"].items()]
            client.log_batch(run_id, metrics=metrics)
        elif op == "params":
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in record["params"].items()])
        elif op == "tags":
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
        elif op == "artifacts":
            client.log_artifacts(run_id, str(output_dir / FOLDER / record["local_dir"]), record.get("artifact_path"))
        elif op == "model":
            from textclf import serving

            with mlflow.start_run(run_id=run_id):
                model_uri = serving.log_model(Path(record["model_dir"]), record["label_names"], record["examples"])
            counts["model_uri"] = model_uri
        elif op == "register":
            from textclf.config import run_config_from_dict
            from textclf.registry import register_run_model

            config = run_config_from_dict(record["config"])
            model_uri = counts.get("model_uri") or record.get("model_uri")
            version = register_run_model(run_id, model_uri, config, record["best"], record["test"])
            counts["registered_version"] = version
        elif op == "misclassified":
            import pandas as pd

            from textclf.evaluation import log_misclassified

            frame = pd.read_parquet(record["predictions"])
            probabilities = frame[[f"prob_{name}" for name in record["label_names"]]].to_numpy()
            with mlflow.start_run(run_id=run_id):
                log_misclassified(frame["text"].tolist(), frame["label_id"].tolist(), probabilities,
                                  record["label_names"])
        elif op == "end":
            end_status[run_id] = record["status"]
    for ended, status in end_status.items():
        client.set_terminated(ended, status)
    journal = output_dir / FOLDER / JOURNAL
    journal.rename(journal.with_name(f"journal.synced-{int(time.time())}.jsonl"))
    finished = output_dir / "finished_run.json"
    if finished.exists():  # the folder's record of its run now names the model it logged
        from textclf.checkpoints import write_json

        record = json.loads(finished.read_text())
        record.update({k: counts[k] for k in ("model_uri", "registered_version") if k in counts})
        write_json(finished, record)
    return {"run_id": run_id, "status": end_status.get(run_id), **counts}
