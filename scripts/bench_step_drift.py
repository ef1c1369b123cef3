"""Does a training step get slower as training goes on? Times one fixed batch before and during training.

    python scripts/bench_step_drift.py [--steps 150] [--every 75] [--pad_to 0] [--pad_multiple 0]
    LD_PRELOAD=libjemalloc.so.2 python scripts/bench_step_drift.py      # the same under jemalloc

SmolLM2 with LoRA as textclf builds it (the SST-2 recipe's short prompt, batch 8, AdamW, bf16 autocast where
the CPU has bf16 instructions), trained on random SST-2 batches; every 75 steps (``--every``) the same batch of 8 rows
(32 tokens) is timed, forward and backward, 15 times. The batches' shapes vary as in real training unless
``--pad_to`` pads and cuts every row to one length or ``--pad_multiple`` rounds lengths up. Found with it
(docs/benchmarks.md): under glibc's malloc, with or without its tunables, the fixed batch slowed 13-35% within
150-300 steps in bf16; not with one shape, nor under jemalloc (textclf.process.allocator). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import DataCollatorWithPadding

from textclf.components.trainer import prepare, resolve_precision, training_collator
from textclf.config import build_config
from textclf.distributed.threads import configure_threads
from textclf.process.allocator import loaded_allocator
from textclf.recipes.bench_accuracy import SHORT_TEMPLATE

FIELDS = ("input_ids", "attention_mask", "labels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default="ckpt/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=75, help="time the fixed batch every this many steps")
    parser.add_argument("--pad_to", type=int, default=0, help="pad and cut every training row to this length")
    parser.add_argument("--pad_multiple", type=int, default=0, help="round each batch's length up to a multiple")
    args = parser.parse_args()
    configure_threads()
    config = build_config("lora", base_model=args.base_model, dataset="sst2", prompt_template=SHORT_TEMPLATE,
                          max_length=128, batch_size=8, output_dir="/tmp/step-drift", register=False, resume=False)
    prepared = prepare(config)
    model = prepared.model.train()
    bf16 = resolve_precision("auto") == "bf16"
    rows = [{k: prepared.train_set[i][k] for k in FIELDS} for i in range(len(prepared.train_set))]
    fixed = training_collator(prepared.tokenizer)(sorted(rows, key=lambda r: len(r["input_ids"]))[3000:3008])
    if args.pad_to:
        collate = DataCollatorWithPadding(prepared.tokenizer, padding="max_length", max_length=args.pad_to)
        rows = [{k: (v[:args.pad_to] if k != "labels" else v) for k, v in r.items()} for r in rows]
    else:
        collate = DataCollatorWithPadding(prepared.tokenizer, padding="longest",
                                          pad_to_multiple_of=args.pad_multiple or None)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=5e-4)

    def step(batch, update: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def time_fixed(label: str, repeats: int = 15) -> None:
        step(fixed, update=False)
        started = time.perf_counter()
        for _ in range(repeats):
            step(fixed, update=False)
        print(f"{label}: {(time.perf_counter() - started) / repeats:.3f} s per step on the fixed batch "
              f"{tuple(fixed['input_ids'].shape)}", flush=True)

    print(f"malloc: {loaded_allocator()}, bf16: {bf16}, shapes: "
          f"{f'one ({args.pad_to})' if args.pad_to else f'lengths rounded to {args.pad_multiple or 1}'}", flush=True)
    time_fixed("before training")
    random.seed(0)
    for k in range(1, args.steps + 1):
        step(collate([rows[i] for i in random.sample(range(len(rows)), 8)]), update=True)
        if k % args.every == 0 or k == args.steps:
            time_fixed(f"after {k} steps")


if __name__ == "__main__":
    main()
