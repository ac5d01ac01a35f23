"""Metric-learning objectives: pairwise, contrastive, ranking and hyperbolic (Triton kernels)."""
