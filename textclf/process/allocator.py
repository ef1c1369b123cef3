"""The memory allocator of a command's process: jemalloc where it is installed, glibc's malloc otherwise.

Why: in bf16 on a CPU, torch runs each matmul through oneDNN, whose buffers are sized by the batch's shape,
and length-grouped batches come in dozens of shapes. Under glibc's malloc the process then slows down as
it trains: the same step on the same batch took 0.74 s before training and 0.95-1.00 s after 200-300 steps
of the SST-2 recipe, and a fresh process with the trained weights was fast again (so it is the process, not
the model); malloc_trim, flushing denormals and a larger oneDNN primitive cache did not help, fixed shapes
and jemalloc did (docs/benchmarks.md, 2026-12-06). Over the 20-minute SST-2 recipe the steps slowed from
1.0 to 1.6 s. fp32 on CPU (MKL) and GPUs were not seen to drift.

The allocator is chosen when a process starts (``LD_PRELOAD``), so a command re-executes itself once,
with the same arguments, before it loads anything big. torch's launcher ``torch.backends.xeon.run_cpu
--enable-jemalloc`` preloads it the same way, but is a launcher of its own that also pins cores; textclf
sets its threads itself (textclf.distributed.threads). Child processes (DeepSpeed ranks, search workers)
inherit the variable. ``TEXTCLF_MALLOC=system`` keeps glibc's malloc.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

JEMALLOC_ENV = "TEXTCLF_MALLOC"


def jemalloc_library() -> str | None:
    """The soname of an installed jemalloc (Debian/Ubuntu: ``apt install libjemalloc2``), or None."""
    return ctypes.util.find_library("jemalloc")


def loaded_allocator() -> str:
    """``jemalloc`` when this process runs it, else ``glibc``: what a run logs as ``process.malloc``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def restart_under_jemalloc() -> None:
    """Re-execute this command under jemalloc when it is installed and not loaded yet (does not return then).

    Call it first in a command's ``__main__`` block, never from a function that tests or other programs call
    in their own process: it replaces the process."""
    if not sys.platform.startswith("linux") or os.environ.get(JEMALLOC_ENV, "jemalloc") == "system":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:  # set already (by us, or by the user); never loop
        return
    library = jemalloc_library()
    if library is None:
        return
    env = {**os.environ, "LD_PRELOAD": f"{library} {preload}".strip()}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
