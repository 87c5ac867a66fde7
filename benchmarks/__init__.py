"""Benchmarks: the BentoML service against the original one-request-per-generate design."""
