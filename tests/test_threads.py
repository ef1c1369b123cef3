"""Thread counts are chosen from the cores this process may use and the ranks sharing them (textclf.distributed.threads)."""

import subprocess
import sys

from textclf.distributed.threads import available_cores, plan_threads


def test_ranks_on_one_machine_split_its_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("textclf.distributed.threads.available_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    plan = plan_threads()
    assert (plan.intra_op, plan.inter_op, plan.ranks_sharing, plan.source) == (4, 1, 2, "cores / ranks")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert plan_threads().intra_op == 1  # never zero


def test_a_users_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    plan = plan_threads(ranks_sharing=1)
    assert (plan.intra_op, plan.source) == (3, "OMP_NUM_THREADS")
    assert plan.as_params()["threads.source"] == "OMP_NUM_THREADS"


def test_the_cores_counted_are_the_process_affinity_not_the_machine():
    # taskset pins a child to one CPU: the plan must see one core there, whatever the machine has.
    code = "from textclf.distributed.threads import plan_threads; print(plan_threads(1).intra_op)"
    import shutil

    if shutil.which("taskset") is None:
        import pytest

        pytest.skip("taskset is not installed")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert out.strip() == "1" and available_cores() >= 1


def test_configure_threads_sets_torch_pools_in_a_fresh_process():
    code = ("import torch; from textclf.distributed.threads import configure_threads; p = configure_threads(1); "
            "print(p.intra_op, torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ".", "OMP_NUM_THREADS": "1"}).stdout.split()
    assert out == ["1", "1", "1"]

