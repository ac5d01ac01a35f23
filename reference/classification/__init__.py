"""Classification objectives (NumPy references)."""

from .comp_sum_loss import comp_sum_loss, comp_sum_loss_grad
from .ldr_kl_loss import aldr_kl_loss, aldr_kl_loss_grad, ldr_kl_loss, ldr_kl_loss_grad
from .spherical_z_loss import spherical_z_loss, spherical_z_loss_grad

__all__ = [
    "comp_sum_loss",
    "comp_sum_loss_grad",
    "spherical_z_loss",
    "spherical_z_loss_grad",
    "ldr_kl_loss",
    "ldr_kl_loss_grad",
    "aldr_kl_loss",
    "aldr_kl_loss_grad",
]
