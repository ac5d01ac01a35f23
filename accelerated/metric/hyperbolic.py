"""Poincaré-ball operations of Hyp-OC (P48) as Triton kernels. See
`twinops.reference.metric.hyperbolic` for the definitions and the semantics.

`poincare_expmap0` and `poincare_distance` are row-wise and bandwidth-bound: each program owns
``BLOCK_M`` rows and walks their D columns in ``BLOCK_D``-wide chunks twice, once for the row
scalars (norms, dot products) and once to write the result. The backward kernels recompute those
scalars from the inputs; nothing is saved but the inputs. `hyp_pc_loss` runs the distance kernel on
the two halves of the batch (strided views, no copy) and sums in fp32. `hyperbolic_mlr_ce`, the
tiled GEMM-epilogue kernel, lives in `twinops.accelerated.metric.hyperbolic_mlr_ce`.

Values that would need a device synchronisation to check (a point outside the ball) give NaN for
their row instead of an error.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt
from .._triton_math import expm1, log1p
from .hyperbolic_mlr_ce import HyperbolicMLRLoss, hyperbolic_mlr_ce  # noqa: F401  (re-exported)

__all__ = ["poincare_expmap0", "poincare_distance", "hyp_pc_loss", "hyperbolic_mlr_ce",
           "ToPoincare", "HypPCLoss", "HyperbolicMLRLoss"]

HAS_TRITON_BACKWARD = True

CLIP_EPS = 1e-5  # added to ||x|| in the clipping factor, as the reference
SERIES_S = 0.1   # below this sqrt(c)*||u||, tanh(s)/s and its derivative use Taylor series (fp32 cancellation)


def _row_launch(d: int) -> dict:
    """``BLOCK_D`` (whole rows up to 1024 columns on the GPU, 16 under the interpreter so small
    widths cross chunk boundaries) and ``BLOCK_M`` rows per program (about 4096 elements a tile)."""
    if rt.interpreting():
        return {"BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 1}
    block_d = max(16, min(1024, triton.next_power_of_2(max(d, 1))))
    return {"BLOCK_M": max(1, 4096 // block_d), "BLOCK_D": block_d, "num_warps": 4}


@triton.jit
def _tanh_terms(s):
    """For s >= 0: t = tanh(s), f = tanh(s)/s and q = f'(s)/s, Taylor series below SERIES_S
    (the closed forms cancel catastrophically there in fp32)."""
    e = expm1(-2.0 * s)
    t = -e / (2.0 + e)
    s2 = s * s
    small = s < 0.1
    safe = tl.where(small, 1.0, s)
    f_series = 1.0 + s2 * (-1.0 / 3.0 + s2 * (2.0 / 15.0 + s2 * (-17.0 / 315.0 + s2 * (62.0 / 2835.0))))
    q_series = -2.0 / 3.0 + s2 * (8.0 / 15.0 + s2 * (-102.0 / 315.0 + s2 * (496.0 / 2835.0)))
    f = tl.where(small, f_series, t / safe)
    q = tl.where(small, q_series, (1.0 - t * t) / (safe * safe) - t / (safe * safe * safe))
    return t, f, q


@triton.jit
def _expmap0_scalars(n2, c, sqrt_c, clip_r, eps, CLIP: tl.constexpr):
    """Row scalars of the forward: ||x||, clip factor k, ||u|| = k ||x||, tanh terms, projected?"""
    n = tl.sqrt(n2)
    k = tl.full(n.shape, 1.0, tl.float32)
    if CLIP:
        k = tl.minimum(1.0, clip_r / (n + 1e-5))
    rho = k * n
    t, f, q = _tanh_terms(sqrt_c * rho)
    projected = t > 1.0 - eps
    return n, k, rho, t, f, q, projected


@triton.jit
def _expmap0_forward_kernel(
    x_ptr, stride_xn, stride_xd,  # (N, D) input features; element (i, j) at i*stride_xn + j*stride_xd
    y_ptr, stride_yn, stride_yd,  # out (N, D) ball points, x's dtype
    N, D, c, sqrt_c, clip_r, eps,
    CLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_n = rows < N
    n2 = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_n[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        n2 += tl.sum(x * x, axis=1)
    n, k, rho, t, f, q, projected = _expmap0_scalars(n2, c, sqrt_c, clip_r, eps, CLIP)
    # projected: y = (1 - eps)/sqrt(c) * x/||x||; otherwise y = f k x
    scale = tl.where(projected, (1.0 - eps) / (sqrt_c * tl.where(n > 0, n, 1.0)), f * k)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_n[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        y = scale[:, None] * x
        tl.store(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_yd, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expmap0_backward_kernel(
    g_ptr, stride_gn, stride_gd,    # (N, D) upstream gradient dL/dy
    x_ptr, stride_xn, stride_xd,    # (N, D) input features
    gx_ptr, stride_hn, stride_hd,   # out (N, D) dL/dx, x's dtype
    N, D, c, sqrt_c, clip_r, eps,
    CLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_n = rows < N
    n2 = tl.zeros((BLOCK_M,), tl.float32)
    xg = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_n[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        n2 += tl.sum(x * x, axis=1)
        xg += tl.sum(x * g, axis=1)
    n, k, rho, t, f, q, projected = _expmap0_scalars(n2, c, sqrt_c, clip_r, eps, CLIP)
    # dL/du = a1 g + a2 x (u = k x, u.g = k x.g):
    #   free:      f g + c q (u.g) u
    #   projected: P/rho (g - (u.g) u / rho^2),  P = (1 - eps)/sqrt(c)
    ug = k * xg
    safe_rho = tl.where(rho > 0, rho, 1.0)
    pr = (1.0 - eps) / (sqrt_c * safe_rho)
    a1 = tl.where(projected, pr, f)
    a2 = tl.where(projected, -pr * ug * k / (safe_rho * safe_rho), c * q * ug * k)
    # clip active (k < 1): dL/dx = k (gu - (x.gu) x / (n (n + 1e-5)))
    b1 = a1
    b2 = a2
    if CLIP:
        xgu = a1 * xg + a2 * n2
        clipped = k < 1.0
        safe_n = tl.where(n > 0, n, 1.0)
        b1 = tl.where(clipped, k * a1, a1)
        b2 = tl.where(clipped, k * (a2 - xgu / (safe_n * (n + 1e-5))), a2)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_n[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        gx = b1[:, None] * g + b2[:, None] * x
        tl.store(gx_ptr + rows[:, None] * stride_hn + cols[None, :] * stride_hd, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _distance_scalars(x_ptr, stride_xn, stride_xd, y_ptr, stride_yn, stride_yd, rows, in_n, D, c,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: a = 1 - c||x||^2, b = 1 - c||y||^2, delta = ||x - y||^2 (from the difference, not
    expanded, so near-equal points keep their relative accuracy) and t = 2 c delta / (a b) = gamma - 1.
    Rows outside the ball (a <= 0 or b <= 0) get t = NaN."""
    x2 = tl.zeros((BLOCK_M,), tl.float32)
    y2 = tl.zeros((BLOCK_M,), tl.float32)
    delta = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_n[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_yd, mask=mask, other=0.0).to(tl.float32)
        x2 += tl.sum(x * x, axis=1)
        y2 += tl.sum(y * y, axis=1)
        delta += tl.sum((x - y) * (x - y), axis=1)
    a = 1.0 - c * x2
    b = 1.0 - c * y2
    t = 2.0 * c * delta / (a * b)
    t = tl.where((a > 0) & (b > 0), t, float("nan"))
    return a, b, delta, t


