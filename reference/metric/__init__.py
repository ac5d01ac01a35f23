"""Metric-learning objectives: pairwise, contrastive, ranking and hyperbolic (NumPy references)."""

from .focal_infonce_loss import focal_infonce_loss, focal_infonce_loss_grad
from .hpm import easy_to_hard_mask, hpm_relative_loss, hpm_relative_loss_grad
from .hyperbolic import (
    hyp_pc_loss,
    hyp_pc_loss_grad,
    hyperbolic_mlr_ce,
    hyperbolic_mlr_ce_grad,
    poincare_distance,
    poincare_distance_grad,
    poincare_expmap0,
    poincare_expmap0_grad,
)
from .isogclr_loss import isogclr_init_state, isogclr_loss, isogclr_loss_grad
from .mann_whitney import mann_whitney_auc, mann_whitney_loss, mann_whitney_loss_grad
from .masked_mean_pool import masked_mean_pool, masked_mean_pool_grad
from .metrix_loss import metrix_loss, metrix_loss_grad, metrix_triples
from .proto_triplet import icnn_loss, icnn_loss_grad, proto_triplet_loss, proto_triplet_loss_grad
from .supcon_loss import supcon_loss, supcon_loss_grad
from .unpg_margin_softmax_loss import unpg_margin_softmax_loss, unpg_margin_softmax_loss_grad

__all__ = [
    "mann_whitney_loss", "mann_whitney_loss_grad", "mann_whitney_auc",
    "focal_infonce_loss", "focal_infonce_loss_grad", "masked_mean_pool", "masked_mean_pool_grad",
    "supcon_loss", "supcon_loss_grad",
    "isogclr_loss", "isogclr_loss_grad", "isogclr_init_state",
    "metrix_loss", "metrix_loss_grad", "metrix_triples",
    "proto_triplet_loss", "proto_triplet_loss_grad", "icnn_loss", "icnn_loss_grad",
    "hpm_relative_loss", "hpm_relative_loss_grad", "easy_to_hard_mask",
    "unpg_margin_softmax_loss", "unpg_margin_softmax_loss_grad",
    "poincare_expmap0", "poincare_expmap0_grad", "poincare_distance", "poincare_distance_grad",
    "hyperbolic_mlr_ce", "hyperbolic_mlr_ce_grad", "hyp_pc_loss", "hyp_pc_loss_grad",
]
