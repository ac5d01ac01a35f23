"""Eager-PyTorch baselines of the classification losses, one module per technique or paper."""
