"""Eager PyTorch baselines of the layers: what a user would write without twinops."""
