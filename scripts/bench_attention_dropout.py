"""Step time of an encoder's full fine-tuning step on CPU: its attention dropout drawn by SDPA (torch's own mask),
by textclf's fast mask (what CPU training uses), or switched off (a bound, not an option textclf takes).

    python scripts/bench_attention_dropout.py [--model ckpt/all-MiniLM-L6-v2] [--precision bf16 fp32]

Batches of 16 at 48, 160 and 256 tokens (R8's prompts average ~140 MiniLM tokens at max length 256) and 32 x 48
(the SST-2 demo's shape); the other dropout layers use the fast mask in every setting, as in textclf training.
Median of 4 steps after 1 warm-up step. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModel

from textclf.components.attention_dropout import use_fast_cpu_attention_dropout
from textclf.components.dropout import use_fast_cpu_dropout
from textclf.distributed.threads import configure_threads

SHAPES = ((32, 48), (16, 48), (16, 160), (16, 256))
SETTINGS = ("SDPA's dropout", "fast mask", "no attention dropout")


def build(path: str, setting: str) -> torch.nn.Module:
    extra = {"attention_probs_dropout_prob": 0.0} if setting == "no attention dropout" else {}
    model = AutoModel.from_pretrained(path, **extra).train()
    use_fast_cpu_dropout(model)
    if setting == "fast mask":
        assert use_fast_cpu_attention_dropout(model)
    return model


def seconds_per_step(model: torch.nn.Module, batch: int, length: int, precision: str, steps: int = 4) -> float:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, 20000, (batch, length))
    mask = torch.ones_like(ids)
    mask[: batch // 2, length - length // 4:] = 0  # half the rows padded, as in a length-grouped batch

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pooled = model(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
        pooled.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    step()
    return statistics.median(step() for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ckpt/all-MiniLM-L6-v2")
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    args = parser.parse_args()
    configure_threads()
    print("| precision | batch x tokens | " + " | ".join(SETTINGS) + " | fast mask saves |")
    print("| --- | --- | " + " | ".join("---:" for _ in SETTINGS) + " | ---: |")
    for precision in args.precision:
        models = {setting: build(args.model, setting) for setting in SETTINGS}
        for batch, length in SHAPES:
            times = [seconds_per_step(models[setting], batch, length, precision) for setting in SETTINGS]
            print(f"| {precision} | {batch} x {length} | " + " | ".join(f"{t:.3f} s" for t in times)
                  + f" | {1 - times[1] / times[0]:.0%} |", flush=True)


if __name__ == "__main__":
    main()
