"""Smooth adversarial comp-sum losses (P13) as Triton kernels. See
`twinops.reference.classification.smooth_adv_comp_sum_loss` for the definition.

Per row i, with z the clean logits, z' the adversarial ones, e = z' - z and d_k = e_k - e_y:

Forward:   m_i, s_i = max and sum-exp of z_i        (``row_max_sumexp``, one read of z_i)
           r_i = ||d_i||_2, D_i = sum_k d_ik        (one read of z_i and z'_i)
           loss_i = Phi^tau(z_i, y_i) + nu * r_i    (Phi^tau from log p_y = z_iy - m_i - log s_i)
Backward:  dz'_ik = g_i * nu * (d_ik - [k = y] D_i) / r_i      (0 where r_i = 0)
           dz_ik  = g_i * p_y^(tau - 1) * (p_ik - [k = y]) - dz'_ik
The forward saves (m_i, s_i, r_i, D_i), 16 bytes a row; the backward reads both rows once and writes
each requested gradient once, recomputing p_ik = exp(z_ik - m_i) / s_i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt
from .._triton_math import expm1
from ._rowwise import load_label, row_max_sumexp

__all__ = ["smooth_adv_comp_sum_loss", "SmoothAdvCompSumLoss"]

HAS_TRITON_BACKWARD = True

# Chunk width x warps per row program, as comp_sum_loss (not swept separately).
LAUNCH = rt.RowLaunch(block=4096, warps=8)


@triton.jit
def _comp_sum_from_stats(x_y, m, s, tau):
    """log p_y and Phi^tau(p_y) from the target logit and the row's max / sum-exp."""
    log_py = (x_y - m) - tl.log(s)
    safe_denominator = tl.where(tau == 1.0, 1.0, tau - 1.0)
    return log_py, tl.where(tau == 1.0, -log_py, -expm1((tau - 1.0) * log_py) / safe_denominator)


