"""DeepSpeed ZeRO-3: the config built from a run's parameters, the multi-process launch, and gathering the
trained weights into one model.

The training itself is :func:`textclf.recipes.training.run_training`, unchanged: the Trainer drives the
DeepSpeed engine when ``TrainingArguments(deepspeed=...)`` is set.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from textclf.components.checkpoints import WEIGHTS_FILE
from textclf.distributed.ranks import is_main_process
from textclf.distributed.threads import configure_threads, plan_threads
from textclf.errors import TextclfError, TrainingInterrupted
from textclf.process.signals import SAME_INTERRUPT_SECONDS

log = logging.getLogger(__name__)

OFFLOADS = ("none", "cpu")


def build_deepspeed_config(precision: str, offload: str = "none", user_file: str | None = None) -> dict:
    """ZeRO-3 with 16-bit gathering on save; ``auto`` values are filled by the Trainer from the run's
    batch size, accumulation and clipping. ``user_file`` replaces it all. Raises TextclfError."""
    if offload not in OFFLOADS:
        raise TextclfError(f"invalid offload {offload!r}: choose one of {', '.join(OFFLOADS)}")
    if user_file:
        path = Path(user_file)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TextclfError(f"{path}: cannot read the DeepSpeed config ({exc})") from None
    zero: dict = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    if offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Nodes:
    """The machines of a run: torchrun's static rendezvous (every node starts the same command with its rank)."""

    count: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, only possible on one node

    def __post_init__(self):
        if self.count < 1:
            raise TextclfError(f"num_nodes must be at least 1, got {self.count}")
        if not 0 <= self.rank < self.count:
            raise TextclfError(f"node_rank must be in [0, {self.count}), got {self.rank}")
        if self.count > 1 and not self.master_port:
            raise TextclfError("master_port is required with num_nodes > 1: the same free port of the node_rank 0 "
                               "machine on every node")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Set in the ranks when OMP_NUM_THREADS is the launcher's share of the cores, not the user's choice.
RANK_THREADS_FROM_LAUNCHER = "TEXTCLF_RANK_THREADS_FROM_LAUNCHER"

# How long torchrun lets ranks stopped by a signal end their step and their run before SIGKILL (its default: 30 s).
# After a rank has failed, the others get a few seconds only (textclf.distributed.torchrun).
SHUTDOWN_SECONDS = 120


def launch(num_procs: int, worker_args: list[str], nodes: Nodes = Nodes()) -> int:
    """Run ``python -m entrypoints.train_deepspeed --worker ...`` on ``num_procs`` local processes with
    torchrun (gloo on CPU, NCCL on GPUs), as node ``nodes.rank`` of ``nodes.count``; return its exit code.
    torchrun stops every rank when one fails. Raises TrainingInterrupted, once the ranks have stopped, when
    this process was sent SIGINT or SIGTERM."""
    if num_procs < 1:
        raise TextclfError(f"num_procs must be at least 1, got {num_procs}")
    if nodes.count == 1 and not nodes.master_port:
        rendezvous = ["--standalone"]  # torchrun finds a free port on this machine itself
    else:
        rendezvous = [f"--nnodes={nodes.count}", f"--node_rank={nodes.rank}", f"--master_addr={nodes.master_addr}",
                      f"--master_port={nodes.master_port}"]
    command = [sys.executable, "-m", "textclf.distributed.torchrun", f"--nproc_per_node={num_procs}", *rendezvous,
               f"--shutdown_timeout={SHUTDOWN_SECONDS}", "-m", "entrypoints.train_deepspeed", "--worker", *worker_args]
    # Each rank's OpenMP pool from its start, by the one rule of textclf.distributed.threads (a user's OMP_NUM_THREADS wins).
    env = {**os.environ, "OMP_NUM_THREADS": str(plan_threads(ranks_sharing=num_procs).intra_op)}
    if "OMP_NUM_THREADS" not in os.environ:
        env[RANK_THREADS_FROM_LAUNCHER] = "1"
    # torchrun (which puts each rank in a session of its own) in a session of its own too, so that a terminal's
    # Ctrl-C reaches only this process; signals are passed on to it, by textclf.process.signals' rule: a repeat within
    # SAME_INTERRUPT_SECONDS is the same interrupt (under `mlflow run`, Ctrl-C arrives as SIGINT then SIGTERM),
    # and at most one later, insisting signal follows (a third one makes torchrun exit and orphan its ranks).
    # torchrun then stops the ranks with the signal it got and waits for them (up to the shutdown timeout,
    # SHUTDOWN_SECONDS: a rank stops after its current step, evaluation or save).
    passed_on: list[tuple[int, float]] = []  # (signal, when)
    torchrun: subprocess.Popen | None = None

    def pass_on(signum, _frame):
        now = time.monotonic()
        if passed_on and (now - passed_on[-1][1] < SAME_INTERRUPT_SECONDS or len(passed_on) >= 2):
            return
        passed_on.append((signum, now))
        if torchrun is not None and torchrun.poll() is None:
            torchrun.send_signal(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, pass_on) for sig in handled}  # before torchrun exists: no gap
    try:
        torchrun = subprocess.Popen(command, env=env, start_new_session=True)
        if passed_on:  # a signal came while it started
            torchrun.send_signal(passed_on[0][0])
        code = torchrun.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if passed_on and code != 0:  # the ranks ended their run KILLED: not a failure
        raise TrainingInterrupted(signal.Signals(passed_on[0][0]).name)
    return code


