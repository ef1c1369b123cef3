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

from textclf.records.server_errors import connection_error

log = logging.getLogger(__name__)

FOLDER = "offline"
JOURNAL = "journal.jsonl"


class OfflineRecords:
    """The journal of one run: what could not reach the tracking server, in order."""

    # While offline, a call to the server (the end of the run, MLflow's own exit hook) fails at once instead of
    # retrying for minutes; the settings before are restored when the run ends (close).
    OFFLINE_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

    def __init__(self, output_dir: Path, run_id: str):
        self.folder = Path(output_dir) / FOLDER
        self.run_id = run_id
        self.active = False  # True once the server was found unreachable: everything goes to the journal
        self._settings_before: dict[str, str | None] = {}

    def go_offline(self, exc: BaseException) -> None:
        self.active = True
        self.folder.mkdir(parents=True, exist_ok=True)
        self._settings_before = {name: os.environ.get(name) for name in self.OFFLINE_SETTINGS}
        os.environ.update(self.OFFLINE_SETTINGS)
        log.warning("the tracking server is unreachable (%s): training goes on and run %s's records are kept in %s; "
                    "upload them with `textclf sync %s` once it is back", type(exc).__name__, self.run_id,
                    self.folder, self.folder.parent)

    def close(self) -> None:
        """The run is over: later runs of this process (a sweep's next seed, its parent) get MLflow's retries back."""
        for name, value in self._settings_before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._settings_before = {}

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


PROGRESS = "sync_progress.json"  # how far a sync of the journal got: a sync that stopped continues from there


def sync(output_dir: Path) -> dict[str, Any]:
    """Upload the journal of ``output_dir`` into its run, in order; register the model if that was pending;
    end the run as it ended. Returns what was uploaded. Raises TextclfError when there is nothing to upload.

    Safe to repeat after a failure at any point: each record uploaded is noted in ``offline/sync_progress.json``
    and not uploaded again, and the two records whose upload and note could be cut apart find their earlier
    result: a model the run already logged, a version already registered from the run."""
    import mlflow

    from textclf.components.checkpoints import write_json
    from textclf.errors import TextclfError

    output_dir = Path(output_dir)
    records = pending(output_dir)
    if not records:
        raise TextclfError(f"{output_dir}: no offline records to upload ({FOLDER}/{JOURNAL} is absent or empty)")
    client = mlflow.MlflowClient()
    progress_path = output_dir / FOLDER / PROGRESS
    journal_id = records[0]["time"]  # a progress note of an earlier journal of this folder does not apply
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    if progress.get("journal") != journal_id:
        progress = {"journal": journal_id, "done": 0, "results": {}}
    counts: dict[str, Any] = {}
    for index, record in enumerate(records):
        counts[record["op"]] = counts.get(record["op"], 0) + 1
        if index < progress["done"]:
            continue
        _upload(client, output_dir, record, progress["results"])
        progress["done"] = index + 1
        write_json(progress_path, progress)
    # The last status each run's journal recorded (a resumed run may follow one that went offline).
    end_status = {record["run_id"]: record["status"] for record in records if record["op"] == "end"}
    for ended, status in end_status.items():
        client.set_terminated(ended, status)
    counts.update(progress["results"])
    finished = output_dir / "finished_run.json"
    if finished.exists():  # the folder's record of its run now names the model it logged
        record = json.loads(finished.read_text())
        record.update({k: counts[k] for k in ("model_uri", "registered_version") if k in counts})
        write_json(finished, record)
    journal = output_dir / FOLDER / JOURNAL
    journal.rename(journal.with_name(f"journal.synced-{int(time.time())}.jsonl"))
    progress_path.unlink(missing_ok=True)
    run_id = records[-1]["run_id"]  # the folder's latest run (the one finished_run.json names)
    return {"run_id": run_id, "status": end_status.get(run_id), **counts}


def _upload(client, output_dir: Path, record: dict[str, Any], results: dict[str, Any]) -> None:
    """Upload one journal record into its run; ``results`` keeps the model URI and version it produced."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = record["op"], record["run_id"]
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
        results["model_uri"] = _logged_model(client, run_id)
        if results["model_uri"] is None:
            from textclf import serving

            with mlflow.start_run(run_id=run_id):
                results["model_uri"] = serving.log_model(Path(record["model_dir"]), record["label_names"],
                                                         record["examples"])
    elif op == "register":
        from textclf.config import run_config_from_dict
        from textclf.records.registry import register_run_model, registered_model_name, version_of_run

        config = run_config_from_dict(record["config"])
        existing = version_of_run(registered_model_name(config.dataset_name), run_id)
        if existing:
            results["registered_version"] = existing
        else:
            model_uri = results.get("model_uri") or record.get("model_uri")
            results["registered_version"] = register_run_model(run_id, model_uri, config, record["best"],
                                                               record["test"], record.get("data"))
    elif op == "misclassified":
        import pandas as pd

        from textclf.components.evaluation import log_misclassified

        frame = pd.read_parquet(record["predictions"])
        probabilities = frame[[f"prob_{name}" for name in record["label_names"]]].to_numpy()
        with mlflow.start_run(run_id=run_id):  # leaves a table already logged as it is
            log_misclassified(frame["text"].tolist(), frame["label_id"].tolist(), probabilities, record["label_names"])


def _logged_model(client, run_id: str) -> str | None:
    """The URI of the complete model ``model`` that run ``run_id`` logged, if any."""
    import mlflow

    experiment_id = client.get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run_id}' AND name = 'model'")
    ready = [model for model in found if str(model.status).endswith("READY")]
    return ready[0].model_uri if ready else None
