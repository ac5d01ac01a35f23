"""Metric-learning objectives: pairwise, contrastive, ranking and hyperbolic (NumPy references)."""
