"""Layers: normalisation, memory-saving activations, adapters, token merging and weight-space
operators (NumPy references)."""

from .alpha_batchnorm import alpha_batchnorm, alpha_batchnorm_grad
from .attentive_stats_pool import attentive_stats_pool, attentive_stats_pool_grad
from .dual_lora_linear import dual_lora_linear, dual_lora_linear_grad
from .evonorm import evonorm_b0, evonorm_b0_grad, evonorm_s0, evonorm_s0_grad
from .low_frequency_crop import low_frequency_crop, low_frequency_crop_grad
from .mesa import (
    mesa_dequantize,
    mesa_gelu,
    mesa_gelu_grad,
    mesa_layernorm,
    mesa_layernorm_grad,
    mesa_quantize,
    mesa_softmax,
    mesa_softmax_grad,
)
from .multilevel import coalesce, decoalesce, interpolate_params
from .nested_dropout import nested_dropout, nested_dropout_cutoff_probs, nested_dropout_grad
from .pst import cubic_sparsity_schedule, pst_sparse_linear, pst_sparse_linear_grad
from .pyra_token_merge import pyra_token_merge, pyra_token_merge_grad
from .random_feature_attention import random_feature_attention, random_feature_attention_grad
from .snnk_linear import snnk_linear, snnk_linear_grad

__all__ = [
    "evonorm_s0", "evonorm_s0_grad", "evonorm_b0", "evonorm_b0_grad",
    "mesa_quantize", "mesa_dequantize", "mesa_gelu", "mesa_gelu_grad", "mesa_softmax", "mesa_softmax_grad",
    "mesa_layernorm", "mesa_layernorm_grad",
    "dual_lora_linear", "dual_lora_linear_grad",
    "pst_sparse_linear", "pst_sparse_linear_grad", "cubic_sparsity_schedule",
    "pyra_token_merge", "pyra_token_merge_grad",
    "snnk_linear", "snnk_linear_grad", "random_feature_attention", "random_feature_attention_grad",
    "attentive_stats_pool", "attentive_stats_pool_grad",
    "alpha_batchnorm", "alpha_batchnorm_grad",
    "nested_dropout", "nested_dropout_grad", "nested_dropout_cutoff_probs",
    "low_frequency_crop", "low_frequency_crop_grad",
    "coalesce", "decoalesce", "interpolate_params",
]
