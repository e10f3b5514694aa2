"""Benchmarks of deit-serve: raw model, in-process pipeline limit, and end to end against peer servers."""
