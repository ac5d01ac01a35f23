"""twinops.accelerated — Triton kernels under PyTorch, with the same names, arguments and defaults
as `twinops.reference`. Autograd-aware and ``torch.compile(fullgraph=True)``-safe: every
operation is a ``torch.library`` custom op with a registered backward."""

from . import classification

__all__ = ["classification"]
