"""Training throughput of LoRA on every layer against LoRA on the top N layers only (lora_layers), in one process.

    python scripts/bench_lora_layers.py [--base_model ckpt/SmolLM2-135M-Instruct] [--layers 0 10 6] [--precision auto]

Each setting is what `textclf train` runs (textclf.recipes.bench.measure_training: the same Trainer, collator and
length-grouped sampler) on the same SST-2 rows with the accuracy recipe's short prompt; the first step of each is
an untimed warm-up. 0 is every layer. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

from textclf.distributed.threads import configure_threads
from textclf.recipes.bench import bench_config, measure_training
from textclf.recipes.bench_accuracy import SHORT_TEMPLATE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default="ckpt/SmolLM2-135M-Instruct")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 6])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rows", type=int, default=160)
    args = parser.parse_args()
    configure_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            config = bench_config(args.base_model, "sst2", args.rows, args.rows // 8, 128, True, tmp)
            config = dataclasses.replace(
                config, model=dataclasses.replace(config.model, lora_layers=layers),
                data=dataclasses.replace(config.data, prompt_template=SHORT_TEMPLATE),
                training=dataclasses.replace(config.training, precision=args.precision))
            throughput, flop_model, _ = measure_training(config, False, f"lora_layers={layers}")
            print(f"lora_layers {layers or 'all':>3}: {throughput.samples_per_second:6.2f} samples/s, "
                  f"{throughput.seconds / throughput.steps:.3f} s per step, "
                  f"{throughput.flops / throughput.seconds / 1e9:.1f} useful GFLOP/s "
                  f"({flop_model.forward_only_layers} layers forward only)", flush=True)


if __name__ == "__main__":
    main()
