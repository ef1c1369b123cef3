"""Everything MLflow about a run: its lifecycle, the training callback, inputs and artifacts.

Only the main process (rank 0) talks to MLflow. Under ``mlflow run`` the run MLflow created is
honoured; started directly, the run goes to experiment ``textclf-<dataset>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pandas as pd
import psutil
import torch
from mlflow.exceptions import MlflowException
from transformers import TrainerCallback

from textclf.components.evaluation import log_misclassified, write_confusion, write_test_artifacts
from textclf.config import RunConfig, flatten
from textclf.distributed.ranks import is_main_process, max_over_ranks, sum_over_ranks
from textclf.errors import TextclfError, TrainingInterrupted
from textclf.process.signals import interrupts_raise
from textclf.records.offline import OfflineRecords
from textclf.records.server_errors import connection_error
from textclf.records.store import sqlite_lock

log = logging.getLogger(__name__)


@contextlib.contextmanager
def tracked_run(
    experiment_name: str, run_name: str, tags: dict[str, str], nested: bool = False, offline_dir: Path | None = None
) -> Iterator[mlflow.ActiveRun | None]:
    """Start (or attach to, under ``mlflow run``) the run; end it FINISHED, FAILED or KILLED.

    ``nested`` starts a child of the active run (a sweep's seed). An exception ends the run FAILED
    with the error as tag ``error``; SIGINT/SIGTERM ends it KILLED. The exception is re-raised.
    With ``offline_dir``, a tracking server that becomes unreachable does not stop the run: its records go
    to ``offline_dir`` (textclf.records.offline) until `textclf sync` uploads them.
    On ranks other than 0, yields None and logs nothing.
    """
    if not is_main_process():
        with interrupts_raise():
            yield None
        return
    attach = bool(os.environ.get("MLFLOW_RUN_ID")) and not nested  # the run `mlflow run` created
    with store_lock():
        if not attach and not nested:
            mlflow.set_experiment(experiment_name)
    # System metrics (CPU, memory, GPU where present) fill the run page's "System metrics" tab; MLflow's own
    # switch MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off.
    system_metrics = None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True
    run = mlflow.start_run(run_name=None if attach else run_name, nested=nested, log_system_metrics=system_metrics)
    outer_records = _Offline.records
    _Offline.records = OfflineRecords(offline_dir, run.info.run_id) if offline_dir is not None else None
    try:
        with interrupts_raise():
            if attach and run.info.experiment_id == "0":
                log.warning("this run is in MLflow's Default experiment: pass --experiment-name %s to `mlflow run` "
                            "to file it with the others", experiment_name)
            # Inside the try: a run whose first tags fail ends FAILED, not RUNNING. Also under `mlflow run`, which
            # named the run itself (randomly): the name is the one the user asked for.
            mlflow.set_tags({**tags, **process_tags(), "mlflow.runName": run_name})
            yield run
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        _end_with_error("KILLED", exc)
        if attach:
            from textclf.records.project_run import finish_after_mlflow_run

            finish_after_mlflow_run(run.info.run_id, status="KILLED")  # `mlflow run` would mark it FAILED
        raise
    except BaseException as exc:
        _end_with_error("FAILED", exc)
        raise
    else:
        _end("FINISHED")
    finally:
        if _Offline.records is not None:
            _Offline.records.close()
        _Offline.records = outer_records


class _Offline:
    """The journal of the run being tracked in this process (None: a server that fails stops the run)."""

    records: OfflineRecords | None = None


def keep_or_call(op: str, online, files: Path | None = None, **payload):
    """``online()``; once the tracking server is unreachable, ``op`` and ``payload`` (and a copy of ``files``)
    kept for `textclf sync` (then returns None). Without an offline journal (not a training run), ``online()``."""
    records = _Offline.records
    return online() if records is None else records.call(op, online, files=files, **payload)


def _end(status: str) -> None:
    records = _Offline.records
    if records is not None and records.active:
        records.add("end", status=status)
        with contextlib.suppress(Exception):  # pops MLflow's active run; the server cannot be told
            mlflow.end_run(status)
        return
    keep_or_call("end", lambda: mlflow.end_run(status), status=status)


def log_artifacts(local_path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a folder's files as artifacts of the active run (kept on disk while offline)."""
    local_path = Path(local_path)
    upload = (lambda: mlflow.log_artifacts(str(local_path), artifact_path)) if local_path.is_dir() else (
        lambda: mlflow.log_artifact(str(local_path), artifact_path))
    keep_or_call("artifacts", upload, files=local_path, artifact_path=artifact_path)


def attached_run_id() -> str | None:
    """The run `mlflow run` created for this process (MLflow passes it as MLFLOW_RUN_ID), if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def discard_attached_run(reason: str) -> None:
    """Delete the empty run `mlflow run` created when the command had nothing to do (its run had already
    finished), once `mlflow run` has exited: the experiment keeps one run per training."""
    from textclf.records.project_run import finish_after_mlflow_run

    run_id = attached_run_id()
    if run_id is None or not is_main_process():
        return
    mlflow.MlflowClient().set_tag(run_id, "textclf.discarded", reason[:5000])
    finish_after_mlflow_run(run_id, delete=True)


def fail_attached_run(message: str) -> None:
    """Record a refusal that came before our run started (bad data, bad parameters) on the run `mlflow run`
    created, and end it FAILED, so the UI says why."""
    run_id = attached_run_id()
    if run_id is None or not is_main_process():
        return
    with contextlib.suppress(Exception):
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "error", message[:5000])
            client.set_terminated(run_id, "FAILED")


def process_tags() -> dict[str, str]:
    """Who is running this run: a later start ends it only once this process is gone (see end_dead_runs)."""
    return {"textclf.host": socket.gethostname(), "textclf.pid": str(os.getpid()),
            "textclf.pid_started": f"{psutil.Process().create_time():.2f}"}


def process_is_alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` still runs and is the process that started at ``started`` (pids are reused)."""
    try:
        process = psutil.Process(pid)
        return started is None or f"{process.create_time():.2f}" == started
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # exists but cannot be inspected: assume alive, never end a live run


def end_dead_runs(output_dir: str, status: str = "KILLED",
                  reason: str = "died without ending the run; ended by the next start for its output folder",
                  ended: tuple[str, ...] = (), since_ms: int = 0) -> list[str]:
    """End ``status`` the RUNNING runs for ``output_dir`` whose process is gone (``kill -9``, a power cut, a
    DeepSpeed rank torchrun killed), whatever their experiment; with ``ended``, also the runs already ended with
    one of those statuses (the DeepSpeed launcher marks FAILED the run a rank ended KILLED because another rank
    failed). Only runs started since ``since_ms``. Runs of other hosts (whose processes cannot be checked from
    here) are left alone. Returns the ids of the runs ended. Raises TextclfError when a live process of this host
    is training into ``output_dir``."""
    if not is_main_process():
        return []
    with store_lock():  # may be the first contact with a new store
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.output_dir = '{output_dir}' and attributes.start_time >= "
                                                f"{since_ms}")
    client = mlflow.MlflowClient()
    done = []
    for run in runs:
        tags = run.data.tags
        if run.info.status not in ("RUNNING", *ended) or run.info.run_id == os.environ.get("MLFLOW_RUN_ID"):
            continue
        if run.info.status == "RUNNING":
            if "textclf.pid" not in tags:
                continue
            if tags.get("textclf.host") != socket.gethostname():
                log.warning("run %s for %s is RUNNING on host %s: not ended from here", run.info.run_id, output_dir,
                            tags.get("textclf.host"))
                continue
            if process_is_alive(int(tags["textclf.pid"]), tags.get("textclf.pid_started")):
                # Two processes training into one folder would overwrite each other's checkpoints and model.
                raise TextclfError(f"{output_dir}: run {run.info.run_id} of process {tags['textclf.pid']} is training "
                                   "into this folder now; wait for it, or choose another run_name or output_dir")
        client.set_tag(run.info.run_id, "error", f"process {tags.get('textclf.pid', '?')} {reason}")
        client.set_terminated(run.info.run_id, status)
        done.append(run.info.run_id)
    if done:
        log.warning("ended %s the runs of dead processes for %s: %s", status, output_dir, ", ".join(done))
    return done


