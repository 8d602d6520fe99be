"""Entry points: training launches, merging, prediction, submission checks, scoring and benchmarks."""
