"""Benchmarks: each times mixcon and a baseline side by side in one process."""