@triton.jit
def _smooth_adv_forward_kernel(
    logits_ptr, stride_row, stride_col,          # (N, C) clean logits; (i, k) at i*stride_row + k*stride_col
    adv_ptr, stride_adv_row, stride_adv_col,     # (N, C) adversarial logits
    target_ptr, stride_target,                   # (N,) integer labels
    loss_ptr,                                    # out (N,) fp32: loss_i; 0 if ignored; NaN if label invalid
    row_weight_ptr,                              # out (N,) fp32: 1, or 0 if ignored (the mean's denominator)
    stats_ptr,                                   # out (N, 4) fp32 contiguous: m_i, s_i, r_i, D_i
    C, tau, nu, ignore_index,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    adv_row_ptr = adv_ptr + row * stride_adv_row
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)

    m, s = row_max_sumexp(row_ptr, stride_col, C, 1.0, BLOCK_C)
    x_y = tl.load(row_ptr + safe * stride_col).to(tl.float32)
    e_y = tl.load(adv_row_ptr + safe * stride_adv_col).to(tl.float32) - x_y
    _, loss = _comp_sum_from_stats(x_y, m, s, tau)

    sum_sq = 0.0
    sum_d = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < C
        x = tl.load(row_ptr + cols * stride_col, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(adv_row_ptr + cols * stride_adv_col, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, (a - x) - e_y, 0.0)
        sum_sq += tl.sum(d * d, axis=0)
        sum_d += tl.sum(d, axis=0)
    r = tl.sqrt(sum_sq)

    loss = tl.where(valid, loss + nu * r, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(row_weight_ptr + row, tl.where(ignored, 0.0, 1.0))
    tl.store(stats_ptr + row * 4, m)
    tl.store(stats_ptr + row * 4 + 1, s)
    tl.store(stats_ptr + row * 4 + 2, r)
    tl.store(stats_ptr + row * 4 + 3, sum_d)


@triton.jit
def _smooth_adv_backward_kernel(
    grad_loss_ptr, stride_grad,                  # (N,) upstream gradient of the per-row losses (stride 0 if broadcast)
    logits_ptr, stride_row, stride_col,          # (N, C) clean logits, as in the forward
    adv_ptr, stride_adv_row, stride_adv_col,     # (N, C) adversarial logits
    target_ptr, stride_target,
    stats_ptr,                                   # (N, 4) fp32 saved by the forward: m_i, s_i, r_i, D_i
    grad_logits_ptr, stride_gl_row, stride_gl_col,  # out (N, C) in the logits' dtype, written if NEED_CLEAN
    grad_adv_ptr, stride_ga_row, stride_ga_col,     # out (N, C) in the logits' dtype, written if NEED_ADV
    C, tau, nu, ignore_index,
    NEED_CLEAN: tl.constexpr, NEED_ADV: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    adv_row_ptr = adv_ptr + row * stride_adv_row
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)

    m = tl.load(stats_ptr + row * 4)
    s = tl.load(stats_ptr + row * 4 + 1)
    r = tl.load(stats_ptr + row * 4 + 2)
    sum_d = tl.load(stats_ptr + row * 4 + 3)
    x_y = tl.load(row_ptr + safe * stride_col).to(tl.float32)
    e_y = tl.load(adv_row_ptr + safe * stride_adv_col).to(tl.float32) - x_y
    log_py, _ = _comp_sum_from_stats(x_y, m, s, tau)
    inv_s = 1.0 / s

    g = tl.load(grad_loss_ptr + row * stride_grad).to(tl.float32)
    power = tl.where(tau == 1.0, 1.0, tl.exp((tau - 1.0) * log_py))  # p_y^(tau-1)
    factor = tl.where(valid, g * power, float("nan"))
    # d r / d z'_k = (d_k - [k = y] D) / r, defined as 0 at r = 0 (the norm's kink).
    reg = tl.where(r == 0.0, 0.0, nu * g / tl.where(r == 0.0, 1.0, r))
    reg = tl.where(valid, reg, float("nan"))

    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < C
        x = tl.load(row_ptr + cols * stride_col, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(adv_row_ptr + cols * stride_adv_col, mask=mask, other=0.0).to(tl.float32)
        is_y = cols == y
        d = (a - x) - e_y
        g_adv = tl.where(ignored, 0.0, reg * (d - tl.where(is_y, sum_d, 0.0)))
        if NEED_ADV:
            tl.store(grad_adv_ptr + row * stride_ga_row + cols * stride_ga_col,
                     g_adv.to(grad_adv_ptr.dtype.element_ty), mask=mask)
        if NEED_CLEAN:
            p = tl.exp(x - m) * inv_s
            g_clean = tl.where(ignored, 0.0, factor * (p - tl.where(is_y, 1.0, 0.0)) - g_adv)
            tl.store(grad_logits_ptr + row * stride_gl_row + cols * stride_gl_col,
                     g_clean.to(grad_logits_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("twinops::smooth_adv_comp_sum_loss_rows", mutates_args=())
def _smooth_adv_rows(
    logits: torch.Tensor, target: torch.Tensor, adv_logits: torch.Tensor, tau: float, nu: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    row_weight = torch.empty_like(loss)
    stats = torch.empty((n, 4), device=logits.device, dtype=torch.float32)
    if n > 0:
        _smooth_adv_forward_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1), adv_logits, adv_logits.stride(0), adv_logits.stride(1),
            target, target.stride(0), loss, row_weight, stats, c, tau, nu, ignore_index,
            **rt.row_launch(c, LAUNCH),
        )
    return loss, row_weight, stats


@_smooth_adv_rows.register_fake
def _(logits, target, adv_logits, tau, nu, ignore_index):
    n = logits.shape[0]
    out = logits.new_empty(n, dtype=torch.float32)
    return out, torch.empty_like(out), logits.new_empty((n, 4), dtype=torch.float32)


@torch.library.custom_op("twinops::smooth_adv_comp_sum_loss_rows_backward", mutates_args=())
def _smooth_adv_rows_backward(
    grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, adv_logits: torch.Tensor,
    stats: torch.Tensor, tau: float, nu: float, ignore_index: int, need_clean: bool, need_adv: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for the clean and the adversarial logits; one not asked for is an empty tensor."""
    n, c = logits.shape
    grad_logits = torch.empty((n, c) if need_clean else (0,), device=logits.device, dtype=logits.dtype)
    grad_adv = torch.empty((n, c) if need_adv else (0,), device=logits.device, dtype=adv_logits.dtype)
    if n > 0 and (need_clean or need_adv):
        gl = grad_logits if need_clean else grad_adv  # a valid pointer for the branch that is compiled out
        ga = grad_adv if need_adv else grad_logits
        _smooth_adv_backward_kernel[(n,)](
            grad_loss, grad_loss.stride(0), logits, logits.stride(0), logits.stride(1),
            adv_logits, adv_logits.stride(0), adv_logits.stride(1), target, target.stride(0), stats,
            gl, gl.stride(0), gl.stride(-1), ga, ga.stride(0), ga.stride(-1), c, tau, nu, ignore_index,
            NEED_CLEAN=need_clean, NEED_ADV=need_adv, **rt.row_launch(c, LAUNCH),
        )
    return grad_logits, grad_adv


@_smooth_adv_rows_backward.register_fake
def _(grad_loss, logits, target, adv_logits, stats, tau, nu, ignore_index, need_clean, need_adv):
    n, c = logits.shape
    return (logits.new_empty((n, c) if need_clean else (0,)),
            adv_logits.new_empty((n, c) if need_adv else (0,)))


def _setup_context(ctx, inputs, output):
    logits, target, adv_logits, tau, nu, ignore_index = inputs
    ctx.save_for_backward(logits, target, adv_logits, output[2])
    ctx.hyper = (tau, nu, ignore_index)


def _backward(ctx, grad_loss, grad_row_weight, grad_stats):
    logits, target, adv_logits, stats = ctx.saved_tensors
    need_clean, need_adv = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_clean or need_adv):
        return None, None, None, None, None, None
    grad_logits, grad_adv = _smooth_adv_rows_backward(
        grad_loss, logits, target, adv_logits, stats, *ctx.hyper, need_clean, need_adv)
    return (grad_logits if need_clean else None), None, (grad_adv if need_adv else None), None, None, None


_smooth_adv_rows.register_autograd(_backward, setup_context=_setup_context)


def smooth_adv_comp_sum_loss(logits, target, adv_logits, *, tau=1.0, nu=1.0, ignore_index=-100, reduction="mean"):
    """Smooth adversarial comp-sum loss of P13 on the GPU: comp-sum loss of ``logits`` plus ``nu`` times
    the l2 change of the label-relative margins under ``adv_logits``.

    Same arguments and semantics as `twinops.reference.classification.smooth_adv_comp_sum_loss`;
    returns the logits' dtype. Labels outside [0, C) that are not ``ignore_index`` give NaN for
    their row (and so for a mean or sum) instead of an error, since checking them would
    synchronise the device.
    """
    ignore_index = rt.check_row_loss(logits, target, ignore_index, reduction)
    rt.check_float_tensor(adv_logits, "adv_logits", 2, "(N, C)")
    if adv_logits.shape != logits.shape:
        raise ValueError(f"adv_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(adv_logits.shape)}")
    if adv_logits.dtype != logits.dtype:
        raise TypeError(f"adv_logits must have the dtype of logits ({logits.dtype}), got {adv_logits.dtype}")
    rt.check_device(("logits", logits), ("adv_logits", adv_logits))
    tau = check_real(tau, "tau", low=0.0)
    nu = check_real(nu, "nu", low=0.0)
    loss, row_weight, _ = _smooth_adv_rows(logits, target, adv_logits, tau, nu, ignore_index)
    return rt.reduce_rows(loss, row_weight, reduction, logits.dtype)


class SmoothAdvCompSumLoss(torch.nn.Module):
    """``nn.Module`` form of `smooth_adv_comp_sum_loss`: ``loss(logits, target, adv_logits)``."""

    def __init__(self, *, tau=1.0, nu=1.0, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.tau, self.nu, self.ignore_index, self.reduction = tau, nu, ignore_index, reduction

    def forward(self, logits, target, adv_logits):
        return smooth_adv_comp_sum_loss(logits, target, adv_logits, tau=self.tau, nu=self.nu,
                                        ignore_index=self.ignore_index, reduction=self.reduction)
