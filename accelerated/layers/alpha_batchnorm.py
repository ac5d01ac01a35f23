"""α-BN (P54) as Triton kernels: a split per-channel reduction, a per-channel finaliser and an
elementwise apply, forward and backward. See `twinops.reference.layers.alpha_batchnorm` for the
definition.

x (N, C, *spatial) is viewed as (N, C, S) (a view whenever the spatial axes merge, which covers
contiguous, channels-last and last-axis-strided tensors; strides are passed, nothing is copied).
M = N S elements per channel.

Forward
    1. ``_stats_kernel``, grid (C, SPLITS): program (c, k) owns the rows n of split k and walks each
       row's S elements in BLOCK_S chunks; a chunk is reduced on its own (count, mean, sum of squared
       deviations) and merged with Chan's rule, so no E[x^2] - mean^2 cancellation. Partials go to
       a (3, C, SPLITS) fp32 buffer.
    2. ``_finalize_kernel``, grid (C / BLOCK_C,): merges the SPLITS partials (Chan again), mixes
       with the running statistics (mu_hat, var_hat), writes 1 / sqrt(var_hat + eps), the batch
       statistics for the backward and the running statistics to return (updated in training mode,
       copied in eval mode). Channels whose running statistics are non-finite or whose running
       variance is negative get mu_hat = NaN (a value error the host cannot see without a sync).
    3. ``_apply_kernel``, grid (N C,): y = (x - mu_hat) gamma / s_hat + beta along one (n, c) row.
Backward, with g the upstream gradient:
    1. ``_grad_stats_kernel``, grid (C, SPLITS): partial sums of g and g (x - mu_t) (fp32).
    2. ``_grad_finalize_kernel``: d beta = sum g, d gamma = sum g (x - mu_hat) / s_hat and the three
       per-channel coefficients of dx = k1 g + k2 + k3 (x - mu_t), with k1 = gamma / s_hat,
       k2 = -k1 (1 - alpha) sum g / M, k3 = -k1 (1 - alpha) sum g (x - mu_hat) / (M s_hat^2).
    3. ``_grad_apply_kernel``, grid (N C,), only when x needs a gradient.
Extra memory: (3, C, SPLITS) + (4, C) fp32 forward, (2, C, SPLITS) + (3, C) backward; nothing of x's
size besides y and dx. HBM traffic: forward reads x twice and writes y; backward reads g and x twice
and writes dx.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...reference._checks import check_bool, check_real
from .. import _runtime as rt

__all__ = ["alpha_batchnorm", "AlphaBatchNorm"]

HAS_TRITON_BACKWARD = True

# Elements per chunk along a row, channels per finaliser program, and how many programs the split
# reductions aim for; untuned guesses pending a GPU sweep.
GPU = dict(BLOCK_S=1024, BLOCK_C=64, TARGET_PROGRAMS=4096, num_warps=4)
INTERPRETER = dict(BLOCK_S=16, BLOCK_C=16, TARGET_PROGRAMS=4, num_warps=1)


def _config() -> dict:
    return dict(INTERPRETER) if rt.interpreting() else dict(GPU)


def _splits(n: int, c: int, target: int) -> tuple[int, int]:
    """(SPLITS, rows per split) for the split reductions: about ``target`` programs in all, every
    split holding at least one row."""
    splits = max(1, min(n, -(-target // max(c, 1))))
    rows = -(-n // splits)
    return -(-n // rows), rows


@triton.jit
def _stats_kernel(
    x_ptr, stride_xn, stride_xc, stride_xs,  # (N, C, S) input; (n, c, s) at n*stride_xn + c*stride_xc + s*stride_xs
    part_ptr,                                # out (3, C, SPLITS) fp32 contiguous: count, mean, sum of squared deviations
    N, C, S, SPLITS, ROWS,
    BLOCK_S: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    count = tl.full((), 0.0, tl.float32)
    mean = tl.full((), 0.0, tl.float32)
    m2 = tl.full((), 0.0, tl.float32)
    for r in range(0, ROWS):
        n = split * ROWS + r
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            live = (ss < S) & (n < N)
            v = tl.load(x_ptr + n * stride_xn + c * stride_xc + ss * stride_xs, mask=live, other=0.0).to(tl.float32)
            n_b = tl.sum(live.to(tl.float32), axis=0)
            mean_b = tl.where(n_b == 0.0, 0.0, tl.sum(v, axis=0) / n_b)
            d = tl.where(live, v - mean_b, 0.0)
            total = count + n_b
            delta = mean_b - mean
            m2 = m2 + tl.sum(d * d, axis=0) + tl.where(total == 0.0, 0.0, delta * delta * (count * n_b / total))
            mean = tl.where(total == 0.0, 0.0, (count * mean + n_b * mean_b) / total)
            count = total
    at = c * SPLITS + split
    tl.store(part_ptr + at, count)
    tl.store(part_ptr + C * SPLITS + at, mean)
    tl.store(part_ptr + 2 * C * SPLITS + at, m2)


@triton.jit
def _finalize_kernel(
    part_ptr,                    # (3, C, SPLITS) fp32 partials from _stats_kernel
    rm_ptr, rv_ptr,              # (C,) running mean / variance (any float dtype, stride 1)
    new_rm_ptr, new_rv_ptr,      # out (C,) running statistics to return, in the running statistics' dtype
    stats_ptr,                   # out (4, C) fp32 contiguous: mu_t, biased var_t, mu_hat, 1 / s_hat
    C, SPLITS, M, alpha, momentum, eps,
    TRAINING: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    cs = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = cs < C
    ks = tl.arange(0, BLOCK_SPLIT).to(tl.int64)
    tile = c_mask[:, None] & (ks < SPLITS)[None, :]
    at = cs[:, None] * SPLITS + ks[None, :]
    cnt = tl.load(part_ptr + at, mask=tile, other=0.0)
    mean_k = tl.load(part_ptr + C * SPLITS + at, mask=tile, other=0.0)
    m2_k = tl.load(part_ptr + 2 * C * SPLITS + at, mask=tile, other=0.0)
    n = tl.sum(cnt, axis=1)
    mu_t = tl.sum(cnt * mean_k, axis=1) / n
    d = tl.where(tile, mean_k - mu_t[:, None], 0.0)
    var_t = (tl.sum(m2_k, axis=1) + tl.sum(cnt * d * d, axis=1)) / n
    rm = tl.load(rm_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + cs, mask=c_mask, other=1.0).to(tl.float32)
    mu_hat = alpha * rm + (1.0 - alpha) * mu_t
    var_hat = alpha * rv + (1.0 - alpha) * var_t
    valid = (tl.abs(rm) < float("inf")) & (tl.abs(rv) < float("inf")) & (rv >= 0.0)
    mu_hat = tl.where(valid, mu_hat, float("nan"))
    inv_s = 1.0 / tl.sqrt(var_hat + eps)
    if TRAINING:
        new_rm = (1.0 - momentum) * rm + momentum * mu_t
        new_rv = (1.0 - momentum) * rv + momentum * var_t * (M / (M - 1.0))
    else:
        new_rm = rm
        new_rv = rv
    tl.store(new_rm_ptr + cs, new_rm.to(new_rm_ptr.dtype.element_ty), mask=c_mask)
    tl.store(new_rv_ptr + cs, new_rv.to(new_rv_ptr.dtype.element_ty), mask=c_mask)
    tl.store(stats_ptr + cs, mu_t, mask=c_mask)
    tl.store(stats_ptr + C + cs, var_t, mask=c_mask)
    tl.store(stats_ptr + 2 * C + cs, mu_hat, mask=c_mask)
    tl.store(stats_ptr + 3 * C + cs, inv_s, mask=c_mask)


@triton.jit
def _apply_kernel(
    x_ptr, stride_xn, stride_xc, stride_xs,  # (N, C, S) input
    y_ptr, stride_yn, stride_yc, stride_ys,  # out (N, C, S) in x's dtype
    w_ptr, b_ptr,                            # (C,) gamma, beta (unused without HAS_WEIGHT / HAS_BIAS)
    stats_ptr,                               # (4, C) fp32 from _finalize_kernel
    C, S,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # n * C + c
    n = pid // C
    c = pid % C
    mu_hat = tl.load(stats_ptr + 2 * C + c)
    scale = tl.load(stats_ptr + 3 * C + c)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c).to(tl.float32)
    beta = 0.0
    if HAS_BIAS:
        beta = tl.load(b_ptr + c).to(tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        live = ss < S
        v = tl.load(x_ptr + n * stride_xn + c * stride_xc + ss * stride_xs, mask=live, other=0.0).to(tl.float32)
        y = (v - mu_hat) * scale + beta
        tl.store(y_ptr + n * stride_yn + c * stride_yc + ss * stride_ys, y.to(y_ptr.dtype.element_ty), mask=live)


@triton.jit
def _grad_stats_kernel(
    g_ptr, stride_gn, stride_gc, stride_gs,  # (N, C, S) upstream gradient of y
    x_ptr, stride_xn, stride_xc, stride_xs,  # (N, C, S) input
    stats_ptr,                               # (4, C) fp32 from the forward
    part_ptr,                                # out (2, C, SPLITS) fp32 contiguous: sum g, sum g (x - mu_t)
    N, C, S, SPLITS, ROWS,
    BLOCK_S: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    mu_t = tl.load(stats_ptr + c)
    acc_g = tl.zeros((BLOCK_S,), tl.float32)
    acc_gx = tl.zeros((BLOCK_S,), tl.float32)
    for r in range(0, ROWS):
        n = split * ROWS + r
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            live = (ss < S) & (n < N)
            g = tl.load(g_ptr + n * stride_gn + c * stride_gc + ss * stride_gs, mask=live, other=0.0).to(tl.float32)
            v = tl.load(x_ptr + n * stride_xn + c * stride_xc + ss * stride_xs, mask=live, other=0.0).to(tl.float32)
            acc_g += g
            acc_gx += tl.where(live, g * (v - mu_t), 0.0)
    at = c * SPLITS + split
    tl.store(part_ptr + at, tl.sum(acc_g, axis=0))
    tl.store(part_ptr + C * SPLITS + at, tl.sum(acc_gx, axis=0))


@triton.jit
def _grad_finalize_kernel(
    part_ptr,                # (2, C, SPLITS) fp32 from _grad_stats_kernel
    stats_ptr,               # (4, C) fp32 from the forward: mu_t, var_t, mu_hat, 1 / s_hat
    w_ptr,                   # (C,) gamma (unused without HAS_WEIGHT)
    dw_ptr, db_ptr,          # out (C,) d gamma, d beta in gamma's dtype (unused without NEED_AFFINE)
    coef_ptr,                # out (3, C) fp32 contiguous: k1, k2, k3 of dx = k1 g + k2 + k3 (x - mu_t)
    C, SPLITS, M, alpha,
    HAS_WEIGHT: tl.constexpr, NEED_AFFINE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    cs = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = cs < C
    ks = tl.arange(0, BLOCK_SPLIT).to(tl.int64)
    tile = c_mask[:, None] & (ks < SPLITS)[None, :]
    at = cs[:, None] * SPLITS + ks[None, :]
    sum_g = tl.sum(tl.load(part_ptr + at, mask=tile, other=0.0), axis=1)
    sum_gx_t = tl.sum(tl.load(part_ptr + C * SPLITS + at, mask=tile, other=0.0), axis=1)
    mu_t = tl.load(stats_ptr + cs, mask=c_mask, other=0.0)
    mu_hat = tl.load(stats_ptr + 2 * C + cs, mask=c_mask, other=0.0)
    inv_s = tl.load(stats_ptr + 3 * C + cs, mask=c_mask, other=0.0)
    sum_gx = sum_gx_t + (mu_t - mu_hat) * sum_g  # sum g (x - mu_hat)
    if NEED_AFFINE:
        tl.store(dw_ptr + cs, (sum_gx * inv_s).to(dw_ptr.dtype.element_ty), mask=c_mask)
        tl.store(db_ptr + cs, sum_g.to(db_ptr.dtype.element_ty), mask=c_mask)
    k1 = inv_s
    if HAS_WEIGHT:
        k1 = k1 * tl.load(w_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
    k2 = -k1 * (1.0 - alpha) * sum_g / M
    k3 = -k1 * (1.0 - alpha) * sum_gx * inv_s * inv_s / M
    tl.store(coef_ptr + cs, k1, mask=c_mask)
    tl.store(coef_ptr + C + cs, k2, mask=c_mask)
    tl.store(coef_ptr + 2 * C + cs, k3, mask=c_mask)


@triton.jit
def _grad_apply_kernel(
    g_ptr, stride_gn, stride_gc, stride_gs,     # (N, C, S) upstream gradient
    x_ptr, stride_xn, stride_xc, stride_xs,     # (N, C, S) input
    dx_ptr, stride_dn, stride_dc, stride_ds,    # out (N, C, S) in x's dtype
    stats_ptr, coef_ptr,                        # (4, C) forward statistics, (3, C) coefficients, fp32
    C, S,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # n * C + c
    n = pid // C
    c = pid % C
    mu_t = tl.load(stats_ptr + c)
    k1 = tl.load(coef_ptr + c)
    k2 = tl.load(coef_ptr + C + c)
    k3 = tl.load(coef_ptr + 2 * C + c)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        live = ss < S
        g = tl.load(g_ptr + n * stride_gn + c * stride_gc + ss * stride_gs, mask=live, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + n * stride_xn + c * stride_xc + ss * stride_xs, mask=live, other=0.0).to(tl.float32)
        dx = k1 * g + k2 + k3 * (v - mu_t)
        tl.store(dx_ptr + n * stride_dn + c * stride_dc + ss * stride_ds, dx.to(dx_ptr.dtype.element_ty), mask=live)


def _as_ncs(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, S): a view when the spatial axes merge, else a copy."""
    return t.reshape(t.shape[0], t.shape[1], -1)


