"""Layers: normalisation, memory-saving activations, adapters, token merging and weight-space
operators (Triton kernels and drop-in ``nn.Module``s)."""

from .alpha_batchnorm import AlphaBatchNorm, alpha_batchnorm
from .attentive_stats_pool import AttentiveStatsPool, attentive_stats_pool
from .dual_lora_linear import DualLoRALinear, dual_lora_linear
from .evonorm import EvoNorm2dB0, EvoNorm2dS0, evonorm_b0, evonorm_s0
from .low_frequency_crop import LowFrequencyCrop, low_frequency_crop
from .mesa import (
    MesaGELU,
    MesaLayerNorm,
    MesaSoftmax,
    mesa_dequantize,
    mesa_gelu,
    mesa_layernorm,
    mesa_quantize,
    mesa_softmax,
)
from .multilevel import coalesce, decoalesce, interpolate_params
from .nested_dropout import NestedDropout, nested_dropout
from .pst import PSTSparseLinear, cubic_sparsity_schedule, pst_sparse_linear
from .pyra_token_merge import PyraTokenMerge, pyra_token_merge
from .random_feature_attention import RandomFeatureAttention, random_feature_attention
from .snnk_linear import SNNKLinear, snnk_linear

__all__ = [
    "evonorm_s0", "evonorm_b0", "EvoNorm2dS0", "EvoNorm2dB0",
    "mesa_quantize", "mesa_dequantize", "mesa_gelu", "mesa_softmax", "mesa_layernorm",
    "MesaGELU", "MesaSoftmax", "MesaLayerNorm",
    "dual_lora_linear", "DualLoRALinear",
    "pst_sparse_linear", "PSTSparseLinear", "cubic_sparsity_schedule",
    "pyra_token_merge", "PyraTokenMerge",
    "snnk_linear", "SNNKLinear", "random_feature_attention", "RandomFeatureAttention",
    "attentive_stats_pool", "AttentiveStatsPool",
    "alpha_batchnorm", "AlphaBatchNorm",
    "nested_dropout", "NestedDropout",
    "low_frequency_crop", "LowFrequencyCrop",
    "coalesce", "decoalesce", "interpolate_params",
]
