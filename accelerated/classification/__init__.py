"""Classification objectives (Triton kernels)."""

from .comp_sum_loss import CompSumLoss, comp_sum_loss
from .spherical_z_loss import SphericalZLoss, spherical_z_loss

__all__ = ["comp_sum_loss", "CompSumLoss", "spherical_z_loss", "SphericalZLoss"]
