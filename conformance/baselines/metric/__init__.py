"""Eager PyTorch baselines of the metric-learning techniques: what a user would write without twinops."""
