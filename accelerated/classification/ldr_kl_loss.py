"""LDR-KL and ALDR-KL losses (P42) as Triton kernels. See
`twinops.reference.classification.ldr_kl_loss` for the definition.

With d_k = x_k - x_y + c [k != y] (so d_y = 0) and temperature lam, per row i:

    loss_i = lam * log((1/K) sum_k exp(d_k / lam)),      dx_ik = g_i * (softmax(d / lam)_k - [k = y]).

The kernels never form d_k / lam from the raw logits. At small lam that quotient is large and its
fp32 rounding (relative to |x / lam|) becomes a visible error in the softmax. Instead they split
off the target and work in logit units relative to the row's largest non-target logit:

    mx = max_{k != y} x_k,   s = sum_{k != y} exp((x_k - mx) / lam),
    D  = mx - x_y + c        (the largest d_k, k != y),   M = max(D, 0) (the largest d_k),
    S  = s exp((D - M) / lam) + exp(-M / lam)             (sum_k exp((d_k - M) / lam)),
    loss = M + lam log(S / K).

Every exponent is then a difference of nearby logits. At large lam the row is nearly uniform,
S is close to K, and log S - log K would cancel (times lam, up to 20); so the loop also sums
expm1 of the same exponents, giving S - K directly, and log(S / K) = log1p((S - K) / K) when
S > K / 2. The backward needs, per row,
p_k = exp((x_k - mx) / lam + w) for k != y, with w = (D - M) / lam - log S, and
1 - p_y = q = s exp((D - M) / lam) / S, so the target entry -g q has no cancellation. The forward
saves (mx, w, q): 12 bytes a row. Bytes: LDR reads the logits once forward; the backward reads them
once and writes the gradient once.

ALDR-KL gives every row its own temperature, from the caller's ``lam_prev``. Its forward walks the
row three times: (1) the online max and sum of exp(x / lam_prev); (2) kl = sum_k p'_k log(K p'_k)
with p' = (softmax(x / lam_prev) + 1e-5) / (1 + K 1e-5), then lam_new = lam0 (1 - kl / (alpha log K));
(3) the LDR pass above at lam_new. Each pass needs the previous pass's result for the whole row, so
the byte model counts three reads of the logits (rows that stay in cache between passes cost less in
practice). The penalty (alpha log K / (2 lam0)) (lam_new - lam0)^2 is evaluated as
lam0 kl^2 / (2 alpha log K), the same value without the cancellation in lam_new - lam0. The
backward is LDR's kernel with the per-row lam_new saved by the forward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt
from .._triton_math import expm1, log1p
from ._rowwise import load_label, row_max_sumexp

__all__ = ["ldr_kl_loss", "aldr_kl_loss", "LDRKLLoss", "ALDRKLLoss"]

HAS_TRITON_BACKWARD = True

# Chunk width x warps per row program; kept at 4096 x 8 warps: no other pair was better in every dtype and direction on an H200.
LAUNCH = rt.RowLaunch(block=4096, warps=8)
# ALDR's three-pass forward: 1024 x 4 warps reached 64% of copy bandwidth (fp32) against 57% at 4096 x 8.
ALDR_FORWARD_LAUNCH = rt.RowLaunch(block=1024, warps=4)

PROB_FLOOR = tl.constexpr(1e-5)  # added to the ALDR softmax before renormalising, as in the reference
_STATS = 3  # per-row floats the forward saves: mx, w, q (see the module docstring)


@triton.jit
def _ldr_row(row_ptr, stride_col, C, y, margin, lam, log_k, BLOCK_C: tl.constexpr):
    """One read of a row: its LDR-KL loss at temperature ``lam`` and the backward's (mx, w, q).

    Besides ``s = sum_{k != y} exp(u_k)``, u_k = (x_k - mx) / lam, the loop keeps
    ``em = sum_{k != y} expm1(u_k)`` (that is s minus the non-target lanes seen so far). A max that
    rises by lam * delta turns em into ``exp(-delta) em + seen expm1(-delta)``. ``y`` must be a
    valid column (callers pass the safe label). ``x_y - x_y`` is 0, or NaN when ``x_y`` is NaN or
    infinite, and is added to D so that such rows (K = 1 included) come out NaN, as
    d_y = x_y - x_y does in the reference.
    """
    inv_lam = 1.0 / lam
    mx = float("-inf")
    s = 0.0
    em = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        keep = (cols < C) & (cols != y)
        x = tl.load(row_ptr + cols * stride_col, mask=keep, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(mx, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        neg_delta = tl.where(m_new == mx, 0.0, (mx - shift) * inv_lam)  # -inf when mx was -inf
        rescale = tl.exp(neg_delta)
        seen = start - tl.where(y < start, 1, 0)  # non-target lanes already in em
        u = (x - shift) * inv_lam
        s = s * rescale + tl.sum(tl.exp(u), axis=0)
        em = em * rescale + seen * expm1(neg_delta) + tl.sum(tl.where(keep, expm1(u), 0.0), axis=0)
        mx = m_new

    x_y = tl.load(row_ptr + y * stride_col).to(tl.float32)
    top = mx - x_y + margin + (x_y - x_y)    # D = max_{k != y} d_k; -inf when K = 1
    big = tl.where(top > 0.0, top, 0.0)      # M = max(D, d_y); a NaN D keeps 0 and poisons `t`
    t = (top - big) * inv_lam                # <= 0
    r = -big * inv_lam                       # <= 0; t or r is 0
    a = tl.exp(t)
    rest = s * a                             # sum_{k != y} exp((d_k - M) / lam)
    total = rest + tl.exp(r)                 # S
    # S - K as a sum of terms that are all <= 0, so it keeps its digits when S is close to K
    k_float = C * 1.0
    excess = em * a + (k_float - 1.0) * expm1(t) + expm1(r)
    log_mean = tl.where(excess > -0.5 * k_float, log1p(excess / k_float), tl.log(total) - log_k)
    loss = big + lam * log_mean
    w = t - tl.log(total)                    # log p_k = (x_k - mx) / lam + w for k != y
    q = rest / total                         # 1 - p_y
    return loss, mx, w, q


@triton.jit
def _store_stats(stats_ptr, row, mx, w, q):
    base = stats_ptr + row * 3
    tl.store(base, mx)
    tl.store(base + 1, w)
    tl.store(base + 2, q)


@triton.jit
def _ldr_kl_forward_kernel(
    logits_ptr, stride_row, stride_col,  # (N, C) logits; element (i, k) at i*stride_row + k*stride_col
    target_ptr, stride_target,           # (N,) integer labels
    loss_ptr,                            # out (N,) fp32: loss_i; 0 if ignored; NaN if label invalid
    row_weight_ptr,                      # out (N,) fp32: 1, or 0 if ignored (the mean's denominator)
    stats_ptr,                           # out (N, 3) fp32 contiguous: (mx, w, q) of row i, for the backward
    C, margin, lam, log_k, ignore_index,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)

    loss, mx, w, q = _ldr_row(row_ptr, stride_col, C, safe, margin, lam, log_k, BLOCK_C)
    loss = tl.where(valid, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(row_weight_ptr + row, tl.where(ignored, 0.0, 1.0))
    _store_stats(stats_ptr, row, mx, w, q)


@triton.jit
def _aldr_kl_forward_kernel(
    logits_ptr, stride_row, stride_col,  # (N, C) logits; element (i, k) at i*stride_row + k*stride_col
    target_ptr, stride_target,           # (N,) integer labels
    lam_prev_ptr, stride_lam_prev,       # (N,) floating: the rows' stored temperatures
    loss_ptr,                            # out (N,) fp32: loss_i; 0 if ignored; NaN as lam_new_i below
    row_weight_ptr,                      # out (N,) fp32: 1, or 0 if ignored
    lam_new_ptr,                         # out (N,) fp32: lam_new_i; lam_prev_i if ignored; NaN if the label
                                         # is invalid or lam_prev_i is not finite and > 0
    stats_ptr,                           # out (N, 3) fp32 contiguous: (mx, w, q) of row i at lam_new_i
    C, margin, lam0, alpha, log_k, ignore_index,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)
    lam_prev = tl.load(lam_prev_ptr + row * stride_lam_prev).to(tl.float32)
    valid = valid & (lam_prev > 0.0) & (lam_prev < float("inf"))  # else NaN loss and lam_new, as for a bad label

    # Pass 1: softmax(x / lam_prev) normaliser, in logit units.
    inv_prev = 1.0 / lam_prev
    mx1, s1 = row_max_sumexp(row_ptr, stride_col, C, inv_prev, BLOCK_C)

    # Pass 2: kl = sum_k p'_k log(K p'_k) of the floored softmax.
    k_float = C * 1.0
    inv_norm = 1.0 / (1.0 + k_float * PROB_FLOOR)
    kl = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < C
        x = tl.load(row_ptr + cols * stride_col, mask=mask, other=float("-inf")).to(tl.float32)
        p = (tl.exp((x - mx1) * inv_prev) / s1 + PROB_FLOOR) * inv_norm
        kl += tl.sum(tl.where(mask, p * tl.log(k_float * p), 0.0), axis=0)
    one_class = log_k == 0.0  # K = 1: lam_new = lam0 and no penalty
    alpha_log_k = tl.where(one_class, 1.0, alpha * log_k)
    lam_new = tl.where(one_class, lam0, lam0 * (1.0 - kl / alpha_log_k))
    penalty = tl.where(one_class, 0.0, 0.5 * lam0 * kl * kl / alpha_log_k)

    # Pass 3: LDR-KL at lam_new (ignored rows use 1, any positive value; their loss is masked).
    lam = tl.where(ignored, 1.0, lam_new)
    loss, mx, w, q = _ldr_row(row_ptr, stride_col, C, safe, margin, lam, log_k, BLOCK_C)
    loss = tl.where(valid, loss - penalty, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(row_weight_ptr + row, tl.where(ignored, 0.0, 1.0))
    lam_out = tl.where(valid, lam_new, float("nan"))
    tl.store(lam_new_ptr + row, tl.where(ignored, lam_prev, lam_out))
    _store_stats(stats_ptr, row, mx, w, q)


@triton.jit
def _ldr_kl_backward_kernel(
    grad_loss_ptr, stride_grad,          # (N,) upstream gradient of the per-row losses (stride 0 if broadcast)
    logits_ptr, stride_row, stride_col,  # (N, C) logits, as in the forward
    target_ptr, stride_target,           # (N,) integer labels
    lam_ptr, stride_lam,                 # (N,) fp32 per-row temperature (ALDR's lam_new), read when PER_ROW_LAM
    stats_ptr,                           # (N, 3) fp32 (mx, w, q) saved by the forward
    grad_logits_ptr, stride_grad_row, stride_grad_col,  # out (N, C) in the logits' dtype
    C, lam, ignore_index,                # lam: the scalar temperature when not PER_ROW_LAM
    PER_ROW_LAM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_ptr = grad_logits_ptr + row * stride_grad_row
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)

    if PER_ROW_LAM:
        lam = tl.load(lam_ptr + row * stride_lam)
    lam = tl.where(ignored, 1.0, lam)
    inv_lam = 1.0 / lam
    mx = tl.load(stats_ptr + row * 3)
    w = tl.load(stats_ptr + row * 3 + 1)
    q = tl.load(stats_ptr + row * 3 + 2)
    factor = tl.load(grad_loss_ptr + row * stride_grad).to(tl.float32)
    factor = tl.where(valid, factor, float("nan"))

    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < C
        x = tl.load(row_ptr + cols * stride_col, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp((x - mx) * inv_lam + w)   # softmax(d / lam)_k for k != y
        g = factor * tl.where(cols == safe, -q, p)
        g = tl.where(ignored, 0.0, g)
        tl.store(out_ptr + cols * stride_grad_col, g.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _new_rows(logits):
    n = logits.shape[0]
    out = torch.empty(n, device=logits.device, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty((n, _STATS), device=logits.device, dtype=torch.float32)


@torch.library.custom_op("twinops::ldr_kl_loss_rows", mutates_args=())
def _ldr_kl_rows(
    logits: torch.Tensor, target: torch.Tensor, margin: float, lam: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = logits.shape
    loss, row_weight, stats = _new_rows(logits)
    if n > 0:
        _ldr_kl_forward_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1), target, target.stride(0),
            loss, row_weight, stats, c, margin, lam, math.log(c), ignore_index,
            **rt.row_launch(c, LAUNCH),
        )
    return loss, row_weight, stats


@_ldr_kl_rows.register_fake
def _(logits, target, margin, lam, ignore_index):
    n = logits.shape[0]
    out = logits.new_empty(n, dtype=torch.float32)
    return out, torch.empty_like(out), logits.new_empty((n, _STATS), dtype=torch.float32)


@torch.library.custom_op("twinops::aldr_kl_loss_rows", mutates_args=())
def _aldr_kl_rows(
    logits: torch.Tensor, target: torch.Tensor, lam_prev: torch.Tensor, margin: float, lam0: float,
    alpha: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = logits.shape
    loss, row_weight, stats = _new_rows(logits)
    lam_new = torch.empty_like(loss)
    if n > 0:
        _aldr_kl_forward_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1), target, target.stride(0),
            lam_prev, lam_prev.stride(0), loss, row_weight, lam_new, stats,
            c, margin, lam0, alpha, math.log(c), ignore_index,
            **rt.row_launch(c, ALDR_FORWARD_LAUNCH),
        )
    return loss, row_weight, lam_new, stats


@_aldr_kl_rows.register_fake
def _(logits, target, lam_prev, margin, lam0, alpha, ignore_index):
    n = logits.shape[0]
    out = logits.new_empty(n, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out), logits.new_empty((n, _STATS), dtype=torch.float32)


@torch.library.custom_op("twinops::ldr_kl_loss_rows_backward", mutates_args=())
def _ldr_kl_rows_backward(
    grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lam_rows: torch.Tensor | None,
    stats: torch.Tensor, lam: float, ignore_index: int,
) -> torch.Tensor:
    """Shared by LDR-KL (scalar ``lam``, ``lam_rows`` None) and ALDR-KL (``lam_rows`` = lam_new)."""
    n, c = logits.shape
    grad_logits = torch.empty((n, c), device=logits.device, dtype=logits.dtype)
    if n > 0:
        per_row = lam_rows is not None
        lam_arg = lam_rows if per_row else stats  # a placeholder pointer, never read
        _ldr_kl_backward_kernel[(n,)](
            grad_loss, grad_loss.stride(0), logits, logits.stride(0), logits.stride(1),
            target, target.stride(0), lam_arg, lam_arg.stride(0) if per_row else 0, stats,
            grad_logits, grad_logits.stride(0), grad_logits.stride(1), c, lam, ignore_index,
            PER_ROW_LAM=per_row, **rt.row_launch(c, LAUNCH),
        )
    return grad_logits


@_ldr_kl_rows_backward.register_fake
def _(grad_loss, logits, target, lam_rows, stats, lam, ignore_index):
    return logits.new_empty(logits.shape)


def _ldr_setup_context(ctx, inputs, output):
    logits, target, margin, lam, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[2])
    ctx.lam, ctx.ignore_index = lam, ignore_index
    ctx.mark_non_differentiable(output[1], output[2])


def _ldr_backward(ctx, grad_loss, grad_row_weight, grad_stats):
    logits, target, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _ldr_kl_rows_backward(grad_loss, logits, target, None, stats, ctx.lam, ctx.ignore_index)
    return grad, None, None, None, None


_ldr_kl_rows.register_autograd(_ldr_backward, setup_context=_ldr_setup_context)


def _aldr_setup_context(ctx, inputs, output):
    logits, target, lam_prev, margin, lam0, alpha, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[2], output[3])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _aldr_backward(ctx, grad_loss, grad_row_weight, grad_lam_new, grad_stats):
    logits, target, lam_new, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _ldr_kl_rows_backward(grad_loss, logits, target, lam_new, stats, 1.0, ctx.ignore_index)
    return grad, None, None, None, None, None, None  # lam_new is detached: no gradient to lam_prev


_aldr_kl_rows.register_autograd(_aldr_backward, setup_context=_aldr_setup_context)


def _check_lam_prev(lam_prev, n: int) -> torch.Tensor:
    rt.check_tensor(lam_prev, "lam_prev")
    if not lam_prev.dtype.is_floating_point:
        raise TypeError(f"lam_prev must be a floating-point tensor, got {lam_prev.dtype}")
    if tuple(lam_prev.shape) != (n,):
        raise ValueError(f"lam_prev must have shape ({n},) to match logits, got {tuple(lam_prev.shape)}")
    return lam_prev


def ldr_kl_loss(logits, target, *, margin=0.1, lam=1.0, ignore_index=-100, reduction="mean"):
    """LDR-KL loss of P42, ``lam * log mean_k exp(d_k / lam)``, on the GPU.

    Same arguments and semantics as `twinops.reference.classification.ldr_kl_loss`;
    returns the input dtype. Labels outside [0, C) that are not ``ignore_index`` give NaN for
    their row (and so for a mean or sum) instead of an error, since checking them would
    synchronise the device.
    """
    ignore_index = rt.check_row_loss(logits, target, ignore_index, reduction)
    margin = check_real(margin, "margin", low=0.0)
    lam = check_real(lam, "lam", low=0.0, low_open=True)
    loss, row_weight, _ = _ldr_kl_rows(logits, target, margin, lam, ignore_index)
    return rt.reduce_rows(loss, row_weight, reduction, logits.dtype)


def aldr_kl_loss(logits, target, lam_prev, *, margin=0.1, lam0=1.0, alpha=2.0, ignore_index=-100,
                 reduction="mean"):
    """ALDR-KL loss of P42 on the GPU; returns ``(loss, lam_new)``.

    Same arguments and semantics as `twinops.reference.classification.aldr_kl_loss`. ``loss``
    has the input dtype; ``lam_new`` is float32 of shape (N,), detached, and the caller stores it
    (``state[ids] = lam_new``); ``lam_prev`` is only read. ``lam_prev`` must be a floating tensor of
    shape (N,) on the logits' device (any floating dtype; it is read in fp32). Its values, like the
    labels, are checked on the device rather than raising, since raising would synchronise it: a
    non-ignored row whose ``lam_prev`` is not finite and > 0, or whose label is outside [0, C) and
    not ``ignore_index``, gets NaN loss and NaN ``lam_new`` (ignored rows pass ``lam_prev`` through
    unchecked). The gradient treats
    ``lam_new`` as a constant, as the reference's ``aldr_kl_loss_grad`` does; none flows to
    ``lam_prev``.
    """
    ignore_index = rt.check_row_loss(logits, target, ignore_index, reduction)
    lam_prev = _check_lam_prev(lam_prev, logits.shape[0])
    rt.check_device(("logits", logits), ("lam_prev", lam_prev))
    margin = check_real(margin, "margin", low=0.0)
    lam0 = check_real(lam0, "lam0", low=0.0, low_open=True)
    alpha = check_real(alpha, "alpha", low=1.0, low_open=True)
    loss, row_weight, lam_new, _ = _aldr_kl_rows(logits, target, lam_prev, margin, lam0, alpha, ignore_index)
    return rt.reduce_rows(loss, row_weight, reduction, logits.dtype), lam_new


class LDRKLLoss(torch.nn.Module):
    """``nn.Module`` form of `ldr_kl_loss`."""

    def __init__(self, *, margin=0.1, lam=1.0, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.margin, self.lam, self.ignore_index, self.reduction = margin, lam, ignore_index, reduction

    def forward(self, logits, target):
        return ldr_kl_loss(logits, target, margin=self.margin, lam=self.lam,
                           ignore_index=self.ignore_index, reduction=self.reduction)


class ALDRKLLoss(torch.nn.Module):
    """``nn.Module`` form of `aldr_kl_loss`.

    It holds no state: the per-sample temperatures belong to the training set, not to the loss, so
    the caller keeps them (e.g. ``state = torch.full((num_train,), lam0, device=...)``), passes
    ``state[ids]`` as ``lam_prev`` and stores the returned ``lam_new`` back with ``state[ids] = lam_new``.
    """

    def __init__(self, *, margin=0.1, lam0=1.0, alpha=2.0, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.margin, self.lam0, self.alpha = margin, lam0, alpha
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, target, lam_prev):
        return aldr_kl_loss(logits, target, lam_prev, margin=self.margin, lam0=self.lam0, alpha=self.alpha,
                            ignore_index=self.ignore_index, reduction=self.reduction)
