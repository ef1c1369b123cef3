"""The parts a recipe wires: data (files, columns, labels, splits; the prompt and its tokens), the model (base
model, pooling, head, LoRA), the Trainer and its callbacks, checkpoints, and evaluation (metrics, calibration)."""
