"""Specs of the metric-learning techniques (family ``metric/``), one module per technique or paper."""
