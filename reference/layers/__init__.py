"""Layers: normalisation, memory-saving activations, adapters, token merging and weight-space operators (NumPy references)."""