@torch.library.custom_op("twinops::alpha_batchnorm", mutates_args=())
def _abn_fwd(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], source_weight: float, training: bool, momentum: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = x.shape[0], x.shape[1]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    new_rm = torch.empty((c,), device=x.device, dtype=running_mean.dtype)
    new_rv = torch.empty((c,), device=x.device, dtype=running_var.dtype)
    stats = torch.empty((4, c), device=x.device, dtype=torch.float32)
    if c == 0:
        return y, new_rm, new_rv, stats
    x3, y3 = _as_ncs(x), y.view(n, c, -1)
    s = x3.shape[2]
    cfg = _config()
    splits, rows = _splits(n, c, cfg["TARGET_PROGRAMS"])
    part = torch.empty((3, c, splits), device=x.device, dtype=torch.float32)
    _stats_kernel[(c, splits)](x3, *x3.stride(), part, n, c, s, splits, rows, BLOCK_S=cfg["BLOCK_S"],
                               num_warps=cfg["num_warps"])
    _finalize_kernel[(triton.cdiv(c, cfg["BLOCK_C"]),)](
        part, running_mean.contiguous(), running_var.contiguous(), new_rm, new_rv, stats, c, splits, float(n * s),
        source_weight, momentum, eps, TRAINING=training, BLOCK_C=cfg["BLOCK_C"],
        BLOCK_SPLIT=max(2, triton.next_power_of_2(splits)),
    )
    _apply_kernel[(n * c,)](
        x3, *x3.stride(), y3, *y3.stride(), weight if weight is not None else stats,
        bias if bias is not None else stats, stats, c, s, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["num_warps"],
    )
    return y, new_rm, new_rv, stats


