"""Every registered technique: the reference's gradient against float64 finite differences, the
reference's rejection of bad inputs, and the accelerated kernels against the reference."""

import pytest

from twinops.conformance import check_port, check_reference, registry

NAMES = registry.names()


def test_foundation_techniques_registered():
    assert {"comp_sum_loss", "spherical_z_loss", "ldr_kl_loss", "aldr_kl_loss"} <= set(NAMES)


def test_classification_techniques_registered():
    assert {
        "anyloss", "smooth_adv_comp_sum_loss", "loss_reweight_weights", "weighted_sequence_ce",
        "ensemble_cross_entropy", "electra_generator_sample", "rtd_loss", "logit_mse_distillation",
        "softmax_mse_distillation", "kd_landmark_loss", "id_cosine_loss", "dds_loss", "ramp_loss",
        "self_training_loss", "drm_ensemble", "weighted_ce_with_stats", "gradient_match_distance",
    } <= {s.name for s in registry.all_specs() if s.family == "classification"}


def test_metric_techniques_registered():
    assert {
        "mann_whitney_loss", "mann_whitney_auc", "focal_infonce_loss", "masked_mean_pool", "supcon_loss",
        "isogclr_loss", "metrix_loss", "proto_triplet_loss", "icnn_loss", "hpm_relative_loss",
        "easy_to_hard_mask", "unpg_margin_softmax_loss", "poincare_expmap0", "poincare_distance",
        "hyperbolic_mlr_ce", "hyp_pc_loss",
    } <= {s.name for s in registry.all_specs() if s.family == "metric"}


def test_layers_techniques_registered():
    assert {
        "evonorm_s0", "evonorm_b0", "mesa_quantize", "mesa_dequantize", "mesa_gelu", "mesa_softmax",
        "mesa_layernorm", "dual_lora_linear", "pst_sparse_linear", "cubic_sparsity_schedule",
        "pyra_token_merge", "snnk_linear", "random_feature_attention", "attentive_stats_pool",
        "alpha_batchnorm", "nested_dropout", "low_frequency_crop", "coalesce", "decoalesce",
        "interpolate_params",
    } <= {s.name for s in registry.all_specs() if s.family == "layers"}


@pytest.mark.parametrize("name", NAMES)
def test_reference_self_check(name):
    report = check_reference(name)
    assert report.ok, str(report)
    if registry.get(name).grad_inputs:
        assert report.worst[("float64", "fd-grad")].examples > 5


@pytest.mark.parametrize("name", NAMES)
def test_accelerated_conforms(name):
    spec = registry.get(name)
    report = check_port(spec, spec.accelerated_fn())
    assert report.ok, str(report)
    for dtype in ("float32", "float16"):
        assert report.worst[(dtype, "forward")].examples > 5
        if spec.grad_inputs:
            assert report.worst[(dtype, "backward")].examples > 5


@pytest.mark.parametrize("name", NAMES)
def test_status_complete(name):
    assert all(registry.status(registry.get(name)).values()), registry.status(registry.get(name))
