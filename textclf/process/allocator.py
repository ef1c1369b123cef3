"""The memory allocator of a command's process: jemalloc where it is installed, glibc's malloc otherwise.

Why: in bf16 on a CPU, torch runs each matmul through oneDNN, whose buffers are sized by the batch's shape,
and length-grouped batches come in dozens of shapes. Under glibc's malloc the process then slows down as
it trains: the same step on the same batch took 0.74 s before training, 0.87 after 200 steps and 1.00 after 300
of the SST-2 recipe (another run: 0.77 -> 0.95 after 200), and a fresh process with the trained weights was fast
again (so it is the process, not the model); malloc_trim, flushing denormals and a larger oneDNN primitive cache
did not help, one fixed shape and jemalloc did (docs/benchmarks.md, 2026-12-06). Over the 20-minute SST-2 recipe
the steps slowed from 1.2 s (steps 10-190) to 1.6 s (550-720). fp32 on CPU (MKL) was not seen to drift.

The allocator is chosen when a process starts (``LD_PRELOAD``), so a command that trains or predicts re-executes
itself once, with the same arguments, before it loads anything big. torch's launcher ``torch.backends.xeon.run_cpu
--enable-jemalloc`` preloads it the same way, but is a launcher of its own that also pins cores; textclf sets its
threads itself (textclf.distributed.threads). Child processes (DeepSpeed ranks, search workers) inherit the
variable. ``TEXTCLF_MALLOC=system`` (or ``glibc``) keeps glibc's malloc; a preload that already names an allocator
(jemalloc, tcmalloc, mimalloc) is left alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

JEMALLOC_ENV = "TEXTCLF_MALLOC"
LIBRARY = "libjemalloc.so.2"


def jemalloc_library() -> str | None:
    """The path of an installed jemalloc (Debian/Ubuntu: ``apt install libjemalloc2``; conda: the environment's
    lib/), or None. Fixed places, not ``ctypes.util.find_library``: that runs gcc and ld when ldconfig does not
    list the library, at every command's start, and may name a file the loader cannot preload."""
    folders = [Path(sys.prefix) / "lib", Path("/usr/local/lib"), Path("/usr/lib64"), Path("/usr/lib"),
               *sorted(Path("/usr/lib").glob("*-linux-gnu")), *sorted(Path("/lib").glob("*-linux-gnu"))]
    return next((str(folder / LIBRARY) for folder in folders if (folder / LIBRARY).is_file()), None)


def loaded_allocator() -> str:
    """``jemalloc`` when this process runs it, else ``glibc`` (``system`` off Linux): a run's ``process.malloc``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def restart_under_jemalloc() -> None:
    """Re-execute this command under jemalloc when it is installed and not loaded yet (does not return then).

    Call it first in a command's ``__main__`` block, never from a function that tests or other programs call
    in their own process: it replaces the process."""
    if not sys.platform.startswith("linux") or os.environ.get(JEMALLOC_ENV, "").lower() in ("system", "glibc"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if any("malloc" in Path(entry).name for entry in preload.replace(":", " ").split()):
        return  # jemalloc already (set by us: never loop), or the user's tcmalloc/mimalloc
    library = jemalloc_library()
    if library is None:
        return
    env = {**os.environ, "LD_PRELOAD": f"{library} {preload}".strip()}
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
