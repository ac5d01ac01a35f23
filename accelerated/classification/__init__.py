"""Classification objectives and the other losses (Triton kernels)."""

from .anyloss import AnyLoss, anyloss
from .comp_sum_loss import CompSumLoss, comp_sum_loss
from .dds_loss import DDSLoss, dds_loss
from .distillation import LogitMSEDistillation, SoftmaxMSEDistillation, logit_mse_distillation, softmax_mse_distillation
from .drm_ensemble import DRMEnsemble, drm_ensemble
from .electra import ElectraGeneratorSample, RTDLoss, electra_generator_sample, rtd_loss
from .ensemble_cross_entropy import EnsembleCrossEntropy, ensemble_cross_entropy
from .gradient_match_distance import GradientMatchDistance, gradient_match_distance
from .id_cosine_loss import IDCosineLoss, id_cosine_loss
from .kd_landmark_loss import KDLandmarkLoss, kd_landmark_loss
from .ldr_kl_loss import ALDRKLLoss, LDRKLLoss, aldr_kl_loss, ldr_kl_loss
from .loss_reweighting import LossReweightWeights, WeightedSequenceCE, loss_reweight_weights, weighted_sequence_ce
from .ramp_loss import RampLoss, ramp_loss
from .self_training_loss import SelfTrainingLoss, self_training_loss
from .smooth_adv_comp_sum_loss import SmoothAdvCompSumLoss, smooth_adv_comp_sum_loss
from .spherical_z_loss import SphericalZLoss, spherical_z_loss
from .weighted_ce_with_stats import WeightedCEWithStats, weighted_ce_with_stats

__all__ = [
    "anyloss", "AnyLoss",
    "comp_sum_loss", "CompSumLoss",
    "dds_loss", "DDSLoss",
    "logit_mse_distillation", "LogitMSEDistillation", "softmax_mse_distillation", "SoftmaxMSEDistillation",
    "drm_ensemble", "DRMEnsemble",
    "electra_generator_sample", "ElectraGeneratorSample", "rtd_loss", "RTDLoss",
    "ensemble_cross_entropy", "EnsembleCrossEntropy",
    "gradient_match_distance", "GradientMatchDistance",
    "id_cosine_loss", "IDCosineLoss",
    "kd_landmark_loss", "KDLandmarkLoss",
    "ldr_kl_loss", "LDRKLLoss", "aldr_kl_loss", "ALDRKLLoss",
    "loss_reweight_weights", "LossReweightWeights", "weighted_sequence_ce", "WeightedSequenceCE",
    "ramp_loss", "RampLoss",
    "self_training_loss", "SelfTrainingLoss",
    "smooth_adv_comp_sum_loss", "SmoothAdvCompSumLoss",
    "spherical_z_loss", "SphericalZLoss",
    "weighted_ce_with_stats", "WeightedCEWithStats",
]