def store_lock():
    """Serialize first contact with a local sqlite store (textclf.records.store): it may create the database."""
    return sqlite_lock(first_contact=True)


def check_registrable(dataset: str, dataset_digest: str) -> None:
    """Raises TextclfError when textclf-<dataset> holds versions of another dataset (textclf.records.registry)."""
    from textclf.records.registry import check_same_dataset, registered_model_name

    if is_main_process():
        with store_lock():  # may be the first contact with a new store
            check_same_dataset(registered_model_name(dataset), dataset_digest)


def _end_with_error(status: str, exc: BaseException) -> None:
    message = str(exc) or type(exc).__name__
    with contextlib.suppress(Exception):
        error = f"{type(exc).__name__}: {message}"[:5000]
        keep_or_call("tags", lambda: mlflow.set_tag("error", error), tags={"error": error})
    _end(status)


def log_config(config: RunConfig, searched: dict[str, str] | None = None) -> None:
    """The config as params and ``config.json``. ``searched`` (parameter -> its range, a search's parent run)
    replaces those parameters' values, which differ from trial to trial: the parent records what ran."""
    searched = searched or {}
    params = flatten(config)
    mlflow.log_params({k: f"searched: {searched[k.rsplit('.', 1)[-1]]}" if k.rsplit(".", 1)[-1] in searched else v
                       for k, v in params.items()})
    values = config.to_dict()
    for section in (values, *(v for v in values.values() if isinstance(v, dict))):
        for name in searched.keys() & section.keys():
            section[name] = f"searched: {searched[name]}"
    mlflow.log_text(json.dumps(values, indent=2, sort_keys=True), "config.json")


