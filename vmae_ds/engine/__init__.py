"""DeepSpeed pretraining engine: run config, DeepSpeed setup, optimisation, checkpoints, metrics, loop."""
