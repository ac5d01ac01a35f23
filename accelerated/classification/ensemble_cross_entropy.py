"""Ensemble cross-entropy (P24) as Triton kernels: K member reads forward, K reads and K writes
backward, and no averaged (N, V) logits or (K, N, V) softmax in memory. See
`twinops.reference.classification.ensemble_cross_entropy` for the definition.

One program per token, every read a contiguous ``BLOCK_V``-wide slice of one member row, as in a
single-model cross-entropy, so each member row is read once per pass and only O(K) numbers per
token persist between passes. logit_mean needs the members together (it sums them per class), so it
reads the K member slices of each chunk in turn; prob_mean needs each member's own (m_k, s_k), so it
walks the members one after another, each with ``row_max_sumexp``. The bytes are the same.

logit_mean, forward:   walk V; in each chunk sum the K members' logits, S_v = sum_k Z_kv (fp64),
                       z_v = S_v / (K t) and keep one online (m, s) of z; loss = log s - (z_y - m)
           backward:   dZ_kv = g / (K t) * (exp(z_v - m) / s - [v = y]), recomputed per chunk and
                       written to all K members
prob_mean, forward:    for each member k, the online (m_k, s_k) of Z_k / t (``row_max_sumexp``),
                       a_k = log p_k(y) = (Z_ky - m_k) / t - log s_k, and an online log-sum-exp of
                       the a_k over members; loss = log K - logsumexp_k a_k
           backward:   the a_k again (K scalar loads), r_k = softmax_k(a_k), then for each member
                       dZ_kv = g r_k / t * (exp((Z_kv - m_k) / t) / s_k - [v = y])

The member sum of logit_mean is formed in fp64: the loss and every probability depend on
differences z_v - m of averaged logits, and an fp32 sum of K logits of size |Z| is rounded by up
to |Z| 2^-24: at |Z| / t of a few hundred that puts the loss up to 5x beyond the fp32 tolerance
(1e-5 relative), at |Z| ~ 1e4 it is an absolute error of 1e-3. The fp64 work is K conversions and
adds per class, far below the memory time on data-centre GPUs. The forward saves (m, s) per token
(logit_mean) or per member and token (prob_mean) as fp64, 16 bytes each.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice, check_int, check_real
from ...reference.classification.ensemble_cross_entropy import MODES
from .. import _runtime as rt
from ._rowwise import load_label, row_max_sumexp

__all__ = ["ensemble_cross_entropy", "EnsembleCrossEntropy"]

HAS_TRITON_BACKWARD = True

# Chunk width x warps per token program (each chunk is one member row's slice, as in comp_sum_loss).
# logit_mean holds its chunk's member sums in fp64: at 2048 x 8 warps its kernels need 48-58
# registers a thread (sm_90, ptxas -v), as comp_sum_loss's at 4096; at 4096 they need 117-126.
LAUNCH = rt.RowLaunch(block=4096, warps=8)
LOGIT_MEAN_LAUNCH = rt.RowLaunch(block=2048, warps=8)


@triton.jit
def _member_logit_sum(row_ptr, stride_k, cols, mask, stride_v, K):
    """S_v = sum_k Z_kv over the K members for the columns ``cols`` of one token, in fp64."""
    total = tl.zeros(cols.shape, tl.float64)
    for k in range(K):
        x = tl.load(row_ptr + k * stride_k + cols * stride_v, mask=mask, other=0.0)
        total += x.to(tl.float32).to(tl.float64)
    return total


@triton.jit
def _member_target_log_prob(row_ptr, stride_k, stride_v, stats_ptr, k, safe, inv_temp):
    """a_k = log p_k(y) = (Z_ky - m_k) / t - log s_k from the saved (m_k, s_k) of member k."""
    m = tl.load(stats_ptr + k * 2).to(tl.float32)
    s = tl.load(stats_ptr + k * 2 + 1).to(tl.float32)
    z_target = tl.load(row_ptr + k * stride_k + safe * stride_v).to(tl.float32)
    return (z_target - m) * inv_temp - tl.log(s), m, s


@triton.jit
def _ensemble_forward_kernel(
    logits_ptr, stride_k, stride_n, stride_v,  # (K, N, V) member logits: Z_kiv at k*stride_k + i*stride_n + v*stride_v
    target_ptr, stride_target,                 # (N,) integer labels
    loss_ptr,                                  # out (N,) fp32: loss_i; 0 if ignored; NaN if the label is invalid
    row_weight_ptr,                            # out (N,) fp32: 1, or 0 if ignored (the mean's denominator)
    stats_ptr,                                 # out (N, KS, 2) fp64 contiguous: (m, s) per token (KS = 1)
                                               #   or per member (KS = K, prob_mean)
    K, V, inv_temp, scale, log_k, ignore_index,  # inv_temp = 1 / t, scale = 1 / (K t), log_k = log K
    PROB_MEAN: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    stride_k = tl.zeros([], tl.int64) + stride_k  # int64, so that k * stride_k cannot overflow
    row_ptr = logits_ptr + row * stride_n  # member 0 of this token; member k is k * stride_k further
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, V, ignore_index)

    if PROB_MEAN:
        stats = stats_ptr + row * K * 2
        a_max = tl.full([], float("-inf"), tl.float32)  # online log-sum-exp of the a_k over members
        a_sum = tl.zeros([], tl.float32)
        for k in range(K):
            m, s = row_max_sumexp(row_ptr + k * stride_k, stride_v, V, inv_temp, BLOCK_V)
            tl.store(stats + k * 2, m.to(tl.float64))
            tl.store(stats + k * 2 + 1, s.to(tl.float64))
            a = (tl.load(row_ptr + k * stride_k + safe * stride_v).to(tl.float32) - m) * inv_temp - tl.log(s)
            a_new = tl.maximum(a_max, a)
            shift = tl.where(a_new == float("-inf"), 0.0, a_new)
            a_sum = a_sum * tl.exp(a_max - shift) + tl.exp(a - shift)  # a NaN a_k makes the sum NaN
            a_max = a_new
        shift = tl.where(a_max == float("-inf"), 0.0, a_max)
        loss = log_k - (shift + tl.log(a_sum))
    else:
        m = tl.full([], float("-inf"), tl.float64)  # running max of the member sums S_v
        s = tl.zeros([], tl.float32)                # running sum of exp((S_v - m) / (K t))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
            total = _member_logit_sum(row_ptr, stride_k, cols, cols < V, stride_v, K)
            total = tl.where(cols < V, total, float("-inf"))
            m_new = tl.maximum(m, tl.max(total, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(((m - shift) * scale).to(tl.float32)) \
                + tl.sum(tl.exp(((total - shift) * scale).to(tl.float32)), axis=0)
            m = m_new
        s_target = tl.zeros([], tl.float64)  # S_y, summed in the same order as the chunks' S_v
        for k in range(K):
            s_target += tl.load(row_ptr + k * stride_k + safe * stride_v).to(tl.float32).to(tl.float64)
        loss = tl.log(s) - ((s_target - m) * scale).to(tl.float32)
        tl.store(stats_ptr + row * 2, m)
        tl.store(stats_ptr + row * 2 + 1, s.to(tl.float64))

    loss = tl.where(valid, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(row_weight_ptr + row, tl.where(ignored, 0.0, 1.0))


@triton.jit
def _ensemble_backward_kernel(
    grad_loss_ptr, stride_grad,                # (N,) upstream gradient of the per-token losses (stride 0 if broadcast)
    logits_ptr, stride_k, stride_n, stride_v,  # (K, N, V) member logits, as in the forward
    target_ptr, stride_target,
    stats_ptr,                                 # (N, KS, 2) fp64 saved by the forward
    grad_ptr, grad_stride_k, grad_stride_n, grad_stride_v,  # out (K, N, V) in the logits' dtype
    K, V, inv_temp, scale, inv_k, ignore_index,  # inv_k = 1 / K
    PROB_MEAN: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    stride_k = tl.zeros([], tl.int64) + stride_k  # int64, so that k * stride_k cannot overflow
    grad_stride_k = tl.zeros([], tl.int64) + grad_stride_k
    row_ptr = logits_ptr + row * stride_n
    out_ptr = grad_ptr + row * grad_stride_n
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, V, ignore_index)
    g = tl.load(grad_loss_ptr + row * stride_grad).to(tl.float32)

    if PROB_MEAN:
        stats = stats_ptr + row * K * 2
        a_max = tl.full([], float("-inf"), tl.float32)
        a_sum = tl.zeros([], tl.float32)
        for k in range(K):
            a, m, s = _member_target_log_prob(row_ptr, stride_k, stride_v, stats, k, safe, inv_temp)
            a_new = tl.maximum(a_max, a)
            shift = tl.where(a_new == float("-inf"), 0.0, a_new)
            a_sum = a_sum * tl.exp(a_max - shift) + tl.exp(a - shift)
            a_max = a_new
        a_shift = tl.where(a_max == float("-inf"), 0.0, a_max)
        for k in range(K):
            a, m, s = _member_target_log_prob(row_ptr, stride_k, stride_v, stats, k, safe, inv_temp)
            # Responsibility r_k; uniform when every member gives the target probability 0 (a_sum = 0).
            r = tl.where(a_sum == 0.0, inv_k, tl.exp(a - a_shift) / a_sum)
            coef = tl.where(valid, g * r * inv_temp, float("nan"))
            inv_s = 1.0 / s
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
                mask = cols < V
                x = tl.load(row_ptr + k * stride_k + cols * stride_v, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp((x - m) * inv_temp) * inv_s
                d = tl.where(ignored, 0.0, coef * (p - tl.where(cols == y, 1.0, 0.0)))
                tl.store(out_ptr + k * grad_stride_k + cols * grad_stride_v, d.to(grad_ptr.dtype.element_ty),
                         mask=mask)
    else:
        m = tl.load(stats_ptr + row * 2)
        inv_s = 1.0 / tl.load(stats_ptr + row * 2 + 1).to(tl.float32)
        coef = tl.where(valid, g * scale, float("nan"))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
            mask = cols < V
            total = _member_logit_sum(row_ptr, stride_k, cols, mask, stride_v, K)
            p = tl.exp(((total - m) * scale).to(tl.float32)) * inv_s
            d = tl.where(ignored, 0.0, coef * (p - tl.where(cols == y, 1.0, 0.0)))
            d = d.to(grad_ptr.dtype.element_ty)
            for k in range(K):  # every member gets the same gradient
                tl.store(out_ptr + k * grad_stride_k + cols * grad_stride_v, d, mask=mask)


def _launch(v: int, prob_mean: bool) -> dict:
    """``BLOCK_V`` and warps for rows of V classes."""
    launch = rt.row_launch(v, LAUNCH if prob_mean else LOGIT_MEAN_LAUNCH)
    return {"BLOCK_V": launch["BLOCK_C"], "num_warps": launch["num_warps"]}


def _scalars(k: int, temperature: float) -> tuple[float, float]:
    return 1.0 / temperature, 1.0 / (k * temperature)


@torch.library.custom_op("twinops::ensemble_cross_entropy_rows", mutates_args=())
def _ensemble_rows(
    logits: torch.Tensor, target: torch.Tensor, prob_mean: bool, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k, n, v = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    row_weight = torch.empty_like(loss)
    stats = torch.empty((n, k if prob_mean else 1, 2), device=logits.device, dtype=torch.float64)
    if n > 0:
        inv_temp, scale = _scalars(k, temperature)
        _ensemble_forward_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1), logits.stride(2), target, target.stride(0),
            loss, row_weight, stats, k, v, inv_temp, scale, math.log(k), ignore_index,
            PROB_MEAN=prob_mean, **_launch(v, prob_mean),
        )
    return loss, row_weight, stats


@_ensemble_rows.register_fake
def _(logits, target, prob_mean, temperature, ignore_index):
    k, n, _ = logits.shape
    loss = logits.new_empty(n, dtype=torch.float32)
    return loss, torch.empty_like(loss), logits.new_empty((n, k if prob_mean else 1, 2), dtype=torch.float64)


@torch.library.custom_op("twinops::ensemble_cross_entropy_rows_backward", mutates_args=())
def _ensemble_rows_backward(
    grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
    prob_mean: bool, temperature: float, ignore_index: int,
) -> torch.Tensor:
    k, n, v = logits.shape
    grad_logits = torch.empty((k, n, v), device=logits.device, dtype=logits.dtype)
    if n > 0:
        inv_temp, scale = _scalars(k, temperature)
        _ensemble_backward_kernel[(n,)](
            grad_loss, grad_loss.stride(0), logits, logits.stride(0), logits.stride(1), logits.stride(2),
            target, target.stride(0), stats,
            grad_logits, grad_logits.stride(0), grad_logits.stride(1), grad_logits.stride(2),
            k, v, inv_temp, scale, 1.0 / k, ignore_index, PROB_MEAN=prob_mean, **_launch(v, prob_mean),
        )
    return grad_logits


@_ensemble_rows_backward.register_fake
def _(grad_loss, logits, target, stats, prob_mean, temperature, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, target, prob_mean, temperature, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[2])
    ctx.prob_mean, ctx.temperature, ctx.ignore_index = prob_mean, temperature, ignore_index


def _backward(ctx, grad_loss, grad_row_weight, grad_stats):
    logits, target, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _ensemble_rows_backward(grad_loss, logits, target, stats, ctx.prob_mean, ctx.temperature,
                                       ctx.ignore_index)
    return grad, None, None, None, None


_ensemble_rows.register_autograd(_backward, setup_context=_setup_context)


def _check_logits(logits) -> torch.Tensor:
    rt.check_float_tensor(logits, "logits", 3, "(K, N, V)")
    if logits.shape[0] < 1:
        raise ValueError(f"logits must have at least one ensemble member (K >= 1), got shape {tuple(logits.shape)}")
    if logits.shape[2] < 1:
        raise ValueError(f"logits must have at least one class (V >= 1), got shape {tuple(logits.shape)}")
    return logits


def ensemble_cross_entropy(logits, target, *, mode="logit_mean", temperature=1.0, ignore_index=-100,
                           reduction="mean"):
    """Cross-entropy of the ensemble of the K members in ``logits`` (K, N, V) against ``target`` (N,), on the GPU.

    Same arguments and semantics as `twinops.reference.classification.ensemble_cross_entropy`;
    returns the input dtype. Labels outside [0, V) that are not ``ignore_index`` give NaN for
    their token (and so for a mean or sum) instead of an error, since checking them would
    synchronise the device. The gradient with respect to ``logits`` is a new (K, N, V) tensor.
    """
    _check_logits(logits)
    rt.check_target(target, logits.shape[1])
    ignore_index = check_int(ignore_index, "ignore_index")
    rt.check_reduction(reduction)
    check_choice(mode, "mode", MODES)
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    rt.check_device(("logits", logits), ("target", target))
    loss, row_weight, _ = _ensemble_rows(logits, target, mode == "prob_mean", temperature, ignore_index)
    return rt.reduce_rows(loss, row_weight, reduction, logits.dtype)


class EnsembleCrossEntropy(torch.nn.Module):
    """``nn.Module`` form of `ensemble_cross_entropy`: ``forward(logits (K, N, V), target (N,))``."""

    def __init__(self, *, mode="logit_mean", temperature=1.0, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.mode, self.temperature = mode, temperature
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, target):
        return ensemble_cross_entropy(logits, target, mode=self.mode, temperature=self.temperature,
                                      ignore_index=self.ignore_index, reduction=self.reduction)
