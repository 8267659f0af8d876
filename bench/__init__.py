"""Benchmarks: speed and memory of merges against mergekit and the I/O floor."""
