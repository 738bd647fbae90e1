"""Benchmarks that produce the numbers quoted in docs/bench."""
