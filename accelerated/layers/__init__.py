"""Layers: normalisation, memory-saving activations, adapters, token merging and weight-space operators (Triton kernels and nn.Modules)."""
