"""What a run does, top to bottom: one training (training.run_training), a seed sweep, a settings search (Optuna),
the zero-shot baseline, and the benchmarks. Each wires the components together and records in MLflow."""