@_abn_fwd.register_fake
def _(x, running_mean, running_var, weight, bias, source_weight, training, momentum, eps):
    c = x.shape[1]
    return (x.new_empty(x.shape), running_mean.new_empty((c,)), running_var.new_empty((c,)),
            x.new_empty((4, c), dtype=torch.float32))


@torch.library.custom_op("twinops::alpha_batchnorm_backward", mutates_args=())
def _abn_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], stats: torch.Tensor, source_weight: float,
    need_x: bool, need_affine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = x.shape[0], x.shape[1]
    affine_dtype = weight.dtype if weight is not None else x.dtype
    dx = torch.empty(x.shape if need_x else (0,), device=x.device, dtype=x.dtype)
    dw = torch.empty((c,) if need_affine else (0,), device=x.device, dtype=affine_dtype)
    db = torch.empty((c,) if need_affine else (0,), device=x.device, dtype=affine_dtype)
    if c == 0:
        return dx, dw, db
    x3, g3 = _as_ncs(x), _as_ncs(grad)
    s = x3.shape[2]
    cfg = _config()
    splits, rows = _splits(n, c, cfg["TARGET_PROGRAMS"])
    part = torch.empty((2, c, splits), device=x.device, dtype=torch.float32)
    coef = torch.empty((3, c), device=x.device, dtype=torch.float32)
    _grad_stats_kernel[(c, splits)](g3, *g3.stride(), x3, *x3.stride(), stats, part, n, c, s, splits, rows,
                                    BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["num_warps"])
    _grad_finalize_kernel[(triton.cdiv(c, cfg["BLOCK_C"]),)](
        part, stats, weight if weight is not None else stats, dw if need_affine else stats,
        db if need_affine else stats, coef, c, splits, float(n * s), source_weight,
        HAS_WEIGHT=weight is not None, NEED_AFFINE=need_affine, BLOCK_C=cfg["BLOCK_C"],
        BLOCK_SPLIT=max(2, triton.next_power_of_2(splits)),
    )
    if need_x:
        dx3 = dx.view(n, c, -1)
        _grad_apply_kernel[(n * c,)](g3, *g3.stride(), x3, *x3.stride(), dx3, *dx3.stride(), stats, coef, c, s,
                                     BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["num_warps"])
    return dx, dw, db


