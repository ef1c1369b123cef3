"""Which process this is among the ranks of a run, and the few values the ranks agree on.

A run of several processes (DeepSpeed under torchrun) has one main process, global rank 0: only it talks to MLflow
and writes an output folder's records. This module is the one place that decides it: torchrun sets ``RANK`` in each
process it starts, and a process without it is a run of its own, hence the main one. The collectives below must be
called by every rank at the same point; in a single process they return their argument.
"""

from __future__ import annotations

import os
from typing import Any


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` is set on any rank (one 1-element all-reduce, on the Trainer's device)."""
    return bool(_reduce([float(flag)], device, "max")[0])


def sum_over_ranks(values: list[float], device) -> list[float]:
    """Each value summed over the ranks (one all-reduce)."""
    return _reduce(values, device, "sum")


def max_over_ranks(values: list[float], device) -> list[float]:
    """Each value's largest over the ranks (one all-reduce)."""
    return _reduce(values, device, "max")


def _reduce(values: list[float], device, how: str) -> list[float]:
    if not _distributed():
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if how == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def from_main_process(value: Any) -> Any:
    """``value`` as rank 0 has it (a broadcast of any picklable object)."""
    if not _distributed():
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
