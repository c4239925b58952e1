"""vmae-bench: encoder-only vs dual masking x attention kernel x checkpointing, measured per training step.

Entry point: `vmae-bench` / `python -m benchmarks` (see benchmarks/README.md for how to read the reports).
"""
