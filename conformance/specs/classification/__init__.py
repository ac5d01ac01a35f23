"""Specs of the classification losses (family ``classification/``), one module per technique or paper."""
