"""DeepSpeed's C++ ops for the CPU, compiled ahead of the first DeepSpeed run (``make install`` runs this module).

DeepSpeed compiles its ops with g++ when a process first loads them (torch's JIT extensions, cached under
``~/.cache/torch_extensions``): on a 2-core CPU the shared-memory communication op that every ZeRO-3 process loads
took 77 s and the vectorized CPU Adam that ``offload=cpu`` needs 66 s alone, 125 s beside other work. Built here,
a user's first ``train_deepspeed`` starts training at once and the test suite does not spend those minutes. This
loads the ops the way DeepSpeed does (through its accelerator's op builders), so the cache holds what a run will
look for; nothing is written by hand but the list of ops. The build must use the ninja a run will use (the venv's:
another ninja version rebuilds), which the Makefile puts first on PATH.
"""

from __future__ import annotations

import time

# The ops a CPU run loads: ZeRO-3's communication (deepspeed.comm on the CPU accelerator) and ZeRO-Offload's Adam.
CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def build_cpu_ops() -> dict[str, float]:
    """Compile each of :data:`CPU_OPS` unless its build is cached; returns the seconds each took to load."""
    from deepspeed.accelerator import get_accelerator

    seconds = {}
    for name in CPU_OPS:
        started = time.perf_counter()
        get_accelerator().create_op_builder(name).load(verbose=False)
        seconds[name] = time.perf_counter() - started
    return seconds


if __name__ == "__main__":
    for op, took in build_cpu_ops().items():
        print(f"DeepSpeed {op}: ready ({took:.0f} s)")
