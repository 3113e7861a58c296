"""Merge actors: Fisher aggregation, coefficient solve and persistence of the merged state."""
