"""Classification objectives (NumPy references)."""

from .comp_sum_loss import comp_sum_loss, comp_sum_loss_grad

__all__ = ["comp_sum_loss", "comp_sum_loss_grad"]
