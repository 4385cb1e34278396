"""Benchmarks: `python -m bench [NAME ...]` prints measured figures next to their targets."""
