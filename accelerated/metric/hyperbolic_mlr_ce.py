"""Hyperbolic multinomial logistic regression cross-entropy (Hyp-CE, P48) as tiled Triton kernels.
See `twinops.reference.metric.hyperbolic.hyperbolic_mlr_ce` for the definition.

For points x_i (N, D), class offsets p_k and normals a_k (K, D), every logit needs only
<x_i, a_k> and <x_i, p_k> (two matrix products, `tl.dot`), ||x_i||^2 (per row) and
<p_k, a_k>, beta_k = 1 - c||p_k||^2, ||a_k|| (per class, one small kernel):

    omega = 1 - c x2,  alpha = 1 - 2c XP + c x2,  num = beta XA - alpha PA
    arg   = 2 sqrt(c) num / (||a|| beta omega),   xi = 2 ||a|| / (beta sqrt(c)) * asinh(arg)

Forward: one program per block of BLOCK_N rows walks the classes in BLOCK_K tiles; each tile's
BLOCK_N x BLOCK_K logits live in registers only, feed an online log-sum-exp (max m and sum s kept
apart, as the classification losses do) and give up the target logit. Saved: (m, s, ||x||^2) per
row, O(N). No (N, K, D) Möbius sum and no (N, K) logits matrix is ever written.

Backward (dL/dxi = g (softmax - onehot)), with T = dL/darg and U = dL/dnum per (i, k):
    dL/dXA = U beta,  dL/dXP = 2c U PA,  dL/dx2 = -c PA U + c T arg / omega
    dL/dPA = -alpha U,  dL/dbeta = U XA - (T arg + G xi) / beta,  dL/d||a|| = (G xi - T arg) / ||a||
so dL/dx = dXA A + dXP P + 2 (sum_k dx2) x   (row pass: per row block, over class tiles), and
    dL/da_k = sum_i dXA x_i + (sum_i dPA) p_k + (sum_i d||a||) a_k / ||a_k||
    dL/dp_k = sum_i dXP x_i + (sum_i dPA) a_k - 2c (sum_i dbeta) p_k   (column pass: per class tile).
Both passes recompute the logits tile from the inputs. The row pass accumulates dX in an (N, D)
fp32 buffer that each program owns for its rows (read-modify-write, no atomics). The column pass
splits the rows into S ranges so that enough programs run; each (class tile, range) writes its own
(K, D) partial sums and the S partials are added on the host (deterministic). Extra memory:
O(N) statistics, the (N, D) fp32 buffer for dX, S (K, D) fp32 partials for dA and dP with
S <= N / K (so O(N D) as well).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_int, check_real
from .. import _runtime as rt
from .._triton_math import log1p

__all__ = ["hyperbolic_mlr_ce", "HyperbolicMLRLoss"]

HAS_TRITON_BACKWARD = True

COLUMN_PROGRAMS = 512  # the column pass splits the rows until about this many programs run


def _launch(dtype: torch.dtype, which: str = "forward") -> dict:
    """Tile sizes: 16 under the interpreter (small test shapes cross tile boundaries). On the GPU,
    from compiling every pass for sm_90 and reading ptxas' register use: 16-bit inputs take 64 x 64
    tiles with 32-wide D chunks in every pass (no spills); exact fp32 products (FMA, no tensor cores)
    need 16-wide D chunks, and the backward passes 32-row blocks, to stay at or near 255 registers."""
    if rt.interpreting():
        return {"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16, "num_warps": 1}
    if dtype != torch.float32:
        return {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32, "num_warps": 8}
    return {"BLOCK_N": 64 if which == "forward" else 32, "BLOCK_K": 64, "BLOCK_D": 16, "num_warps": 8}


@triton.jit
def _asinh(x):
    """asinh(x) = sign(x) log1p(|x| + x^2 / (1 + sqrt(1 + x^2))), accurate near 0; log(2|x|) beyond 1e18."""
    ax = tl.abs(x)
    big = ax > 1e18
    safe = tl.where(big, 1.0, ax)
    r = log1p(safe + safe * safe / (1.0 + tl.sqrt(1.0 + safe * safe)))
    r = tl.where(big, tl.log(tl.where(big, ax, 1.0)) + 0.6931471805599453, r)
    return tl.where(x < 0, -r, r)


@triton.jit
def _class_stats_kernel(
    p_ptr, stride_pk, stride_pd,  # (K, D) class offsets (ball points)
    a_ptr, stride_ak, stride_ad,  # (K, D) class normals
    cls_ptr,                      # out (K, 3) fp32 contiguous: <p_k, a_k>, beta_k (NaN if outside the ball), ||a_k||
    K, D, c,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ks = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_k = ks < K
    pa = tl.zeros((BLOCK_M,), tl.float32)
    p2 = tl.zeros((BLOCK_M,), tl.float32)
    a2 = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_k[:, None] & (ds < D)[None, :]
        p = tl.load(p_ptr + ks[:, None] * stride_pk + ds[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ks[:, None] * stride_ak + ds[None, :] * stride_ad, mask=mask, other=0.0).to(tl.float32)
        pa += tl.sum(p * a, axis=1)
        p2 += tl.sum(p * p, axis=1)
        a2 += tl.sum(a * a, axis=1)
    beta = tl.where(c * p2 < 1.0, 1.0 - c * p2, float("nan"))  # an offset outside the ball poisons every row
    tl.store(cls_ptr + ks * 3, pa, mask=in_k)
    tl.store(cls_ptr + ks * 3 + 1, beta, mask=in_k)
    tl.store(cls_ptr + ks * 3 + 2, tl.sqrt(a2), mask=in_k)


@triton.jit
def _load_rows(target_ptr, stride_t, rows, N, K, ignore_index):
    """Labels of a row block: the label, rows that exist, rows whose x is read (not ignored; ignored
    rows read as 0 so their values cannot reach anything), rows whose label is out of range (NaN)."""
    in_n = rows < N
    y = tl.load(target_ptr + rows * stride_t, mask=in_n, other=ignore_index).to(tl.int64)
    ignored = y == ignore_index
    live = in_n & ~ignored
    bad = live & ((y < 0) | (y >= K))
    return y, in_n, ignored, live, bad


@triton.jit
def _load_classes(cls_ptr, cols, in_k):
    """Per-class scalars of a class tile; padding classes get harmless values (PA 0, beta 1, ||a|| 1)."""
    pa = tl.load(cls_ptr + cols * 3, mask=in_k, other=0.0)
    beta = tl.load(cls_ptr + cols * 3 + 1, mask=in_k, other=1.0)
    na = tl.load(cls_ptr + cols * 3 + 2, mask=in_k, other=1.0)
    return pa, beta, na


@triton.jit
def _dots(x_ptr, stride_xn, stride_xd, rows, live,
          p_ptr, stride_pk, stride_pd, a_ptr, stride_ak, stride_ad, cols, in_k, D,
          PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """XA = X A^T and XP = X P^T for a BLOCK_N x BLOCK_K tile, fp32 accumulation over D."""
    xa = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    xp = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        in_d = ds < D
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
                    mask=live[:, None] & in_d[None, :], other=0.0)
        a = tl.load(a_ptr + cols[:, None] * stride_ak + ds[None, :] * stride_ad,
                    mask=in_k[:, None] & in_d[None, :], other=0.0)
        p = tl.load(p_ptr + cols[:, None] * stride_pk + ds[None, :] * stride_pd,
                    mask=in_k[:, None] & in_d[None, :], other=0.0)
        xa = tl.dot(x, tl.trans(a), xa, input_precision=PRECISION)
        xp = tl.dot(x, tl.trans(p), xp, input_precision=PRECISION)
    return xa, xp


@triton.jit
def _dot_acc(d, b, acc, PRECISION: tl.constexpr):
    """acc + d @ b for an fp32 tile ``d`` of gradient terms and an input tile ``b``. For 16-bit inputs
    d is split into a 16-bit head and a 16-bit remainder (two exact tensor-core products, ~16 more bits
    than one rounding of d): the gradient is a sum of terms that can cancel by a factor of 100 near
    the boundary, which a single 16-bit rounding of d would turn into percent-level errors."""
    if b.dtype == tl.float32:
        acc = tl.dot(d, b, acc, input_precision=PRECISION)
    else:
        head = d.to(b.dtype)
        acc = tl.dot(head, b, acc, input_precision=PRECISION)
        acc = tl.dot((d - head.to(tl.float32)).to(b.dtype), b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _row_sq_norms(x_ptr, stride_xn, stride_xd, rows, live, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    x2 = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
                    mask=live[:, None] & (ds < D)[None, :], other=0.0).to(tl.float32)
        x2 += tl.sum(x * x, axis=1)
    return x2


@triton.jit
def _logits(xa, xp, x2, pa, beta, na, c, sqrt_c):
    """The MLR logits of a tile (x2 is (BLOCK_N, 1); pa, beta, na are (1, BLOCK_K)), plus the
    intermediates the backward needs. Rows outside the ball (omega <= 0) give NaN."""
    omega = 1.0 - c * x2
    alpha = 1.0 - 2.0 * c * xp + c * x2
    na_safe = tl.where(na > 0, na, 1.0)  # a_k = 0: arg finite, xi = 0 (its limit)
    arg = 2.0 * sqrt_c * (beta * xa - alpha * pa) / (na_safe * beta * omega)
    xi = 2.0 * na / (beta * sqrt_c) * _asinh(arg)
    xi = tl.where(omega > 0, xi, float("nan"))
    return xi, arg, omega, alpha, na_safe


@triton.jit
def _grad_terms(xi, arg, omega, beta, na, na_safe, m, s, g, y, cols, live, in_k, bad, sqrt_c):
    """G = dL/dxi = g (softmax - onehot), T = dL/darg, U = dL/dnum, for a tile; zero on padding and
    ignored rows, NaN on rows with an out-of-range label."""
    prob = tl.exp(xi - m[:, None]) / s[:, None]
    G = g[:, None] * (prob - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    G = tl.where(live[:, None] & in_k[None, :], G, 0.0)
    G = tl.where(bad[:, None], float("nan"), G)
    T = G * (2.0 * na / (beta * sqrt_c)) / tl.sqrt(1.0 + arg * arg)
    U = T * (2.0 * sqrt_c) / (na_safe * beta * omega)
    return G, T, U


@triton.jit
def _mlr_forward_kernel(
    x_ptr, stride_xn, stride_xd,   # (N, D) ball points
    target_ptr, stride_t,          # (N,) integer labels
    p_ptr, stride_pk, stride_pd,   # (K, D) class offsets
    a_ptr, stride_ak, stride_ad,   # (K, D) class normals
    cls_ptr,                       # (K, 3) fp32 from _class_stats_kernel
    loss_ptr,                      # out (N,) fp32: -log softmax(xi)_y; 0 if ignored; NaN if label invalid
    active_ptr,                    # out (N,) fp32: 1, or 0 for ignored rows (the mean's denominator)
    stats_ptr,                     # out (N, 3) fp32 contiguous: m_i, s_i, ||x_i||^2 for the backward
    N, K, D, c, sqrt_c, ignore_index,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    y, in_n, ignored, live, bad = _load_rows(target_ptr, stride_t, rows, N, K, ignore_index)
    x2 = _row_sq_norms(x_ptr, stride_xn, stride_xd, rows, live, D, BLOCK_N, BLOCK_D)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    xi_y = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_k = cols < K
        xa, xp = _dots(x_ptr, stride_xn, stride_xd, rows, live, p_ptr, stride_pk, stride_pd,
                       a_ptr, stride_ak, stride_ad, cols, in_k, D, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        pa, beta, na = _load_classes(cls_ptr, cols, in_k)
        xi, arg, omega, alpha, na_safe = _logits(xa, xp, x2[:, None], pa[None, :], beta[None, :], na[None, :],
                                                 c, sqrt_c)
        xi = tl.where(in_k[None, :], xi, float("-inf"))
        m_new = tl.maximum(m, tl.max(xi, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xi - m_new[:, None]), axis=1)
        m = m_new
        xi_y += tl.sum(tl.where(cols[None, :] == y[:, None], xi, 0.0), axis=1)
    loss = tl.log(s) - (xi_y - m)
    loss = tl.where(bad, float("nan"), tl.where(ignored, 0.0, loss))
    tl.store(loss_ptr + rows, loss, mask=in_n)
    tl.store(active_ptr + rows, tl.where(ignored, 0.0, 1.0), mask=in_n)
    tl.store(stats_ptr + rows * 3, m, mask=in_n)
    tl.store(stats_ptr + rows * 3 + 1, s, mask=in_n)
    tl.store(stats_ptr + rows * 3 + 2, x2, mask=in_n)


@triton.jit
def _mlr_backward_rows_kernel(
    grad_ptr, stride_g,            # (N,) upstream gradient of the per-row losses
    x_ptr, stride_xn, stride_xd,
    target_ptr, stride_t,
    p_ptr, stride_pk, stride_pd,
    a_ptr, stride_ak, stride_ad,
    cls_ptr, stats_ptr,            # (K, 3) and (N, 3) fp32 from the forward
    acc_ptr,                       # scratch (N, D) fp32 contiguous: sum over class tiles of dXA A + dXP P
    gx_ptr, stride_hn, stride_hd,  # out (N, D) dL/dx in x's dtype
    N, K, D, c, sqrt_c, ignore_index,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    y, in_n, ignored, live, bad = _load_rows(target_ptr, stride_t, rows, N, K, ignore_index)
    g = tl.load(grad_ptr + rows * stride_g, mask=live, other=0.0).to(tl.float32)
    m = tl.load(stats_ptr + rows * 3, mask=in_n, other=0.0)
    s = tl.load(stats_ptr + rows * 3 + 1, mask=in_n, other=1.0)
    x2 = tl.load(stats_ptr + rows * 3 + 2, mask=in_n, other=0.0)
    g_x2 = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_k = cols < K
        xa, xp = _dots(x_ptr, stride_xn, stride_xd, rows, live, p_ptr, stride_pk, stride_pd,
                       a_ptr, stride_ak, stride_ad, cols, in_k, D, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        pa, beta, na = _load_classes(cls_ptr, cols, in_k)
        pa, beta, na = pa[None, :], beta[None, :], na[None, :]
        xi, arg, omega, alpha, na_safe = _logits(xa, xp, x2[:, None], pa, beta, na, c, sqrt_c)
        G, T, U = _grad_terms(xi, arg, omega, beta, na, na_safe, m, s, g, y, cols, live, in_k, bad, sqrt_c)
        g_x2 += tl.sum(c * T * arg / omega - c * pa * U, axis=1)
        d_xa = U * beta
        d_xp = U * (2.0 * c) * pa
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            in_d = ds < D
            a = tl.load(a_ptr + cols[:, None] * stride_ak + ds[None, :] * stride_ad,
                        mask=in_k[:, None] & in_d[None, :], other=0.0)
            p = tl.load(p_ptr + cols[:, None] * stride_pk + ds[None, :] * stride_pd,
                        mask=in_k[:, None] & in_d[None, :], other=0.0)
            part = _dot_acc(d_xa, a, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), PRECISION)
            part = _dot_acc(d_xp, p, part, PRECISION)
            acc_ptrs = acc_ptr + rows[:, None] * D + ds[None, :]
            mask = in_n[:, None] & in_d[None, :]
            # this program owns these rows: read what earlier class tiles left (nothing at k0 = 0)
            part += tl.load(acc_ptrs, mask=mask & (k0 > 0), other=0.0)
            tl.store(acc_ptrs, part, mask=mask)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_n[:, None] & (ds < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
                    mask=live[:, None] & (ds < D)[None, :], other=0.0).to(tl.float32)
        gx = tl.load(acc_ptr + rows[:, None] * D + ds[None, :], mask=mask, other=0.0) + 2.0 * g_x2[:, None] * x
        gx = tl.where(ignored[:, None], 0.0, gx)
        tl.store(gx_ptr + rows[:, None] * stride_hn + ds[None, :] * stride_hd, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlr_backward_cols_kernel(
    grad_ptr, stride_g,
    x_ptr, stride_xn, stride_xd,
    target_ptr, stride_t,
    p_ptr, stride_pk, stride_pd,
    a_ptr, stride_ak, stride_ad,
    cls_ptr, stats_ptr,
    ga_ptr, gp_ptr,                # out (S, K, D) fp32 contiguous: per row range, sum_i dXA_ik x_i and sum_i dXP_ik x_i
    gcls_ptr,                      # out (S, K, 3) fp32 contiguous: per row range, sums of dPA, dbeta, d||a||
    N, K, D, rows_per_split, c, sqrt_c, ignore_index,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    in_k = cols < K
    pa, beta, na = _load_classes(cls_ptr, cols, in_k)
    pa, beta, na = pa[None, :], beta[None, :], na[None, :]
    s_pa = tl.zeros((BLOCK_K,), tl.float32)
    s_beta = tl.zeros((BLOCK_K,), tl.float32)
    s_na = tl.zeros((BLOCK_K,), tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    out_off = split * K * D
    for r in range(0, rows_per_split, BLOCK_N):
        rows = row_start + r + tl.arange(0, BLOCK_N).to(tl.int64)
        y, in_n, ignored, live, bad = _load_rows(target_ptr, stride_t, rows, row_end, K, ignore_index)
        g = tl.load(grad_ptr + rows * stride_g, mask=live, other=0.0).to(tl.float32)
        m = tl.load(stats_ptr + rows * 3, mask=in_n, other=0.0)
        s = tl.load(stats_ptr + rows * 3 + 1, mask=in_n, other=1.0)
        x2 = tl.load(stats_ptr + rows * 3 + 2, mask=in_n, other=0.0)
        xa, xp = _dots(x_ptr, stride_xn, stride_xd, rows, live, p_ptr, stride_pk, stride_pd,
                       a_ptr, stride_ak, stride_ad, cols, in_k, D, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        xi, arg, omega, alpha, na_safe = _logits(xa, xp, x2[:, None], pa, beta, na, c, sqrt_c)
        G, T, U = _grad_terms(xi, arg, omega, beta, na, na_safe, m, s, g, y, cols, live, in_k, bad, sqrt_c)
        xi = tl.where(live[:, None] & in_k[None, :], xi, 0.0)
        s_pa += tl.sum(-alpha * U, axis=0)
        s_beta += tl.sum(U * xa - (T * arg + G * xi) / beta, axis=0)
        s_na += tl.sum((G * xi - T * arg) / na_safe, axis=0)
        d_xa = tl.trans(U * beta)           # (BLOCK_K, BLOCK_N)
        d_xp = tl.trans(U * (2.0 * c) * pa)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            in_d = ds < D
            x = tl.load(x_ptr + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
                        mask=live[:, None] & in_d[None, :], other=0.0)
            mask = in_k[:, None] & in_d[None, :]
            offs = out_off + cols[:, None] * D + ds[None, :]
            first = r == 0
            ga = _dot_acc(d_xa, x, tl.zeros((BLOCK_K, BLOCK_D), tl.float32), PRECISION)
            ga += tl.load(ga_ptr + offs, mask=mask & ~first, other=0.0)
            tl.store(ga_ptr + offs, ga, mask=mask)
            gp = _dot_acc(d_xp, x, tl.zeros((BLOCK_K, BLOCK_D), tl.float32), PRECISION)
            gp += tl.load(gp_ptr + offs, mask=mask & ~first, other=0.0)
            tl.store(gp_ptr + offs, gp, mask=mask)
    cls_off = split * K * 3 + cols * 3
    tl.store(gcls_ptr + cls_off, s_pa, mask=in_k)
    tl.store(gcls_ptr + cls_off + 1, s_beta, mask=in_k)
    tl.store(gcls_ptr + cls_off + 2, s_na, mask=in_k)


# ------------------------------------------------------------------------------------ custom ops


def _class_stats(p, a, c):
    k, d = p.shape
    cls = torch.empty((k, 3), device=p.device, dtype=torch.float32)
    block_d = 16 if rt.interpreting() else max(16, min(256, triton.next_power_of_2(d)))
    block_m = 16 if rt.interpreting() else 32
    _class_stats_kernel[(triton.cdiv(k, block_m),)](
        p, p.stride(0), p.stride(1), a, a.stride(0), a.stride(1), cls, k, d, c,
        BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return cls


def _common(x, p, a):
    return (x, x.stride(0), x.stride(1)), (p, p.stride(0), p.stride(1)), (a, a.stride(0), a.stride(1))


@torch.library.custom_op("twinops::hyperbolic_mlr_ce_rows", mutates_args=())
def _mlr_rows(
    x: torch.Tensor, target: torch.Tensor, p: torch.Tensor, a: torch.Tensor, c: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = p.shape[0]
    loss = torch.empty(n, device=x.device, dtype=torch.float32)
    active = torch.empty_like(loss)
    stats = torch.empty((n, 3), device=x.device, dtype=torch.float32)
    cls = _class_stats(p, a, c)
    if n > 0:
        launch = _launch(x.dtype)
        xs, ps, as_ = _common(x, p, a)
        _mlr_forward_kernel[(triton.cdiv(n, launch["BLOCK_N"]),)](
            *xs, target, target.stride(0), *ps, *as_, cls, loss, active, stats,
            n, k, d, c, c ** 0.5, ignore_index, PRECISION=rt.dot_precision(x.dtype), **launch,
        )
    return loss, active, stats, cls


@_mlr_rows.register_fake
def _(x, target, p, a, c, ignore_index):
    n, k = x.shape[0], p.shape[0]
    loss = x.new_empty(n, dtype=torch.float32)
    return loss, torch.empty_like(loss), x.new_empty((n, 3), dtype=torch.float32), x.new_empty((k, 3), dtype=torch.float32)


@torch.library.custom_op("twinops::hyperbolic_mlr_ce_backward_x", mutates_args=())
def _mlr_backward_x(
    grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, p: torch.Tensor, a: torch.Tensor,
    stats: torch.Tensor, cls: torch.Tensor, c: float, ignore_index: int,
) -> torch.Tensor:
    n, d = x.shape
    gx = torch.empty((n, d), device=x.device, dtype=x.dtype)
    if n > 0:
        launch = _launch(x.dtype, "rows")
        acc = torch.empty((n, d), device=x.device, dtype=torch.float32)
        xs, ps, as_ = _common(x, p, a)
        _mlr_backward_rows_kernel[(triton.cdiv(n, launch["BLOCK_N"]),)](
            grad, grad.stride(0), *xs, target, target.stride(0), *ps, *as_, cls, stats, acc,
            gx, gx.stride(0), gx.stride(1), n, p.shape[0], d, c, c ** 0.5, ignore_index,
            PRECISION=rt.dot_precision(x.dtype), **launch,
        )
    return gx


@_mlr_backward_x.register_fake
def _(grad, x, target, p, a, stats, cls, c, ignore_index):
    return x.new_empty(x.shape)


@torch.library.custom_op("twinops::hyperbolic_mlr_ce_backward_classes", mutates_args=())
def _mlr_backward_classes(
    grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, p: torch.Tensor, a: torch.Tensor,
    stats: torch.Tensor, cls: torch.Tensor, c: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = p.shape[0]
    if n == 0:
        return torch.zeros_like(p), torch.zeros_like(a)
    launch = _launch(x.dtype, "columns")
    block_n, block_k = launch["BLOCK_N"], launch["BLOCK_K"]
    class_tiles = triton.cdiv(k, block_k)
    row_blocks = triton.cdiv(n, block_n)
    # enough programs to fill the device, but never more partial (K, D) sums than N / K, so that
    # they hold at most as many numbers as dL/dx (extra memory O(N D))
    splits = max(1, min(row_blocks, COLUMN_PROGRAMS // class_tiles, n // k))
    rows_per_split = triton.cdiv(row_blocks, splits) * block_n
    splits = triton.cdiv(n, rows_per_split)  # every range holds at least one row
    ga = torch.empty((splits, k, d), device=x.device, dtype=torch.float32)
    gp = torch.empty_like(ga)
    gcls = torch.empty((splits, k, 3), device=x.device, dtype=torch.float32)
    xs, ps, as_ = _common(x, p, a)
    _mlr_backward_cols_kernel[(class_tiles, splits)](
        grad, grad.stride(0), *xs, target, target.stride(0), *ps, *as_, cls, stats, ga, gp, gcls,
        n, k, d, rows_per_split, c, c ** 0.5, ignore_index, PRECISION=rt.dot_precision(x.dtype), **launch,
    )
    # Per-class terms through <p, a>, beta = 1 - c||p||^2 and ||a|| (O(K D), on the host side).
    s_pa, s_beta, s_na = gcls.sum(0).unbind(1)
    na = cls[:, 2]
    na_safe = torch.where(na > 0, na, torch.ones_like(na))
    pf, af = p.float(), a.float()
    gp = gp.sum(0) + s_pa[:, None] * af - (2.0 * c) * s_beta[:, None] * pf
    ga = ga.sum(0) + s_pa[:, None] * pf + (s_na / na_safe)[:, None] * af
    return gp.to(p.dtype), ga.to(a.dtype)


@_mlr_backward_classes.register_fake
def _(grad, x, target, p, a, stats, cls, c, ignore_index):
    return p.new_empty(p.shape), a.new_empty(a.shape)


def _setup_context(ctx, inputs, output):
    x, target, p, a, c, ignore_index = inputs
    ctx.save_for_backward(x, target, p, a, output[2], output[3])
    ctx.c, ctx.ignore_index = c, ignore_index


def _backward(ctx, grad_loss, grad_active, grad_stats, grad_cls):
    x, target, p, a, stats, cls = ctx.saved_tensors
    gx = gp = ga = None
    if ctx.needs_input_grad[0]:
        gx = _mlr_backward_x(grad_loss, x, target, p, a, stats, cls, ctx.c, ctx.ignore_index)
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        gp, ga = _mlr_backward_classes(grad_loss, x, target, p, a, stats, cls, ctx.c, ctx.ignore_index)
        gp = gp if ctx.needs_input_grad[2] else None
        ga = ga if ctx.needs_input_grad[3] else None
    return gx, None, gp, ga, None, None


_mlr_rows.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ public API


def hyperbolic_mlr_ce(x, target, p, a, *, c=0.1, ignore_index=-100, reduction="mean"):
    """Hyperbolic MLR cross-entropy (Hyp-CE) of ball points ``x`` (N, D) with class offsets ``p`` and
    normals ``a`` (K, D), on the GPU. Same arguments and semantics as
    `twinops.reference.metric.hyperbolic.hyperbolic_mlr_ce`; returns x's dtype. Values that would need
    a device synchronisation to check give NaN instead of an error: a label out of range or a point
    outside the ball makes its row NaN, a class offset outside the ball makes every row NaN."""
    rt.check_float_tensor(x, "x", 2, "(N, D)")
    rt.check_float_tensor(p, "p", 2, "(K, D)")
    rt.check_float_tensor(a, "a", 2, "(K, D)")
    n, d = x.shape
    if p.shape[1] != d:
        raise ValueError(f"p must have shape (K, {d}) to match x, got {tuple(p.shape)}")
    if tuple(a.shape) != tuple(p.shape):
        raise ValueError(f"a must have the shape of p {tuple(p.shape)}, got {tuple(a.shape)}")
    if p.shape[0] < 1:
        raise ValueError(f"p must have at least one class (K >= 1), got shape {tuple(p.shape)}")
    for name, t in (("p", p), ("a", a)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    ignore_index = check_int(ignore_index, "ignore_index")
    rt.check_int_tensor(target, "target", (n,), "class indices")
    rt.check_reduction(reduction)
    c = check_real(c, "c", low=0.0, low_open=True)
    rt.check_device(("x", x), ("target", target), ("p", p), ("a", a))
    loss, active, _, _ = _mlr_rows(x, target, p, a, c, ignore_index)
    return rt.reduce_rows(loss, active, reduction, x.dtype)


class HyperbolicMLRLoss(torch.nn.Module):
    """Hyperbolic MLR head with its cross-entropy: learnable class offsets ``p`` (kept in the ball by
    construction: p = `poincare_expmap0` (p_free) without clipping, projected onto radius
    (1 - 1e-3)/sqrt(c)) and normals ``a``, as hyptorch parametrises them (``a = a_free (1 - c ||p||^2)``),
    both initialised like hyptorch (kaiming-uniform, a = sqrt(5)).
    ``forward(x, target)`` returns `hyperbolic_mlr_ce` of ball points ``x``."""

    def __init__(self, dim: int, num_classes: int, *, c=0.1, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.c, self.ignore_index, self.reduction = c, ignore_index, reduction
        self.p_free = torch.nn.Parameter(torch.empty(num_classes, dim))
        self.a_free = torch.nn.Parameter(torch.empty(num_classes, dim))
        torch.nn.init.kaiming_uniform_(self.p_free, a=5 ** 0.5)
        torch.nn.init.kaiming_uniform_(self.a_free, a=5 ** 0.5)

    def class_parameters(self):
        from .hyperbolic import poincare_expmap0

        p = poincare_expmap0(self.p_free, c=self.c, clip_r=None)
        a = self.a_free * (1 - self.c * p.pow(2).sum(dim=1, keepdim=True))
        return p, a

    def forward(self, x, target):
        p, a = self.class_parameters()
        return hyperbolic_mlr_ce(x, target, p, a, c=self.c, ignore_index=self.ignore_index,
                                 reduction=self.reduction)
