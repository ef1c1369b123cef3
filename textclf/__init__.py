import os

# Before torch loads OpenMP, which reads this once: threads waiting at a barrier sleep instead of spinning.
# Alone it costs nothing; with another process busy on one of 2 cores, a MiniLM training step took 1.84 s
# instead of 2.42 s (scripts/bench_threads.py, docs/benchmarks.md). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
