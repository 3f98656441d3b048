"""Benchmarks: kernels, encoder, loader and end to end, each against a baseline from the same run."""
