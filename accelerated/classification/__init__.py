"""Classification objectives (Triton kernels)."""

from .comp_sum_loss import CompSumLoss, comp_sum_loss
from .spherical_z_loss import SphericalZLoss, spherical_z_loss
from .ldr_kl_loss import ALDRKLLoss, LDRKLLoss, aldr_kl_loss, ldr_kl_loss

__all__ = ["comp_sum_loss", "CompSumLoss", "spherical_z_loss", "SphericalZLoss",
           "ldr_kl_loss", "LDRKLLoss", "aldr_kl_loss", "ALDRKLLoss"]
