"""Worker processes of a search on this machine (``workers=N``): the same command N-1 more times, each process
with its share of the cores, and one GPU each when there are enough (CUDA_VISIBLE_DEVICES, or every GPU). Every process is an
ordinary worker of the study (textclf.recipes.search); nothing is passed between them but the study."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

WORKER_STOP_SECONDS = 120  # after an interrupt, what worker processes get to end their runs before SIGKILL


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's list when set, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def worker_processes(args: tuple[str, ...], workers: int) -> Iterator[list[int]]:
    """``workers - 1`` more processes running the same command, each with its share of the cores (and one
    GPU each when there are enough); yields the list their exit codes go to. On an
    interrupt they get SIGTERM (their trials end KILLED and are queued again) and WORKER_STOP_SECONDS."""
    count = workers - 1
    codes: list[int] = []
    if count < 1:
        yield codes
        return
    from textclf.distributed.threads import plan_threads

    saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(plan_threads(workers).intra_op)
    gpus = visible_gpus()
    if gpus and len(gpus) < workers:
        log.warning("%d workers share %d GPU(s): a GPU each needs as many GPUs as workers", workers, len(gpus))
    if len(gpus) >= workers:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    # The workers import the code this process runs, wherever it was imported from.
    import entrypoints

    root = str(Path(entrypoints.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "entrypoints.search", *args, "--workers", "1"]
    processes = []
    for index in range(count):
        extra = {"CUDA_VISIBLE_DEVICES": gpus[index + 1]} if len(gpus) >= workers else {}
        processes.append(subprocess.Popen(command, env={**env, **extra}))
    log.info("started %d more worker processes (pids %s), %s threads each", count,
             ", ".join(str(p.pid) for p in processes), os.environ["OMP_NUM_THREADS"])
    try:
        yield codes
    except BaseException:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        _wait_all(processes, WORKER_STOP_SECONDS)
        raise
    else:
        _wait_all(processes, None)
    finally:
        codes.extend(p.returncode for p in processes)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    failed = [f"{p.pid}: {p.returncode}" for p in processes if p.returncode]
    if failed:
        log.warning("worker processes exited with errors (%s): their trials were recovered", ", ".join(failed))


def _wait_all(processes: list[subprocess.Popen], timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