def leave_process_group() -> None:
    """Every rank, at the same point: barrier, then destroy the process group (without the barrier, rank 1 was seen
    aborting at exit after MLflow logging). A rank that goes on alone afterwards takes the cores of its machine,
    unless the user chose the thread count (textclf.distributed.threads)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        if os.environ.pop(RANK_THREADS_FROM_LAUNCHER, None):
            os.environ.pop("OMP_NUM_THREADS", None)
            configure_threads(ranks_sharing=1)


def free_engine(trainer) -> None:
    """Drop the DeepSpeed engine's partitions and optimizer state: the rebuilt model takes their place in memory
    (on a GPU, the full fp32 model beside the engine could run out of memory)."""
    import gc

    import torch

    trainer.accelerator.free_memory()
    trainer.model_wrapped = trainer.model
    trainer.optimizer = trainer.lr_scheduler = trainer.deepspeed = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def consolidate(trainer, model, folder: Path):
    """Gather ZeRO-3 shards into one state dict (every rank must call this; the ranks then leave their process
    group), and on rank 0 rebuild a plain in-memory model from it. Raises TextclfError when the gathered weights
    are incomplete (a ZeRO-3 save of a few hundred KB is a known failure)."""
    import numpy as np
    from safetensors import safe_open
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from textclf.components.model import rebuild_from_state

    # Writes the weights and, on rank 0, the training collator's tokenizer (the Trainer saves it with them).
    trainer.save_model(str(folder))
    free_engine(trainer)  # while the process group lives: the engine's teardown asks for its rank
    # The ranks part here. What follows is rank 0's alone and may take long (rebuilding here, then calibration,
    # test and logging), so no rank waits for it in a collective with a timeout.
    leave_process_group()
    # Training is over: without this, loading the base model below would start a ZeRO-3 partitioned load.
    unset_hf_deepspeed_config()
    if not is_main_process():
        return None
    model.spec.save(folder)
    rebuilt, _ = rebuild_from_state(folder, folder / WEIGHTS_FILE)
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as weights:
        saved = sum(int(np.prod(weights.get_slice(key).get_shape())) for key in weights.keys())
    expected = sum(p.numel() for p in rebuilt.state_dict().values())
    if saved != expected:
        raise TextclfError(f"{folder}: consolidated weights hold {saved} values, the model has {expected}")
    log.info("consolidated %d parameters into %s", saved, folder)
    return rebuilt
