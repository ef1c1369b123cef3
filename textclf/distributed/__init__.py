"""Several processes and machines: DeepSpeed ZeRO-3 (launch, config, gathering the weights), which process is
rank 0 and what the ranks agree on, and how many threads each process takes."""