def log_run_inputs(config: RunConfig, splits, precision: str, resume_from: Path | None,
                   process_params: dict[str, str], deepspeed: dict | None) -> None:
    """What a training run starts from: its config (params and ``config.json``), resolved precision, labels and
    row counts, data notes, the datasets with their digests, the process's thread counts and the DeepSpeed
    config. ``splits`` is the run's textclf.components.data.LabeledSplits."""
    log_config(config)
    mlflow.log_params({"resolved.precision": precision, "data.label_names": json.dumps(splits.label_names)[:500],
                       "data.label_source": splits.label_source,
                       **{f"data.rows.{k}": v for k, v in splits.summary().items()}})
    if splits.notes:
        mlflow.log_text("\n".join(splits.notes) + "\n", "data_notes.txt")
    if resume_from:
        mlflow.set_tag("resumed_from", str(resume_from))
    source = str(config.data.resolved_path())
    log_dataset(splits.train, source, f"{config.dataset_name}-train", "training")
    log_dataset(splits.validation, source, f"{config.dataset_name}-validation", "validation")
    if splits.test is not None:
        log_dataset(splits.test, source, f"{config.dataset_name}-test", "test")
    log_process_params(process_params)
    if deepspeed is not None:
        mlflow.log_dict(deepspeed, "deepspeed_config.json")
        mlflow.log_param("deepspeed.world_size", os.environ.get("WORLD_SIZE", "1"))


