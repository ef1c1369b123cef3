"""Step time of a full fine-tuning step with the embeddings and the lowest N layers frozen (frozen_layers).

    python scripts/bench_frozen_layers.py [--model ckpt/all-MiniLM-L6-v2] [--layers -1 0 2 3 4]

-1 freezes nothing, 0 only the embeddings. The demo's shape: batch 32 x 41 tokens, AdamW, this process's threads
as textclf plans them; mean of 12 steps after 3 warm-up steps. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModel

from textclf.components.model import freeze_lower_layers
from textclf.distributed.threads import configure_threads


def seconds_per_step(path: str, frozen: int, steps: int = 12) -> float:
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(path).train()
    if frozen >= 0:
        freeze_lower_layers(model, frozen)  # 0: everything below the first layer, i.e. the embeddings
    head = torch.nn.Linear(model.config.hidden_size, 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-5)
    ids = torch.randint(1000, 20000, (32, 41))

    def step():
        pooled = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, 0]
        head(pooled).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ckpt/all-MiniLM-L6-v2")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1, 0, 2, 3, 4])
    args = parser.parse_args()
    configure_threads()
    for frozen in args.layers:
        print(f"frozen {frozen:>2}: {seconds_per_step(args.model, frozen):.3f} s per step", flush=True)


if __name__ == "__main__":
    main()