@_abn_bwd.register_fake
def _(grad, x, weight, stats, source_weight, need_x, need_affine):
    c = x.shape[1]
    dt = weight.dtype if weight is not None else x.dtype
    return (x.new_empty(x.shape if need_x else (0,)), x.new_empty((c,) if need_affine else (0,), dtype=dt),
            x.new_empty((c,) if need_affine else (0,), dtype=dt))


def _setup_context(ctx, inputs, output):
    x, _, _, weight, _, source_weight, _, _, _ = inputs
    ctx.save_for_backward(x, weight, output[3])
    ctx.source_weight = source_weight


def _backward(ctx, grad, grad_rm, grad_rv, grad_stats):
    x, weight, stats = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if not (need_x or need_w or need_b):
        return (None,) * 9
    dx, dw, db = _abn_bwd(grad, x, weight, stats, ctx.source_weight, need_x, need_w or need_b)
    return (dx if need_x else None, None, None, dw if need_w else None, db if need_b else None,
            None, None, None, None)


_abn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_vector(v, name: str, c: int, x: torch.Tensor) -> None:
    rt.check_tensor(v, name)
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got {v.dtype}")
    if tuple(v.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},) (one entry per channel), got {tuple(v.shape)}")


def alpha_batchnorm(x, running_mean, running_var, weight=None, bias=None, *, source_weight,
                    training=True, momentum=0.1, eps=1e-5):
    """α-BN forward: ``(y, new_running_mean, new_running_var)``.

    Same arguments and semantics as `twinops.reference.layers.alpha_batchnorm`; y has x's dtype, the
    running statistics keep theirs. Non-finite running statistics (or a negative running variance)
    give NaN in their channels instead of an error (checking values would need a device sync).
    """
    rt.check_tensor(x, "x")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C) or (N, C, *spatial), got {x.ndim} dimensions {tuple(x.shape)}")
    alpha = check_real(source_weight, "source_weight", low=0.0, high=1.0)
    training = check_bool(training, "training")
    momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required: alpha-BN mixes them into every "
                         "normalisation, so neither mode (eval mode included) can run before any running "
                         "statistic exists")
    c = x.shape[1]
    _check_vector(running_mean, "running_mean", c, x)
    _check_vector(running_var, "running_var", c, x)
    if weight is not None:
        _check_vector(weight, "weight", c, x)
    if bias is not None:
        _check_vector(bias, "bias", c, x)
    m = x.numel() // c if c else 0
    if c and m < 1:
        raise ValueError(f"x must have at least one element per channel, got shape {tuple(x.shape)}")
    if training and c and m < 2:
        raise ValueError(f"x must have more than one value per channel in training mode (the running "
                         f"variance is unbiased), got shape {tuple(x.shape)}")
    rt.check_device(("x", x), ("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias))
    y, new_rm, new_rv, _ = _abn_fwd(x, running_mean, running_var, weight, bias, alpha, training, momentum, eps)
    return y, new_rm, new_rv


class AlphaBatchNorm(torch.nn.Module):
    """α-BN as a drop-in for ``nn.BatchNorm1d/2d/3d`` (any (N, C, *) input).

    BatchNorm's parameters and buffers (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``); both modes normalise with the statistics mixed by ``source_weight``;
    training mode also updates the running statistics from the batch, exactly as the functional
    form returns them. ``AlphaBatchNorm.from_batchnorm(bn, source_weight=...)`` converts a trained
    BatchNorm (the usual way in: the running statistics are the source statistics α-BN mixes in).
    """

    def __init__(self, num_features: int, *, source_weight: float, momentum: float = 0.1, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_features = num_features
        self.source_weight = check_real(source_weight, "source_weight", low=0.0, high=1.0)
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
        self.eps = check_real(eps, "eps", low=0.0, low_open=True)
        factory = dict(device=device, dtype=dtype)
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_features, **factory))
            self.bias = torch.nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batchnorm(cls, bn: torch.nn.modules.batchnorm._BatchNorm, *, source_weight: float) -> "AlphaBatchNorm":
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("bn has no running statistics (track_running_stats=False): alpha-BN needs the source "
                             "statistics")
        ref = bn.running_mean
        out = cls(bn.num_features, source_weight=source_weight, momentum=0.1 if bn.momentum is None else bn.momentum,
                  eps=bn.eps, affine=bn.affine, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
            out.num_batches_tracked.copy_(bn.num_batches_tracked)
            if bn.affine:
                out.weight.copy_(bn.weight)
                out.bias.copy_(bn.bias)
        return out.train(bn.training)

    def forward(self, x):
        y, new_rm, new_rv = alpha_batchnorm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            source_weight=self.source_weight, training=self.training,
                                            momentum=self.momentum, eps=self.eps)
        if self.training:
            with torch.no_grad():
                self.running_mean.copy_(new_rm)
                self.running_var.copy_(new_rv)
                self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, source_weight={self.source_weight}, momentum={self.momentum}, "
                f"eps={self.eps}, affine={self.weight is not None}")
