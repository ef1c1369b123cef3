"""DeepSpeed's C++ ops for the CPU, compiled ahead of the first DeepSpeed run (``make install`` runs this module).

DeepSpeed compiles its ops with g++ when a process first loads them (torch's JIT extensions, cached under
``~/.cache/torch_extensions``). On a 2-core CPU the shared-memory communication op that every ZeRO-3 process loads
took 46 s and the vectorized CPU Adam that ``offload=cpu`` needs 79 s on an idle machine (78 s and 125 s inside the
test suite, beside the other worker). Built here, a user's first ``train_deepspeed`` starts training at once and
the suite does not spend those minutes. The ops come from the accelerator's op builders, as DeepSpeed's own
``build_shm_op`` and ``DeepSpeedCPUAdam`` get them, so the cache holds what a run looks for; only the list of ops
is ours. The build must use the ninja a run will use (another ninja version rebuilds them): the Makefile puts the
venv's first on PATH.
"""

from __future__ import annotations

import time

# The ops a CPU run loads: ZeRO-3's communication (deepspeed.comm on the CPU accelerator) and ZeRO-Offload's Adam.
CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def build_cpu_ops() -> dict[str, float]:
    """Compile each of :data:`CPU_OPS` this machine's accelerator can build, unless its build is cached; returns
    the seconds each took to load (a GPU accelerator has no shared-memory op: it is skipped)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    seconds = {}
    for name in CPU_OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        started = time.perf_counter()
        builder.load(verbose=False)
        seconds[name] = time.perf_counter() - started
    return seconds


if __name__ == "__main__":
    for op, took in build_cpu_ops().items():
        print(f"DeepSpeed {op}: ready ({took:.0f} s)")
