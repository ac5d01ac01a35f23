"""Specs of the layers (family ``layers/``), one module per technique or paper."""
