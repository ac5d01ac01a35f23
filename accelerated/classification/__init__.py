"""Classification objectives (Triton kernels)."""

from .comp_sum_loss import CompSumLoss, comp_sum_loss

__all__ = ["comp_sum_loss", "CompSumLoss"]
