"""Benchmarks: `python -m bench.latency` (latency of every schedule, per stage)."""
