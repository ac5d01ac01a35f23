"""Metric-learning objectives: pairwise, contrastive, ranking and hyperbolic (Triton kernels)."""

from .focal_infonce_loss import FocalInfoNCELoss, focal_infonce_loss
from .hpm import HPMRelativeLoss, easy_to_hard_mask, hpm_relative_loss
from .hyperbolic import HypPCLoss, ToPoincare, hyp_pc_loss, poincare_distance, poincare_expmap0
from .hyperbolic_mlr_ce import HyperbolicMLRLoss, hyperbolic_mlr_ce
from .isogclr_loss import ISogCLRLoss, isogclr_init_state, isogclr_loss
from .mann_whitney import MannWhitneyLoss, mann_whitney_auc, mann_whitney_loss
from .masked_mean_pool import MaskedMeanPool, masked_mean_pool
from .metrix_loss import MetrixLoss, metrix_loss, metrix_triples
from .proto_triplet import ICNNLoss, ProtoTripletLoss, icnn_loss, proto_triplet_loss
from .supcon_loss import SupConLoss, supcon_loss
from .unpg_margin_softmax_loss import UNPGMarginSoftmaxLoss, unpg_margin_softmax_loss

__all__ = [
    "mann_whitney_loss", "mann_whitney_auc", "MannWhitneyLoss",
    "focal_infonce_loss", "FocalInfoNCELoss", "masked_mean_pool", "MaskedMeanPool",
    "supcon_loss", "SupConLoss",
    "isogclr_loss", "isogclr_init_state", "ISogCLRLoss",
    "metrix_loss", "metrix_triples", "MetrixLoss",
    "proto_triplet_loss", "ProtoTripletLoss", "icnn_loss", "ICNNLoss",
    "hpm_relative_loss", "HPMRelativeLoss", "easy_to_hard_mask",
    "unpg_margin_softmax_loss", "UNPGMarginSoftmaxLoss",
    "poincare_expmap0", "ToPoincare", "poincare_distance", "hyp_pc_loss", "HypPCLoss",
    "hyperbolic_mlr_ce", "HyperbolicMLRLoss",
]