def confirm_finished_run(run_id: str, output_dir: Path, recorded_uri: str | None) -> None:
    """Check that the tracking store still has the run recorded as finished in ``output_dir``. Raises
    TextclfError when the store cannot be reached, or no longer has that run (deleted, or another store is in
    use; ``recorded_uri`` is the store the folder recorded)."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if connection_error(exc) is not None:
            raise TextclfError(f"{output_dir}: holds finished run {run_id}, but the tracking server at "
                               f"{mlflow.get_tracking_uri()} cannot be reached to confirm it") from None
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise TextclfError(
            f"{output_dir}: holds finished run {run_id}, which the tracking store {mlflow.get_tracking_uri()} "
            f"does not have (recorded in {recorded_uri}); remove the folder, or choose another "
            "run_name or output_dir"
        )


def log_process_params(params: dict[str, str]) -> None:
    """Params that describe the process, not the recipe (thread counts). A resumed run may run with other
    values, and MLflow refuses to change a logged param: a changed value goes to tag ``<name>.resumed``."""
    run = mlflow.active_run()
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    changed = {f"{k}.resumed": v for k, v in params.items() if k in logged and logged[k] != v}
    if changed:
        mlflow.set_tags(changed)


def log_dataset(frame: pd.DataFrame, source: str, name: str, context: str, attempts: int = 3) -> None:
    """Log the split as the run's input. MLflow's stores look an experiment's dataset up and then insert it, so two
    runs logging the same new dataset at once (a sweep's seeds, search workers, teammates) race: the second insert
    breaks the datasets' unique key and the store refuses the call. Logged again, it finds the first run's row."""
    dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets="label")
    for attempt in range(1, attempts + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            if attempt == attempts or not is_duplicate_dataset(exc):
                raise
            log.info("dataset %s was logged by another run at the same moment: logging it again", name)


def is_duplicate_dataset(exc: Exception) -> bool:
    """Whether a store refused a dataset because another run inserted it first: PostgreSQL behind a server
    ("duplicate key ... dataset_pk"), sqlite ("UNIQUE constraint failed: datasets...")."""
    message = str(exc)
    return "dataset_pk" in message or "UNIQUE constraint failed: datasets." in message


def log_test_results(folder: Path, texts: list[str], labels: list[int], probabilities, label_names: list[str],
                     uncalibrated=None) -> dict[str, float]:
    """Score test predictions, write the test artifacts into ``folder`` (textclf.components.evaluation.write_test_artifacts)
    and log them to the active run: ``test/*`` metrics, the ``test/`` artifacts and the table of misclassified
    rows (kept on disk while the tracking server is unreachable). Returns the metrics. The one way a trained run,
    ``evaluate`` and the zero-shot baseline report a test split."""
    metrics = write_test_artifacts(folder, texts, labels, probabilities, label_names, uncalibrated=uncalibrated)
    log_metrics({f"test/{k}": v for k, v in metrics.items()})
    log_artifacts(folder, artifact_path="test")
    keep_or_call("misclassified", lambda: log_misclassified(texts, labels, probabilities, label_names),
                 predictions=str((folder / "predictions.parquet").resolve()), label_names=label_names)
    return metrics


def log_table_replacing(frame: pd.DataFrame, artifact_file: str) -> None:
    """Log ``frame`` as the MLflow table ``artifact_file`` of the active run (the UI shows, sorts and filters it),
    replacing a table logged there before: ``mlflow.log_table`` would append to it, and a run logged again (a
    continued search) would list each row twice."""
    run_id = mlflow.active_run().info.run_id
    folder, _, name = artifact_file.rpartition("/")
    client = mlflow.MlflowClient()
    if artifact_file not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        mlflow.log_table(frame, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the file log_table writes, without reading the old one
        frame.to_json(Path(tmp) / name, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(Path(tmp) / name), folder or None)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if finite and is_main_process():
        keep_or_call("metrics", lambda: mlflow.log_metrics(finite, step=step), metrics=finite, step=step)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MlflowTrainingCallback(TrainerCallback):
    """Logs Trainer events to the active run with steps, one confusion matrix per evaluation,
    throughput (samples/s, tokens/s, padding fraction, peak memory), and stops on a NaN/inf loss.

    Throughput counts the rows and tokens of every rank (each rank counts its own; they are summed when the
    Trainer logs, on every rank at the same step) over the time spent in training steps: evaluations, saves
    and logging (artifact uploads) are not training.

    Written by hand rather than transformers' MLflowCallback: that one starts runs itself, names
    metrics its own way, and logs no confusion matrices or throughput.
    """

    TRAIN_KEYS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}

    def __init__(self, counts, evaluation_state: dict[str, Any]):
        self.counts = counts  # the rows and tokens trained on (trainer_setup.BatchCounts, filled by the Trainer)
        self.evaluation_state = evaluation_state  # filled by compute_metrics with the latest confusion
        self.step_started = 0.0
        self.train_seconds = 0.0  # in training steps (forward, backward, optimizer) since this process began
        self.eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_seconds = self.eval_seconds = 0.0
        self.counts.reset()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and (control.should_log or control.should_evaluate or control.should_save):
            # A GPU runs behind the host: before the time is read (and before an evaluation starts queueing its own
            # work), it catches up, so that the training steps' GPU time is counted in them. Only at these steps.
            torch.cuda.synchronize()
        self.train_seconds += time.perf_counter() - self.step_started

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TextclfError(f"training loss is {loss} at step {state.global_step}: stopping the run")
        self.eval_seconds += logs.get("eval_runtime", 0.0)
        metrics = {self.TRAIN_KEYS[k]: v for k, v in logs.items() if k in self.TRAIN_KEYS}
        metrics.update({f"eval/{k[5:]}": v for k, v in logs.items() if k.startswith("eval_") and "runtime" not in k
                        and "per_second" not in k})
        if "loss" in logs:
            metrics.update(self.throughput(args.device))
            metrics["train/planned_steps"] = state.max_steps  # moves where fit_to_budget sizes the run
        if "train_runtime" in logs:  # the Trainer's last log: wall time of train(), evaluations included
            metrics.update({"train/runtime_seconds": logs["train_runtime"], "train/eval_seconds": self.eval_seconds,
                            "train/step_seconds": self.step_seconds(args.device)})
        log_metrics(metrics, step=state.global_step)

    def step_seconds(self, device) -> float:
        """The run's time in training steps: the slowest rank's (every rank calls this at the same step)."""
        return max_over_ranks([max(self.train_seconds, 1e-9)], device)[0]

    def throughput(self, device) -> dict[str, float]:
        """Every rank calls this at the same step: its counts are summed over the ranks (one all-reduce) and
        divided by the run's time in training steps."""
        totals = self.counts.totals()
        samples, real, padded = sum_over_ranks([totals["samples"], totals["real_tokens"], totals["padded_tokens"]],
                                               device)
        seconds = self.step_seconds(device)
        return {
            "train/samples_per_second": samples / seconds,
            "train/tokens_per_second": real / seconds,
            "train/pad_fraction": 1 - real / max(padded, 1),
            "train/peak_memory_mb": peak_memory_mb(),
        }

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        latest = self.evaluation_state.get("confusion")
        if latest is None or not is_main_process():
            return
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_confusion(latest, Path(tmp) / f"confusion_matrix_step_{state.global_step}",
                                        f"validation, step {state.global_step}"):
                log_artifacts(path, artifact_path="eval")
