"""Classification objectives and the other losses (NumPy references)."""

from .anyloss import anyloss, anyloss_grad
from .comp_sum_loss import comp_sum_loss, comp_sum_loss_grad
from .dds_loss import dds_loss, dds_loss_grad
from .distillation import (logit_mse_distillation, logit_mse_distillation_grad, softmax_mse_distillation,
                           softmax_mse_distillation_grad)
from .drm_ensemble import drm_ensemble
from .electra import electra_generator_sample, electra_generator_sample_grad, rtd_loss, rtd_loss_grad
from .ensemble_cross_entropy import ensemble_cross_entropy, ensemble_cross_entropy_grad
from .gradient_match_distance import gradient_match_distance, gradient_match_distance_grad
from .id_cosine_loss import id_cosine_loss, id_cosine_loss_grad
from .kd_landmark_loss import kd_landmark_loss, kd_landmark_loss_grad
from .ldr_kl_loss import aldr_kl_loss, aldr_kl_loss_grad, ldr_kl_loss, ldr_kl_loss_grad
from .loss_reweighting import loss_reweight_weights, weighted_sequence_ce, weighted_sequence_ce_grad
from .ramp_loss import ramp_loss, ramp_loss_grad
from .self_training_loss import self_training_loss, self_training_loss_grad
from .smooth_adv_comp_sum_loss import smooth_adv_comp_sum_loss, smooth_adv_comp_sum_loss_grad
from .spherical_z_loss import spherical_z_loss, spherical_z_loss_grad
from .weighted_ce_with_stats import weighted_ce_with_stats, weighted_ce_with_stats_grad

__all__ = [
    "anyloss", "anyloss_grad",
    "comp_sum_loss", "comp_sum_loss_grad",
    "dds_loss", "dds_loss_grad",
    "logit_mse_distillation", "logit_mse_distillation_grad",
    "softmax_mse_distillation", "softmax_mse_distillation_grad",
    "drm_ensemble",
    "electra_generator_sample", "electra_generator_sample_grad", "rtd_loss", "rtd_loss_grad",
    "ensemble_cross_entropy", "ensemble_cross_entropy_grad",
    "gradient_match_distance", "gradient_match_distance_grad",
    "id_cosine_loss", "id_cosine_loss_grad",
    "kd_landmark_loss", "kd_landmark_loss_grad",
    "ldr_kl_loss", "ldr_kl_loss_grad", "aldr_kl_loss", "aldr_kl_loss_grad",
    "loss_reweight_weights", "weighted_sequence_ce", "weighted_sequence_ce_grad",
    "ramp_loss", "ramp_loss_grad",
    "self_training_loss", "self_training_loss_grad",
    "smooth_adv_comp_sum_loss", "smooth_adv_comp_sum_loss_grad",
    "spherical_z_loss", "spherical_z_loss_grad",
    "weighted_ce_with_stats", "weighted_ce_with_stats_grad",
]
