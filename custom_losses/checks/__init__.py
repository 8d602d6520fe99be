"""Checks and benchmarks on real shapes: the smoke steps and the GPU, loss and distill benchmarks."""
