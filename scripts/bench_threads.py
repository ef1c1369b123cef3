"""How thread settings behave when the cores are not all ours (issue 11, item 4).

Times training steps of MiniLM (batch 32 x 40 tokens, AdamW) in a fresh process per setting, alone and
beside a busy process that spins on one core (as a second job on the machine would). Each setting is
its own process because OpenMP reads its environment once, when torch loads.

    .venv/bin/python scripts/bench_threads.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "torch default (all cores)": {},
    "all cores, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "textclf (configure_threads)": {"TEXTCLF_CONFIGURE": "1"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}

STEPS = r"""
import os, sys, time, torch
sys.path.insert(0, os.getcwd())
if os.environ.get("TEXTCLF_CONFIGURE"):
    from textclf.distributed.threads import configure_threads
    configure_threads()
from transformers import AutoModel
from textclf.components.base_models import minilm_path
model = AutoModel.from_pretrained(minilm_path())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(1000, 2000, (32, 40))
times = []
for step in range(int(sys.argv[1]) + 1):
    start = time.perf_counter()
    model(input_ids=ids).last_hidden_state.mean().backward()
    optimizer.step(); optimizer.zero_grad()
    times.append(time.perf_counter() - start)
times = sorted(times[1:])  # the first step warms up
print(times[len(times) // 2], torch.get_num_threads())
"""


def time_setting(extra_env: dict[str, str], steps: int) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", STEPS, str(steps)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[-2]), int(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output")
    args = parser.parse_args()
    rows = []
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for name, env in SETTINGS.items():
                seconds, threads = time_setting(env, args.steps)
                rows.append({"setting": name, "busy_core": busy, "threads": threads, "median_step_s": seconds})
                print(f"{'1 core busy' if busy else 'alone':12} {name:38} {threads} threads  {seconds:.3f} s/step",
                      flush=True)
        finally:
            if spinner:
                spinner.kill()
        time.sleep(1)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
