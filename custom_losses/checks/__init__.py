"""Checks on this machine and real shapes: the doctor (doctor, machine), the smoke steps and the GPU, loss and distill benchmarks."""
