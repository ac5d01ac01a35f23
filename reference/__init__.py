"""twinops.reference — the NumPy specification of every technique (float64 inside, no torch)."""

from . import classification

__all__ = ["classification"]
