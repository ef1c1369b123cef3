"""Thread counts, chosen on purpose and logged: a CPU training must not slow itself down by running
more threads than it has cores.

torch parallelises each op over its intra-op threads (OpenMP) and may run independent ops on
inter-op threads; the tokenizers library has its own pool; DeepSpeed starts one process per rank on
the same cores. Left to their defaults on a 2-core machine these overlap: each rank takes every core,
and when anything else is busy, OpenMP's threads spin at every barrier waiting for a thread that is
not running (docs/benchmarks.md, scripts/bench_threads.py). So:

- intra-op threads = the cores this process may use (its CPU affinity, not the machine's count),
  divided among the ranks that share them; ``OMP_NUM_THREADS``, when a user sets it, wins;
- one inter-op thread: a training step is a chain of ops, there is nothing to overlap;
- OpenMP's wait policy is left as it is: passive waiting helps when another job takes a core but costs the
  default model's LoRA step 25-35% alone (its many small ops pay a wake-up each); on a shared machine set
  ``OMP_WAIT_POLICY=PASSIVE`` (docs/benchmarks.md). It is logged with the thread counts;
- no tokenizers pool (``TOKENIZERS_PARALLELISM=false``): tokenizing happens once, before training,
  and its pool would otherwise stay alive beside torch's threads (and warns after a fork).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPlan:
    cores: int  # CPUs this process may run on
    ranks_sharing: int  # processes of this training on the same machine
    intra_op: int
    inter_op: int
    source: str  # why intra_op has this value

    def as_params(self) -> dict[str, str]:
        return {"threads.cores": str(self.cores), "threads.ranks_sharing": str(self.ranks_sharing),
                "threads.intra_op": str(self.intra_op), "threads.inter_op": str(self.inter_op),
                "threads.source": self.source, "threads.omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_threads(ranks_sharing: int | None = None) -> ThreadPlan:
    """The thread counts for this process. ``ranks_sharing`` defaults to ``LOCAL_WORLD_SIZE`` (set by the
    DeepSpeed and torchrun launchers for the ranks on this machine), else 1."""
    cores = available_cores()
    ranks = ranks_sharing or int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:
        return ThreadPlan(cores, ranks, int(requested), 1, "OMP_NUM_THREADS")
    return ThreadPlan(cores, ranks, max(1, cores // ranks), 1, "cores / ranks")


def apply_threads(plan: ThreadPlan) -> ThreadPlan:
    """Set torch's thread pools (and the tokenizers one) as planned. The inter-op pool can only be sized
    before its first use: if something already used it, its size is left and reported as it is."""
    import torch

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(plan.intra_op)
    try:
        torch.set_num_interop_threads(plan.inter_op)
    except RuntimeError:
        pass  # already started in this process; the plan records the real size below
    applied = ThreadPlan(plan.cores, plan.ranks_sharing, torch.get_num_threads(), torch.get_num_interop_threads(),
                         plan.source)
    log.info("threads: %d intra-op, %d inter-op (%d cores, %d rank(s), from %s)", applied.intra_op,
             applied.inter_op, applied.cores, applied.ranks_sharing, applied.source)
    return applied


def configure_threads(ranks_sharing: int | None = None) -> ThreadPlan:
    return apply_threads(plan_threads(ranks_sharing))
