"""UNPG (P50) as flash-attention-shaped Triton kernels: neither the (B, C) class logits nor the (B, B)
pair cosines ever exist in memory. See `twinops.reference.metric.unpg_margin_softmax_loss` for the
definition.

Notation: x̂_i = x_i r_i with r_i = 1 / max(||x_i||, eps) (likewise ŵ_j = w_j ρ_j); a *class tile* is
cos = (X_I W_Jᵀ) r_I ρ_J for a block I of rows and a block J of class centres, computed with one
``tl.dot`` over the whole feature width; a *pair tile* is (X_I X_Jᵀ) r_I r_J for two row blocks with
I <= J (the pairs p < q of the strict upper triangle are always computed in this orientation, so every
pass sees bit-identical cosines and the filter decides the same way each time).

Forward
  1. Radix select (two passes over the pair tiles, 16 bits each) finds the two order statistics
     Q1 = ñ[L // 4] and Q3 = ñ[3L // 4] of the negative-pair cosines: ``_pair_histogram_kernel``
     histograms the upper half of the order-preserving integer key, the host picks the bin holding
     each rank (cumsum on the device, no synchronisation), a second pass histograms the lower half
     of the keys in those bins. This gives the whisker bounds lo, hi.
  2. ``_pair_sumexp_kernel``: per row p, (max, sum of exp) of s·n over its kept pairs p < q; combined
     on the host into log E = M + log Ẽ (two scalars).
  3. ``_class_forward_kernel``: per (row block, class split), online log-sum-exp over the class
     tiles with the margin applied to the target column in-tile (the target cosine and its margin
     are computed once per row block from the gathered rows W[y]); writes (m, l) per row and split
     and the target logit; l sums the non-target columns only, so that 1 - p_y = l / (l + e^{z_y - m})
     keeps its precision when p_y is close to 1 (as comp_sum_loss keeps m and l apart). The host
     merges the splits and the shared term E into l: loss_i = log1p(l_i) when z_iy is the row max,
     (m_i - z_iy) + log(l_i + e^{z_iy - m_i}) otherwise.
  Saved for the backward: (m_i, l_i, z_iy) per row and four scalars (lo, hi, M, Ẽ).
Backward (recomputes every tile)
  - ``_class_backward_rows_kernel``: per (row block, class split), dX̂_I += Gc Ŵ_J with
    Gc_ij = g_i s (p_ij - [j = y_i]) (∂t/∂cos at the target) and p_ij = exp(z_ij - m_i) / (l_i + e^{z_iy - m_i}).
  - ``_class_backward_cols_kernel``: per class block, dŴ_J = Σ_I Gcᵀ X̂_I, projected through the
    normalisation in-kernel and written as dW.
  - ``_pair_backward_kernel``: per row block, dX̂_I += G X̂ over the kept pairs on both sides,
    G_pq = c exp(s n_pq - M), c = s Σ_i g_i exp(M - lse_i) (one scalar).
  The row-side partial sums (one slab per class split plus one for the pairs) are added and
  projected through the normalisation on the host: O(splits · B · D) extra memory and no floating-point
  atomics (the histograms count with integer atomics, which are exact), so results are deterministic.
Extra memory: O(B) statistics, O(C) norms, three 65536-bin histograms, O(splits · B · D) for dX;
nothing of size B·C or B·B.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice, check_real
from .. import _runtime as rt

__all__ = ["unpg_margin_softmax_loss", "UNPGMarginSoftmaxLoss"]

HAS_TRITON_BACKWARD = True

MARGIN_TYPES = ("arcface", "cosface")
MAX_SPLITS = 8  # class splits per row block on the GPU (each adds one (B, D) fp32 slab backward)


# ------------------------------------------------------------------------------------- helpers


@triton.jit
def _row_block(ptr, stride_row, stride_col, norm_ptr, rows, n_rows, D, eps, BLOCK_D: tl.constexpr):
    """Rows ``rows`` of an (n_rows, D) matrix as a (len(rows), BLOCK_D) tile, zero outside the matrix,
    and their inverse norms r = 1 / max(||row||, eps) (torch.nn.functional.normalize's denominator)."""
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (rows < n_rows)[:, None] & (d < D)[None, :]
    tile = tl.load(ptr + rows[:, None] * stride_row + d[None, :] * stride_col, mask=mask, other=0.0)
    r = 1.0 / tl.maximum(tl.load(norm_ptr + rows, mask=rows < n_rows, other=1.0), eps)
    return tile, r


@triton.jit
def _target(x, rx, x_unit, y, w_ptr, stride_wc, stride_wd, wnorm_ptr, C, D, eps, cos_m, sin_m, margin,
            ARCFACE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row of a block: the margin target t(c) of the target cosine c = x̂_i · ŵ_{y_i}, dt/dc, and
    the fp32 rows ŵ_{y_i} (0 for labels out of range). ``x_unit``: the rows whose norm exceeds eps.

    ArcFace: cos(arccos(c') + m) = c' cos m - sin θ sin m with c' = c clamped to ±(1 - 2^-20);
    dt/dc = cos m + sin m · c / sin θ strictly inside the clamp, 0 at or beyond it. CosFace: t = c - m,
    dt/dc = 1. Near |c| = 1 the slope is ~1/θ, and sin θ = sqrt((1 - c)(1 + c)) from an fp32 cosine
    would carry a relative error ~1e-7 / θ²; for unit rows (1 - c) and (1 + c) are taken instead from
    |x̂ - ŵ|² / 2 and |x̂ + ŵ|² / 2, whose relative error is ~1e-7 / θ."""
    valid = (y >= 0) & (y < C)
    safe = tl.where(valid, y, 0)
    w_y, r_y = _row_block(w_ptr, stride_wc, stride_wd, wnorm_ptr, safe, C, D, eps, BLOCK_D)
    xh = x.to(tl.float32) * rx[:, None]
    wh = w_y.to(tl.float32) * r_y[:, None]
    c = tl.sum(xh * wh, axis=1)
    if ARCFACE:
        unit = x_unit & (tl.load(wnorm_ptr + safe, mask=valid, other=0.0) > eps)
        one_minus = tl.where(unit, 0.5 * tl.sum((xh - wh) * (xh - wh), axis=1), 1.0 - c)
        one_plus = tl.where(unit, 0.5 * tl.sum((xh + wh) * (xh + wh), axis=1), 1.0 + c)
        hi = 0.99999904632568359375  # 1 - 2^-20, exact in fp32
        inside = (c < hi) & (c > -hi)
        cc = tl.where(c > hi, hi, tl.where(c < -hi, -hi, c))  # where, not minimum: keeps NaN
        sin_theta = tl.sqrt(tl.where(inside, one_minus * one_plus, (1.0 - cc) * (1.0 + cc)))
        t = cc * cos_m - sin_theta * sin_m
        slope = tl.where(inside, cos_m + sin_m * c / tl.where(inside, sin_theta, 1.0), 0.0)
    else:
        t = c - margin
        slope = tl.full(c.shape, 1.0, tl.float32)
    return t, tl.where(c != c, float("nan"), slope), tl.where(valid[:, None], wh, 0.0)


# ------------------------------------------------------------------------------------- pair filter


@triton.jit
def _pair_histogram_kernel(
    x_ptr, stride_xb, stride_xd,      # (B, D) embeddings
    xnorm_ptr,                        # (B,) fp32 row norms
    y_ptr, stride_y,                  # (B,) integer labels
    prefix_ptr,                       # (2,) int32: upper 16 bits of the keys of Q1, Q3 (read when not HIGH)
    hist_ptr,                         # out, zeroed by the host: (65536,) int32 if HIGH, else (2, 65536)
    B, D, eps,
    HIGH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One radix-select pass over the negative-pair cosines n_pq (p < q, y_p != y_q) of row block i
    against blocks j >= i. Key = the fp32 bits with the low 31 bits flipped for negative values, so
    that the signed integer order is the float order. HIGH: histogram of the upper 16 bits (offset
    to 0..65535); otherwise histograms of the lower 16 bits of the keys whose upper half matches Q1's
    prefix, and of those matching Q3's."""
    i = tl.program_id(0).to(tl.int64)
    rows_a = i * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    xa, ra = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows_a, B, D, eps, BLOCK_D)
    ya = tl.load(y_ptr + rows_a * stride_y, mask=rows_a < B, other=0).to(tl.int64)
    if not HIGH:
        top0 = tl.load(prefix_ptr)
        top1 = tl.load(prefix_ptr + 1)
    for j in range(i, tl.cdiv(B, BLOCK_P)):
        rows_b = j * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        xb, rb = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows_b, B, D, eps, BLOCK_D)
        yb = tl.load(y_ptr + rows_b * stride_y, mask=rows_b < B, other=0).to(tl.int64)
        valid = (rows_a[:, None] < rows_b[None, :]) & (rows_b < B)[None, :] & (ya[:, None] != yb[None, :])
        n = tl.dot(xa, tl.trans(xb), input_precision=PRECISION) * ra[:, None] * rb[None, :]
        bits = n.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        if HIGH:
            tl.atomic_add(hist_ptr + ((key >> 16) + 32768), 1, mask=valid)
        else:
            low = key & 0xFFFF
            tl.atomic_add(hist_ptr + low, 1, mask=valid & ((key >> 16) == top0))
            tl.atomic_add(hist_ptr + 65536 + low, 1, mask=valid & ((key >> 16) == top1))


@triton.jit
def _pair_sumexp_kernel(
    x_ptr, stride_xb, stride_xd, xnorm_ptr, y_ptr, stride_y,  # as in _pair_histogram_kernel
    bounds_ptr,                       # (2,) fp32: lo = Q1 - w IQR, hi = Q3 + w IQR
    out_ptr,                          # out (2, B) fp32: per row p, the max of s n and the sum of
                                      # exp(s n - max) over its kept pairs p < q
    B, D, eps, scale,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    rows_a = i * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    xa, ra = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows_a, B, D, eps, BLOCK_D)
    ya = tl.load(y_ptr + rows_a * stride_y, mask=rows_a < B, other=0).to(tl.int64)
    lo = tl.load(bounds_ptr)
    hi = tl.load(bounds_ptr + 1)
    m = tl.full((BLOCK_P,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_P,), tl.float32)
    for j in range(i, tl.cdiv(B, BLOCK_P)):
        rows_b = j * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        xb, rb = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows_b, B, D, eps, BLOCK_D)
        yb = tl.load(y_ptr + rows_b * stride_y, mask=rows_b < B, other=0).to(tl.int64)
        valid = (rows_a[:, None] < rows_b[None, :]) & (rows_b < B)[None, :] & (ya[:, None] != yb[None, :])
        n = tl.dot(xa, tl.trans(xb), input_precision=PRECISION) * ra[:, None] * rb[None, :]
        keep = valid & (n >= lo) & (n <= hi)
        z = scale * n
        m_new = tl.maximum(m, tl.max(tl.where(keep, z, -float("inf")), axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        tile = tl.sum(tl.exp(tl.where(keep, z - m_safe[:, None], -float("inf"))), axis=1)
        poison = tl.sum(tl.where(valid & (n != n), float("nan"), 0.0), axis=1)  # a NaN pair makes E NaN
        l = l * tl.exp(m - m_safe) + tile + poison
        m = m_new
    tl.store(out_ptr + rows_a, m, mask=rows_a < B)
    tl.store(out_ptr + B + rows_a, l, mask=rows_a < B)


# ------------------------------------------------------------------------------------- class term


@triton.jit
def _class_forward_kernel(
    x_ptr, stride_xb, stride_xd,      # (B, D) embeddings
    xnorm_ptr,                        # (B,) fp32 row norms
    y_ptr, stride_y,                  # (B,) integer labels
    w_ptr, stride_wc, stride_wd,      # (C, D) class centres
    wnorm_ptr,                        # (C,) fp32 row norms
    part_ptr,                         # out (2, splits, B) fp32: per split, the max m over all columns
                                      # and the sum l of exp(z - m) over the non-target ones
    zy_ptr,                           # out (B,) fp32: target logit s t_i (written by split 0)
    B, C, D, classes_per_split, eps, scale, cos_m, sin_m, margin,
    ARCFACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    splits = tl.num_programs(1)
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    x, rx = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows, B, D, eps, BLOCK_D)
    y = tl.load(y_ptr + rows * stride_y, mask=rows < B, other=-1).to(tl.int64)
    x_unit = tl.load(xnorm_ptr + rows, mask=rows < B, other=0.0) > eps
    t, _, _ = _target(x, rx, x_unit, y, w_ptr, stride_wc, stride_wd, wnorm_ptr, C, D, eps, cos_m, sin_m, margin,
                   ARCFACE, BLOCK_D)
    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C)
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        w, rw = _row_block(w_ptr, stride_wc, stride_wd, wnorm_ptr, cols, c_end, D, eps, BLOCK_D)
        cos = tl.dot(x, tl.trans(w), input_precision=PRECISION) * rx[:, None] * rw[None, :]
        is_target = cols[None, :] == y[:, None]
        z = scale * tl.where(is_target, t[:, None], cos)  # margin on the target column
        z = tl.where((cols < c_end)[None, :], z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # l sums the other columns only: 1 - p_y = l / (l + exp(z_y - m)) then keeps its relative
        # precision when p_y is close to 1 (a well-classified row).
        l = l * tl.exp(m - m_new) + tl.sum(tl.where(is_target, 0.0, tl.exp(z - m_new[:, None])), axis=1)
        m = m_new
    tl.store(part_ptr + split * B + rows, m, mask=rows < B)
    tl.store(part_ptr + (splits + split) * B + rows, l, mask=rows < B)
    tl.store(zy_ptr + rows, scale * t, mask=(rows < B) & (split == 0))


@triton.jit
def _class_backward_rows_kernel(
    x_ptr, stride_xb, stride_xd, xnorm_ptr, y_ptr, stride_y,  # as in the forward
    w_ptr, stride_wc, stride_wd, wnorm_ptr,
    stats_ptr,                        # (B, 3) fp32 from the forward: m_i, l_i (non-target sum incl. E), z_iy
    g_ptr, stride_g,                  # (B,) fp32 upstream gradient of the row losses
    dxh_ptr,                          # out (splits + 1, B, D) fp32 contiguous: slab `split` gets Σ_J Gc Ŵ_J
    B, C, D, classes_per_split, eps, scale, cos_m, sin_m, margin,
    ARCFACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    x, rx = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows, B, D, eps, BLOCK_D)
    y = tl.load(y_ptr + rows * stride_y, mask=rows < B, other=-1).to(tl.int64)
    x_unit = tl.load(xnorm_ptr + rows, mask=rows < B, other=0.0) > eps
    t, slope, w_y = _target(x, rx, x_unit, y, w_ptr, stride_wc, stride_wd, wnorm_ptr, C, D, eps, cos_m, sin_m,
                            margin, ARCFACE, BLOCK_D)
    m = tl.load(stats_ptr + rows * 3, mask=rows < B, other=0.0)
    l_other = tl.load(stats_ptr + rows * 3 + 1, mask=rows < B, other=1.0)
    l = l_other + tl.exp(scale * t - m)  # lse_i = m_i + log l
    g = tl.load(g_ptr + rows * stride_g, mask=rows < B, other=0.0) * scale
    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C)
    # The target column's term Gc_iy ŵ_y is added here in fp32 (by split 0) and left out of the tile
    # products: ŵ_y is nearly parallel to x̂_i for a well-trained embedding, and the normalisation's
    # projection later cancels most of it, which a 16-bit (or TF32) operand could not survive.
    g_target = -g * (l_other / l) * slope  # g s (p_y - 1) dt/dc
    acc = tl.where(split == 0, g_target[:, None] * w_y, 0.0)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        w, rw = _row_block(w_ptr, stride_wc, stride_wd, wnorm_ptr, cols, c_end, D, eps, BLOCK_D)
        cos = tl.dot(x, tl.trans(w), input_precision=PRECISION) * rx[:, None] * rw[None, :]
        is_target = cols[None, :] == y[:, None]
        z = scale * tl.where(is_target, t[:, None], cos)
        z = tl.where((cols < c_end)[None, :], z, -float("inf"))
        p = tl.exp(z - m[:, None]) / l[:, None]
        gc = tl.where(is_target, 0.0, g[:, None] * p)  # Gc = dLoss/dcos = g s p off the target column
        w_hat = (w.to(tl.float32) * rw[:, None]).to(w.dtype)  # unit rows: O(1) operands in 16-bit too
        acc = tl.dot(gc.to(w.dtype), w_hat, acc, input_precision=PRECISION)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    out = dxh_ptr + (split * B + rows[:, None]) * D + d[None, :]
    tl.store(out, acc, mask=(rows < B)[:, None] & (d < D)[None, :])


@triton.jit
def _class_backward_cols_kernel(
    x_ptr, stride_xb, stride_xd, xnorm_ptr, y_ptr, stride_y,  # as in the forward
    w_ptr, stride_wc, stride_wd, wnorm_ptr,
    stats_ptr, g_ptr, stride_g,       # as in _class_backward_rows_kernel
    dw_ptr, stride_dwc, stride_dwd,   # out (C, D) in the weight's dtype
    B, C, D, eps, scale, cos_m, sin_m, margin,
    ARCFACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    w, rw = _row_block(w_ptr, stride_wc, stride_wd, wnorm_ptr, cols, C, D, eps, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for r0 in range(0, B, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        x, rx = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows, B, D, eps, BLOCK_D)
        y = tl.load(y_ptr + rows * stride_y, mask=rows < B, other=-1).to(tl.int64)
        x_unit = tl.load(xnorm_ptr + rows, mask=rows < B, other=0.0) > eps
        t, slope, _ = _target(x, rx, x_unit, y, w_ptr, stride_wc, stride_wd, wnorm_ptr, C, D, eps, cos_m, sin_m,
                              margin, ARCFACE, BLOCK_D)
        m = tl.load(stats_ptr + rows * 3, mask=rows < B, other=0.0)
        l_other = tl.load(stats_ptr + rows * 3 + 1, mask=rows < B, other=1.0)
        l = l_other + tl.exp(scale * t - m)
        g = tl.load(g_ptr + rows * stride_g, mask=rows < B, other=0.0) * scale
        cos = tl.dot(x, tl.trans(w), input_precision=PRECISION) * rx[:, None] * rw[None, :]
        is_target = cols[None, :] == y[:, None]
        z = scale * tl.where(is_target, t[:, None], cos)
        z = tl.where((cols < C)[None, :], z, -float("inf"))
        p = tl.exp(z - m[:, None]) / l[:, None]
        gc = tl.where(is_target, 0.0, g[:, None] * p)
        x_hat = (x.to(tl.float32) * rx[:, None]).to(x.dtype)
        acc = tl.dot(tl.trans(gc.to(x.dtype)), x_hat, acc, input_precision=PRECISION)
        # Target columns in this tile (rare for large C): Gc_iy x̂_i in exact fp32, as in the row pass.
        if tl.sum(is_target.to(tl.int32)) > 0:
            g_target = tl.where(is_target, (-g * (l_other / l) * slope)[:, None], 0.0)
            acc = tl.dot(tl.trans(g_target), x.to(tl.float32) * rx[:, None], acc, input_precision="ieee")
    # Backward of w / max(||w||, eps): (dŴ - ŵ (ŵ · dŴ)) / ||w|| above eps, dŴ / eps at or below it.
    wn = tl.load(wnorm_ptr + cols, mask=cols < C, other=1.0)
    w_hat = w.to(tl.float32) * rw[:, None]
    radial = tl.where((wn > eps)[:, None], w_hat * tl.sum(w_hat * acc, axis=1)[:, None], 0.0)
    dw = (acc - radial) * rw[:, None]
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    out = dw_ptr + cols[:, None] * stride_dwc + d[None, :] * stride_dwd
    tl.store(out, dw.to(dw_ptr.dtype.element_ty), mask=(cols < C)[:, None] & (d < D)[None, :])


@triton.jit
def _pair_backward_kernel(
    x_ptr, stride_xb, stride_xd, xnorm_ptr, y_ptr, stride_y,  # as in _pair_histogram_kernel
    pair_ptr,                         # (4,) fp32: lo, hi, M (shift of log E), Ẽ
    coef_ptr,                         # (1,) fp32: c = s Σ_i g_i exp(M - lse_i)
    dxh_ptr,                          # out: a (B, D) fp32 contiguous slab, gets Σ_q G_pq x̂_q
    B, D, eps, scale,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dX̂_p = Σ_q G_pq x̂_q over the kept pairs on either side of p, G_pq = c exp(s n_pq - M). Every pair
    tile is recomputed in the forward's orientation (rows = the lower block) so that the filter sees
    the same bits: tiles (i, j >= i) directly, tiles (j <= i, i) transposed."""
    i = tl.program_id(0).to(tl.int64)
    rows_i = i * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    xi, ri = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows_i, B, D, eps, BLOCK_D)
    yi = tl.load(y_ptr + rows_i * stride_y, mask=rows_i < B, other=0).to(tl.int64)
    lo = tl.load(pair_ptr)
    hi = tl.load(pair_ptr + 1)
    shift = tl.load(pair_ptr + 2)
    coef = tl.load(coef_ptr)
    acc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for j in range(0, tl.cdiv(B, BLOCK_P)):
        rows_j = j * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        xj, rj = _row_block(x_ptr, stride_xb, stride_xd, xnorm_ptr, rows_j, B, D, eps, BLOCK_D)
        yj = tl.load(y_ptr + rows_j * stride_y, mask=rows_j < B, other=0).to(tl.int64)
        xj_hat = xj.to(tl.float32) * rj[:, None]
        # A NaN row with no negative partner contributes exactly 0 (0 * NaN would poison the dot); one
        # with a partner has already made E, and so coef, NaN.
        xj_hat = tl.where(xj_hat == xj_hat, xj_hat, 0.0).to(xj.dtype)
        if j >= i:  # pairs (p in i, q in j), p < q
            valid = (rows_i[:, None] < rows_j[None, :]) & (rows_j < B)[None, :] & (yi[:, None] != yj[None, :])
            n = tl.dot(xi, tl.trans(xj), input_precision=PRECISION) * ri[:, None] * rj[None, :]
            keep = valid & (n >= lo) & (n <= hi)
            gp = coef * tl.exp(tl.where(keep, scale * n - shift, -float("inf")))
            acc = tl.dot(gp.to(xj.dtype), xj_hat, acc, input_precision=PRECISION)
        if j <= i:  # pairs (q in j, p in i), q < p: the canonical tile has rows j
            valid = (rows_j[:, None] < rows_i[None, :]) & (rows_i < B)[None, :] & (yj[:, None] != yi[None, :])
            n = tl.dot(xj, tl.trans(xi), input_precision=PRECISION) * rj[:, None] * ri[None, :]
            keep = valid & (n >= lo) & (n <= hi)
            gp = coef * tl.exp(tl.where(keep, scale * n - shift, -float("inf")))
            acc = tl.dot(tl.trans(gp.to(xj.dtype)), xj_hat, acc, input_precision=PRECISION)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    tl.store(dxh_ptr + rows_i[:, None] * D + d[None, :], acc, mask=(rows_i < B)[:, None] & (d < D)[None, :])


# ------------------------------------------------------------------------------------- host side


def _config(b: int, c: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes: 16 under the interpreter (so test shapes cross tiles); on the GPU, operand tiles of
    at most 32 KiB (full feature width: one ``tl.dot`` per tile) and fp32 gradient accumulators of at
    most 16 K elements, two pipeline stages."""
    block_d = max(16, triton.next_power_of_2(d))
    if rt.interpreting():
        n_blocks = triton.cdiv(c, 16)
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_P=16, BLOCK_MB=16, BLOCK_D=block_d, warps=1, stages=1,
                    splits=min(n_blocks, 2))
    row_bytes = block_d * torch.finfo(dtype).bits // 8
    tile = max(16, min(64, triton.next_power_of_2(32768 // row_bytes + 1) // 2))
    acc_rows = max(16, min(64, 16384 // block_d, triton.next_power_of_2(65536 // row_bytes + 1) // 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_blocks = triton.cdiv(c, tile)
    splits = max(1, min(n_blocks, MAX_SPLITS, triton.cdiv(2 * sms, triton.cdiv(b, acc_rows))))
    return dict(BLOCK_M=tile, BLOCK_N=tile, BLOCK_P=min(tile, acc_rows), BLOCK_MB=acc_rows, BLOCK_D=block_d,
                warps=8 if block_d >= 256 else 4, stages=2, splits=splits)


def _split_width(c: int, splits: int, block: int) -> tuple[int, int]:
    """Classes per split (a multiple of the tile) and the number of non-empty splits."""
    per = triton.cdiv(triton.cdiv(c, block), splits) * block
    return per, triton.cdiv(c, per)


def _norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=1, dtype=torch.float32)


def _hyper(margin_type: str, margin: float) -> dict:
    return dict(cos_m=math.cos(margin), sin_m=math.sin(margin), margin=margin, ARCFACE=margin_type == "arcface")


def _select(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``hist`` (k, 65536) counts and ``rank`` (k,): the bin holding the rank-th
    value (0-based) and the rank left within that bin. Device-side, no synchronisation."""
    counts = hist.to(torch.int64)
    cum = counts.cumsum(dim=1)
    digit = (cum <= rank[:, None]).sum(dim=1).clamp_max(65535)
    below = cum.gather(1, digit[:, None])[:, 0] - counts.gather(1, digit[:, None])[:, 0]
    return digit, rank - below


def _whisker_bounds(xargs, b, d, eps, whisker, tiles) -> torch.Tensor:
    """lo = Q1 - w IQR and hi = Q3 + w IQR (fp32, shape (2,)) of the negative-pair cosines, by a
    two-pass radix select on 16-bit halves of the order-preserving keys. Q1 = ñ[L // 4] and
    Q3 = ñ[3L // 4] are exact order statistics of the values the kernels compute."""
    x = xargs[0]
    n_pb = triton.cdiv(b, tiles["BLOCK_P"])
    hist = torch.zeros(65536, device=x.device, dtype=torch.int32)
    _pair_histogram_kernel[(n_pb,)](*xargs, hist, hist, b, d, eps, HIGH=True, **tiles)
    total = hist.to(torch.int64).sum()  # L
    rank = torch.stack((total // 4, (3 * total) // 4))
    top, rank_low = _select(hist[None, :].expand(2, -1), rank)
    top = (top - 32768).to(torch.int32)  # the upper halves as signed 16-bit values (key >> 16)
    hist_low = torch.zeros((2, 65536), device=x.device, dtype=torch.int32)
    _pair_histogram_kernel[(n_pb,)](*xargs, top, hist_low, b, d, eps, HIGH=False, **tiles)
    low, _ = _select(hist_low, rank_low)
    key = (top.to(torch.int64) * 65536 + low).to(torch.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    q1, q3 = bits.view(torch.float32).unbind()
    iqr = q3 - q1
    return torch.stack((q1 - whisker * iqr, q3 + whisker * iqr))


@torch.library.custom_op("twinops::unpg_margin_softmax_loss_rows", mutates_args=())
def _unpg_rows(
    embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin_type: str, scale: float,
    margin: float, whisker: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, w = embeddings, labels, weight
    (b, d), c = x.shape, w.shape[0]
    dev = x.device
    cfg = _config(b, c, d, x.dtype, dev)
    prec = rt.dot_precision(x.dtype)
    hyper = _hyper(margin_type, margin)
    xn, wn = _norms(x), _norms(w)
    xargs = (x, x.stride(0), x.stride(1), xn, y, y.stride(0))

    # Pair term: the whisker bounds by radix select, then (max, sumexp) of the kept pairs per row.
    pair = torch.zeros(4, device=dev, dtype=torch.float32)  # lo, hi, M, Ẽ (E = exp(M) Ẽ); no pairs: E = 0
    if b > 1:
        n_pb = triton.cdiv(b, cfg["BLOCK_P"])
        tiles = dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], PRECISION=prec, num_warps=cfg["warps"],
                     num_stages=cfg["stages"])
        bounds = _whisker_bounds(xargs, b, d, eps, whisker, tiles)
        row_stats = torch.empty((2, b), device=dev, dtype=torch.float32)
        _pair_sumexp_kernel[(n_pb,)](*xargs, bounds, row_stats, b, d, eps, scale, **tiles)
        m_blocks, l_blocks = row_stats[0], row_stats[1]
        shift_e = m_blocks.max()
        shift_e = torch.where(shift_e == -math.inf, 0.0, shift_e)
        e_tilde = (l_blocks * torch.exp(m_blocks - shift_e)).sum()
        pair = torch.stack((bounds[0], bounds[1], shift_e, e_tilde))

    # Class term: online log-sum-exp per (row block, class split), merged here with E.
    per, splits = _split_width(c, cfg["splits"], cfg["BLOCK_N"])
    part = torch.empty((2, splits, b), device=dev, dtype=torch.float32)
    zy = torch.zeros(b, device=dev, dtype=torch.float32)
    grid = (triton.cdiv(b, cfg["BLOCK_M"]), splits)
    _class_forward_kernel[grid](
        *xargs, w, w.stride(0), w.stride(1), wn, part, zy, b, c, d, per, eps, scale, **hyper,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PRECISION=prec,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    m_rows = part[0].max(dim=0).values
    l_rows = (part[1] * torch.exp(part[0] - m_rows)).sum(dim=0)
    shift_e, e_tilde = pair[2], pair[3]
    m_fin = torch.where(e_tilde > 0, torch.maximum(m_rows, shift_e), m_rows)
    # l: every column but the target, plus E, all relative to m; loss = log((l + exp(z_y - m)) / exp(z_y - m)).
    l_other = l_rows * torch.exp(m_rows - m_fin) + torch.where(e_tilde == 0, 0.0, e_tilde * torch.exp(shift_e - m_fin))
    loss = torch.where(zy >= m_fin, torch.log1p(l_other), (m_fin - zy) + torch.log(l_other + torch.exp(zy - m_fin)))
    valid = (y >= 0) & (y < c)
    loss = torch.where(valid, loss, math.nan)
    return loss, torch.stack((m_fin, l_other, zy), dim=1), pair


@_unpg_rows.register_fake
def _(embeddings, labels, weight, margin_type, scale, margin, whisker, eps):
    b = embeddings.shape[0]
    f32 = dict(dtype=torch.float32)
    return embeddings.new_empty(b, **f32), embeddings.new_empty((b, 3), **f32), embeddings.new_empty(4, **f32)


@torch.library.custom_op("twinops::unpg_margin_softmax_loss_rows_backward", mutates_args=())
def _unpg_rows_backward(
    grad_loss: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
    stats: torch.Tensor, pair: torch.Tensor, margin_type: str, scale: float, margin: float, eps: float,
    need_embeddings: bool, need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, w = embeddings, labels, weight
    (b, d), c = x.shape, w.shape[0]
    dev = x.device
    cfg = _config(b, c, d, x.dtype, dev)
    prec = rt.dot_precision(x.dtype)
    hyper = _hyper(margin_type, margin)
    xn, wn = _norms(x), _norms(w)
    xargs = (x, x.stride(0), x.stride(1), xn, y, y.stride(0))
    wargs = (w, w.stride(0), w.stride(1), wn)
    common = dict(BLOCK_D=cfg["BLOCK_D"], PRECISION=prec, num_warps=cfg["warps"], num_stages=cfg["stages"])
    grad_x = x.new_empty(0)
    grad_w = w.new_empty(0)
    if need_embeddings:
        per, splits = _split_width(c, cfg["splits"], cfg["BLOCK_N"])
        dxh = torch.zeros((splits + 1, b, d), device=dev, dtype=torch.float32)
        grid = (triton.cdiv(b, cfg["BLOCK_MB"]), splits)
        _class_backward_rows_kernel[grid](
            *xargs, *wargs, stats, grad_loss, grad_loss.stride(0), dxh, b, c, d, per, eps, scale, **hyper,
            BLOCK_M=cfg["BLOCK_MB"], BLOCK_N=cfg["BLOCK_N"], **common,
        )
        if b > 1:
            m_fin, l_fin = stats[:, 0], stats[:, 1] + torch.exp(stats[:, 2] - stats[:, 0])
            shift_e, e_tilde = pair[2], pair[3]
            coef = scale * (grad_loss.float() * torch.exp(shift_e - m_fin) / l_fin).sum()
            coef = torch.where(e_tilde == 0, 0.0, coef).reshape(1)
            _pair_backward_kernel[(triton.cdiv(b, cfg["BLOCK_P"]),)](
                *xargs, pair, coef, dxh[splits], b, d, eps, scale, BLOCK_P=cfg["BLOCK_P"], **common,
            )
        # Backward of x / max(||x||, eps), on the summed slabs.
        dx_hat = dxh.sum(dim=0)
        r = 1.0 / xn.clamp_min(eps)
        x_hat = x.float() * r[:, None]
        radial = torch.where((xn > eps)[:, None], x_hat * (x_hat * dx_hat).sum(dim=1, keepdim=True), 0.0)
        grad_x = ((dx_hat - radial) * r[:, None]).to(x.dtype)
    if need_weight:
        grad_w = torch.empty((c, d), device=dev, dtype=w.dtype)
        _class_backward_cols_kernel[(triton.cdiv(c, cfg["BLOCK_N"]),)](
            *xargs, *wargs, stats, grad_loss, grad_loss.stride(0), grad_w, grad_w.stride(0), grad_w.stride(1),
            b, c, d, eps, scale, **hyper, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common,
        )
    return grad_x, grad_w


@_unpg_rows_backward.register_fake
def _(grad_loss, embeddings, labels, weight, stats, pair, margin_type, scale, margin, eps, need_embeddings,
      need_weight):
    gx = embeddings.new_empty(embeddings.shape if need_embeddings else (0,))
    gw = weight.new_empty(weight.shape if need_weight else (0,))
    return gx, gw


def _setup_context(ctx, inputs, output):
    embeddings, labels, weight, margin_type, scale, margin, whisker, eps = inputs
    ctx.save_for_backward(embeddings, labels, weight, output[1], output[2])
    ctx.hyper = (margin_type, scale, margin, eps)


def _backward(ctx, grad_loss, grad_stats, grad_pair):
    embeddings, labels, weight, stats, pair = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_x or need_w):
        return None, None, None, None, None, None, None, None
    grad_x, grad_w = _unpg_rows_backward(grad_loss, embeddings, labels, weight, stats, pair, *ctx.hyper,
                                         need_x, need_w)
    return (grad_x if need_x else None), None, (grad_w if need_w else None), None, None, None, None, None


_unpg_rows.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(embeddings, labels, weight):
    rt.check_float_tensor(embeddings, "embeddings", 2, "(B, D)")
    rt.check_float_tensor(weight, "weight", 2, "(C, D)")
    b, d = embeddings.shape
    if b < 1:
        raise ValueError(f"embeddings must hold at least one row (B >= 1), got shape {tuple(embeddings.shape)}")
    if d < 1:
        raise ValueError(f"embeddings must have at least one feature (D >= 1), got shape {tuple(embeddings.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must hold at least one class centre (C >= 1), got shape {tuple(weight.shape)}")
    if weight.shape[1] != d:
        raise ValueError(f"weight must have shape (C, {d}) to match embeddings, got {tuple(weight.shape)}")
    if weight.dtype != embeddings.dtype:
        raise TypeError(f"weight must have the embeddings' dtype {embeddings.dtype}, got {weight.dtype}")
    rt.check_int_tensor(labels, "labels", (b,))
    rt.check_device(("embeddings", embeddings), ("labels", labels), ("weight", weight))


def unpg_margin_softmax_loss(embeddings, labels, weight, *, margin_type="arcface", scale=64.0, margin=0.5,
                             whisker=1.5, eps=1e-12, reduction="mean"):
    """UNPG loss (P50) on the GPU: ArcFace/CosFace margin softmax over the class centres plus the
    filtered in-batch negative pairs, without materialising the (B, C) logits or (B, B) cosines.

    Same arguments and semantics as `twinops.reference.metric.unpg_margin_softmax_loss`; returns the
    embeddings' dtype, gradients flow to ``embeddings`` and ``weight``. Labels outside [0, C) give
    NaN for their row (and so for a mean or sum) instead of an error, since checking them would
    synchronise the device.
    """
    _check_inputs(embeddings, labels, weight)
    check_choice(margin_type, "margin_type", MARGIN_TYPES)
    scale = check_real(scale, "scale", low=0.0, low_open=True)
    margin = check_real(margin, "margin", low=0.0)
    whisker = check_real(whisker, "whisker", low=0.0)
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    rt.check_reduction(reduction)
    loss, _, _ = _unpg_rows(embeddings, labels, weight, margin_type, scale, margin, whisker, eps)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.mean()
    return loss.to(embeddings.dtype)


class UNPGMarginSoftmaxLoss(torch.nn.Module):
    """``nn.Module`` form of `unpg_margin_softmax_loss` that owns the (C, D) class centres, initialised
    with Xavier-uniform as in the authors' heads. ``forward(embeddings, labels)``."""

    def __init__(self, embedding_dim: int, num_classes: int, *, margin_type="arcface", scale=64.0, margin=0.5,
                 whisker=1.5, eps=1e-12, reduction="mean", device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty((num_classes, embedding_dim), device=device, dtype=dtype))
        torch.nn.init.xavier_uniform_(self.weight)
        self.margin_type, self.scale, self.margin = margin_type, scale, margin
        self.whisker, self.eps, self.reduction = whisker, eps, reduction

    def forward(self, embeddings, labels):
        return unpg_margin_softmax_loss(embeddings, labels, self.weight, margin_type=self.margin_type,
                                        scale=self.scale, margin=self.margin, whisker=self.whisker,
                                        eps=self.eps, reduction=self.reduction)
