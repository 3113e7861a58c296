"""pm-ray: continual learning by model merging (Perturb-and-Merge, TRM, baselines) on Ray."""

__version__ = "0.1.0"
