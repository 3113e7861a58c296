"""Deterministic example generators for the built-in suites. Each returns a list of unique rows
(dicts in the instruction schema) from a `random.Random`."""