@triton.jit
def _distance_forward_kernel(
    x_ptr, stride_xn, stride_xd,  # (N, D) ball points
    y_ptr, stride_yn, stride_yd,  # (N, D) ball points
    d_ptr,                        # out (N,) fp32 distances
    N, D, c, sqrt_c,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_n = rows < N
    a, b, delta, t = _distance_scalars(x_ptr, stride_xn, stride_xd, y_ptr, stride_yn, stride_yd, rows, in_n,
                                       D, c, BLOCK_M, BLOCK_D)
    d = log1p(t + tl.sqrt(t * (t + 2.0))) / sqrt_c  # arcosh(1 + t)
    tl.store(d_ptr + rows, d, mask=in_n)


@triton.jit
def _distance_backward_kernel(
    g_ptr, stride_g,                # (N,) upstream gradient of the distances
    x_ptr, stride_xn, stride_xd,
    y_ptr, stride_yn, stride_yd,
    gx_ptr, stride_gxn, stride_gxd,  # out (N, D) dL/dx, x's dtype
    gy_ptr, stride_gyn, stride_gyd,  # out (N, D) dL/dy
    N, D, c, sqrt_c,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_n = rows < N
    a, b, delta, t = _distance_scalars(x_ptr, stride_xn, stride_xd, y_ptr, stride_yn, stride_yd, rows, in_n,
                                       D, c, BLOCK_M, BLOCK_D)
    g = tl.load(g_ptr + rows * stride_g, mask=in_n, other=0.0).to(tl.float32)
    # dd/dx = 4 sqrt(c) / (a b sqrt(gamma^2 - 1)) [(x - y) + (c delta / a) x]; 0 where x = y
    root = tl.sqrt(t * (t + 2.0))
    coef = g * 4.0 * sqrt_c / (a * b * tl.where(delta == 0.0, 1.0, root))
    coef = tl.where(delta == 0.0, 0.0, coef)  # NaN delta (NaN input) stays NaN
    cx = coef * c * delta / a
    cy = coef * c * delta / b
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_n[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_yd, mask=mask, other=0.0).to(tl.float32)
        diff = coef[:, None] * (x - y)
        gx = diff + cx[:, None] * x
        gy = cy[:, None] * y - diff
        tl.store(gx_ptr + rows[:, None] * stride_gxn + cols[None, :] * stride_gxd, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gy_ptr + rows[:, None] * stride_gyn + cols[None, :] * stride_gyd, gy.to(gy_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ custom ops


def _grid(n: int, launch: dict):
    return (triton.cdiv(n, launch["BLOCK_M"]),)


@torch.library.custom_op("twinops::poincare_expmap0", mutates_args=())
def _expmap0_op(x: torch.Tensor, c: float, clip_r: float, eps: float) -> torch.Tensor:
    """``clip_r <= 0`` means no clipping (the public entry maps ``None`` to 0)."""
    n, d = x.shape
    y = torch.empty((n, d), device=x.device, dtype=x.dtype)
    if n > 0 and d > 0:
        launch = _row_launch(d)
        _expmap0_forward_kernel[_grid(n, launch)](
            x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1),
            n, d, c, c ** 0.5, clip_r, eps, CLIP=clip_r > 0, **launch,
        )
    return y


@_expmap0_op.register_fake
def _(x, c, clip_r, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("twinops::poincare_expmap0_backward", mutates_args=())
def _expmap0_backward_op(grad: torch.Tensor, x: torch.Tensor, c: float, clip_r: float, eps: float) -> torch.Tensor:
    n, d = x.shape
    gx = torch.empty((n, d), device=x.device, dtype=x.dtype)
    if n > 0 and d > 0:
        launch = _row_launch(d)
        _expmap0_backward_kernel[_grid(n, launch)](
            grad, grad.stride(0), grad.stride(1), x, x.stride(0), x.stride(1), gx, gx.stride(0), gx.stride(1),
            n, d, c, c ** 0.5, clip_r, eps, CLIP=clip_r > 0, **launch,
        )
    return gx


@_expmap0_backward_op.register_fake
def _(grad, x, c, clip_r, eps):
    return x.new_empty(x.shape)


def _expmap0_setup(ctx, inputs, output):
    x, ctx.c, ctx.clip_r, ctx.eps = inputs
    ctx.save_for_backward(x)


def _expmap0_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return _expmap0_backward_op(grad, x, ctx.c, ctx.clip_r, ctx.eps), None, None, None


_expmap0_op.register_autograd(_expmap0_backward, setup_context=_expmap0_setup)


@torch.library.custom_op("twinops::poincare_distance_rows", mutates_args=())
def _distance_op(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Row-wise distances in fp32, for `poincare_distance` (cast to the input dtype) and `hyp_pc_loss`."""
    n, d = x.shape
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    if n > 0:
        launch = _row_launch(d)
        _distance_forward_kernel[_grid(n, launch)](
            x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), out, n, d, c, c ** 0.5, **launch,
        )
    return out


@_distance_op.register_fake
def _(x, y, c):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("twinops::poincare_distance_rows_backward", mutates_args=())
def _distance_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    gx = torch.empty((n, d), device=x.device, dtype=x.dtype)
    gy = torch.empty((n, d), device=x.device, dtype=x.dtype)
    if n > 0:
        launch = _row_launch(d)
        _distance_backward_kernel[_grid(n, launch)](
            grad, grad.stride(0), x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1),
            gx, gx.stride(0), gx.stride(1), gy, gy.stride(0), gy.stride(1), n, d, c, c ** 0.5, **launch,
        )
    return gx, gy


@_distance_backward_op.register_fake
def _(grad, x, y, c):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _distance_setup(ctx, inputs, output):
    x, y, ctx.c = inputs
    ctx.save_for_backward(x, y)


def _distance_backward(ctx, grad):
    x, y = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None
    gx, gy = _distance_backward_op(grad, x, y, ctx.c)
    return (gx if ctx.needs_input_grad[0] else None), (gy if ctx.needs_input_grad[1] else None), None


_distance_op.register_autograd(_distance_backward, setup_context=_distance_setup)


# ------------------------------------------------------------------------------------ public API


def _curvature(c) -> float:
    return check_real(c, "c", low=0.0, low_open=True)


def poincare_expmap0(x, *, c=0.1, clip_r=2.0, eps=1e-3):
    """Clip features to norm ``clip_r`` (``None``: no clipping), map them to the Poincaré ball with the
    exponential map at 0 and project onto radius (1 - eps)/sqrt(c), on the GPU. Same arguments and
    semantics as `twinops.reference.metric.hyperbolic.poincare_expmap0`; returns x's dtype."""
    rt.check_float_tensor(x, "x", 2, "(N, D)")
    c = _curvature(c)
    if clip_r is not None:
        clip_r = check_real(clip_r, "clip_r", low=0.0, low_open=True)
    eps = check_real(eps, "eps", low=0.0, high=1.0, low_open=True, high_open=True)
    rt.check_device(("x", x))
    return _expmap0_op(x, c, 0.0 if clip_r is None else clip_r, eps)


def _check_ball_pair(x, y):
    rt.check_float_tensor(x, "x", 2, "(N, D)")
    rt.check_float_tensor(y, "y", 2, "(N, D)")
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"y must have the dtype of x ({x.dtype}), got {y.dtype}")
    rt.check_device(("x", x), ("y", y))


def poincare_distance(x, y, *, c=0.1):
    """Row-wise geodesic distances on the Poincaré ball, on the GPU. Same arguments and semantics as
    `twinops.reference.metric.hyperbolic.poincare_distance`; a row outside the ball gives NaN instead
    of an error (checking would synchronise the device). Returns x's dtype."""
    _check_ball_pair(x, y)
    c = _curvature(c)
    return _distance_op(x, y, c).to(x.dtype)


def hyp_pc_loss(z, *, c=0.1):
    """Hyp-PC loss: sum of the distances between rows i and i + B/2 of ``z`` (B, D), over B, on the GPU.
    Same arguments and semantics as `twinops.reference.metric.hyperbolic.hyp_pc_loss` (rows outside
    the ball give NaN instead of an error). Returns z's dtype."""
    rt.check_float_tensor(z, "z", 2, "(B, D)")
    b = z.shape[0]
    if b % 2:
        raise ValueError(f"z must have an even number of rows B (row i is paired with row i + B/2), got B = {b}")
    c = _curvature(c)
    rt.check_device(("z", z))
    if b == 0:
        return z.sum() * 0.0
    d = _distance_op(z[: b // 2], z[b // 2:], c)
    return (d.sum() / b).to(z.dtype)


class ToPoincare(torch.nn.Module):
    """``nn.Module`` form of `poincare_expmap0` (hyptorch's ``ToPoincare`` at the origin, exact gradient)."""

    def __init__(self, *, c=0.1, clip_r=2.0, eps=1e-3):
        super().__init__()
        self.c, self.clip_r, self.eps = c, clip_r, eps

    def forward(self, x):
        return poincare_expmap0(x, c=self.c, clip_r=self.clip_r, eps=self.eps)


class HypPCLoss(torch.nn.Module):
    """``nn.Module`` form of `hyp_pc_loss`."""

    def __init__(self, *, c=0.1):
        super().__init__()
        self.c = c

    def forward(self, z):
        return hyp_pc_loss(z, c=self.c)
