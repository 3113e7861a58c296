"""Pure-torch core of pm-ray: task vectors, perturbation, Fisher, merge coefficients and strategies,
continual-learning metrics. No Ray, DeepSpeed or MLflow imports below this package."""
