"""Helpers shared by the tests, the benchmark and the scripts (not shipped in the Bento)."""
