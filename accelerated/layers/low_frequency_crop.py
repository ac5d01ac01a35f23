"""Low-frequency crop (P8, EfficientTrain) as two batched real matrix products, no FFT.
See `twinops.reference.layers.low_frequency_crop` for the definition.

The crop of one (H, W) plane is separable, y = Re(A_H x A_W^T), with A = A_r + i u v^T
(2b x S complex, imaginary part rank one: u_m = (-1)^m, v_n = sin(2 pi b n / S) / S), so

    forward   y  = A_Hr x A_Wr^T - u_H (v_H^T x v_W) u_W^T
    backward  dx = A_Hr^T g A_Wr - v_H (u_H^T g u_W) v_W^T

    A_r[m, n] = (1/S) * (1 + 2 sum_{f=1}^{b-1} cos(2 pi f (m/2b - n/S)) + (-1)^m cos(2 pi b n / S)).

Both directions run the same two kernels with different small matrices (built once per
(S, b, device) in float64, kept in fp32):

    right pass  T = z @ [R | c]        z: one plane (rows x K), [R | c]: (K, NOUT + 1), T in fp32
    left pass   out = Lm @ T[:, :NOUT] - alpha beta^T (gamma . T[:, NOUT])

The extra column c gives the rank-one term's inner vector (x v_W forward, g u_W backward) for free
inside the right pass. T is an fp32 (N*C, rows, NOUT + 1) intermediate: extra memory of about one
input's worth (in fp32), no complex spectrum. A non-finite input turns its whole row of T into NaN
(a row sum of z * 0), so the whole output plane is NaN, as in the reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from ...reference.layers.low_frequency_crop import _bands  # the reference's checks on band, shared
from .. import _runtime as rt

__all__ = ["low_frequency_crop", "LowFrequencyCrop"]

HAS_TRITON_BACKWARD = True


@triton.jit
def _right_kernel(
    z_ptr, stride_zn, stride_zc, stride_zr, stride_zk,  # (N, C, ROWS, K) input planes, any strides
    m_ptr,                                              # (K, NOUT + 1) fp32 contiguous: [R | c]
    t_ptr,                                              # out (N*C, ROWS, NOUT + 1) fp32 contiguous
    C, ROWS, K, NCOLS,                                  # NCOLS = NOUT + 1
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    z_base = z_ptr + (plane // C) * stride_zn + (plane % C) * stride_zc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    poison = tl.zeros((BLOCK_M,), dtype=tl.float32)  # 0, or NaN for a row holding NaN/inf
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        z = tl.load(z_base + rows[:, None] * stride_zr + ks[None, :] * stride_zk,
                    mask=(rows[:, None] < ROWS) & (ks[None, :] < K), other=0.0).to(tl.float32)
        m = tl.load(m_ptr + ks[:, None] * NCOLS + cols[None, :],
                    mask=(ks[:, None] < K) & (cols[None, :] < NCOLS), other=0.0)
        acc = tl.dot(z, m, acc, input_precision=PRECISION)
        poison += tl.sum(z * 0.0, axis=1)
    acc += poison[:, None]
    t_base = t_ptr + plane * ROWS * NCOLS
    tl.store(t_base + rows[:, None] * NCOLS + cols[None, :], acc,
             mask=(rows[:, None] < ROWS) & (cols[None, :] < NCOLS))


@triton.jit
def _left_kernel(
    l_ptr,                                              # (MOUT, K) fp32 contiguous: Lm
    t_ptr,                                              # (N*C, K, NOUT + 1) fp32 from the right pass
    gamma_ptr, alpha_ptr, beta_ptr,                     # (K,), (MOUT,), (NOUT,) fp32: the rank-one term
    out_ptr, stride_on, stride_oc, stride_or, stride_ok,  # out (N, C, MOUT, NOUT) in the input dtype
    C, MOUT, K, NOUT,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    ncols = NOUT + 1
    t_base = t_ptr + plane * K * ncols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    inner = tl.zeros((BLOCK_K,), dtype=tl.float32)  # partial sums of gamma . T[:, NOUT]
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        lm = tl.load(l_ptr + rows[:, None] * K + ks[None, :],
                     mask=(rows[:, None] < MOUT) & (ks[None, :] < K), other=0.0)
        t = tl.load(t_base + ks[:, None] * ncols + cols[None, :],
                    mask=(ks[:, None] < K) & (cols[None, :] < NOUT), other=0.0)
        acc = tl.dot(lm, t, acc, input_precision=PRECISION)
        t_last = tl.load(t_base + ks * ncols + NOUT, mask=ks < K, other=0.0)
        inner += tl.load(gamma_ptr + ks, mask=ks < K, other=0.0) * t_last
    s = tl.sum(inner, axis=0)
    alpha = tl.load(alpha_ptr + rows, mask=rows < MOUT, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=cols < NOUT, other=0.0)
    acc -= (alpha[:, None] * beta[None, :]) * s
    out_base = out_ptr + (plane // C) * stride_on + (plane % C) * stride_oc
    tl.store(out_base + rows[:, None] * stride_or + cols[None, :] * stride_ok, acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < MOUT) & (cols[None, :] < NOUT))


# ------------------------------------------------------------------------------------------ host side

_FACTORS: dict = {}


def _axis_factors(size: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A_r (2b, S), u (2b,) and v (S,) of one axis, in float64."""
    m = np.arange(2 * b)[:, None]
    n = np.arange(size)[None, :]
    a_r = np.ones((2 * b, size))
    for f in range(1, b):
        a_r += 2.0 * np.cos(2.0 * math.pi * f * (m / (2 * b) - n / size))
    a_r += np.where(m % 2 == 0, 1.0, -1.0) * np.cos(2.0 * math.pi * b * n / size)
    u = np.where(np.arange(2 * b) % 2 == 0, 1.0, -1.0)
    v = np.sin(2.0 * math.pi * b * np.arange(size) / size) / size
    if 2 * b == size:  # sin(pi n) = 0 exactly; keep the identity exact
        v = np.zeros(size)
    return a_r / size, u, v


def _factors(height: int, width: int, bh: int, bw: int, device: torch.device, forward: bool):
    """(right matrix [R | c], Lm, gamma, alpha, beta) as fp32 tensors on ``device``, cached."""
    key = (height, width, bh, bw, str(device), forward)
    if key not in _FACTORS:
        ah, uh, vh = _axis_factors(height, bh)
        aw, uw, vw = _axis_factors(width, bw)
        if forward:  # y = A_Hr x A_Wr^T - u_H (v_H . x v_W) u_W^T
            parts = (np.concatenate([aw.T, vw[:, None]], axis=1), ah, vh, uh, uw)
        else:        # dx = A_Hr^T g A_Wr - v_H (u_H . g u_W) v_W^T
            parts = (np.concatenate([aw, uw[:, None]], axis=1), ah.T, uh, vh, vw)
        _FACTORS[key] = tuple(torch.tensor(np.ascontiguousarray(p), dtype=torch.float32, device=device)
                              for p in parts)
    return _FACTORS[key]


def _launch(z: torch.Tensor, factors, out_rows: int, out_cols: int) -> torch.Tensor:
    """out[n, c] = Lm @ (z[n, c] @ R) - alpha beta^T (gamma . z[n, c] c), in z's dtype."""
    right, lm, gamma, alpha, beta = factors
    n, c, rows, k = z.shape
    out = torch.empty((n, c, out_rows, out_cols), device=z.device, dtype=z.dtype)
    planes = n * c
    if planes == 0:
        return out
    block = 16 if rt.interpreting() else 64
    block_k = 16 if rt.interpreting() else 32
    # The factors and the intermediate are fp32 whatever the input dtype. fp32 inputs follow PyTorch's
    # matmul precision switch (exact by default). bf16 inputs multiply at TF32: bf16 values are exact in
    # TF32 and the factors' rounding (~5e-4 relative) is far below a bf16 output's resolution. fp16
    # outputs resolve ~5e-4, so fp16 inputs multiply exactly.
    precision = rt.dot_precision(z.dtype) if z.dtype != torch.float16 else "ieee"
    ncols = out_cols + 1
    t = torch.empty((planes, rows, ncols), device=z.device, dtype=torch.float32)
    _right_kernel[(planes, triton.cdiv(rows, block), triton.cdiv(ncols, block))](
        z, *z.stride(), right, t, c, rows, k, ncols,
        PRECISION=precision, BLOCK_M=block, BLOCK_N=block, BLOCK_K=block_k,
    )
    _left_kernel[(planes, triton.cdiv(out_rows, block), triton.cdiv(out_cols, block))](
        lm, t, gamma, alpha, beta, out, *out.stride(), c, out_rows, rows, out_cols,
        PRECISION=precision, BLOCK_M=block, BLOCK_N=block, BLOCK_K=block_k,
    )
    return out


@torch.library.custom_op("twinops::low_frequency_crop", mutates_args=())
def _crop(x: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    height, width = x.shape[2], x.shape[3]
    return _launch(x, _factors(height, width, bh, bw, x.device, True), 2 * bh, 2 * bw)


@_crop.register_fake
def _(x, bh, bw):
    return x.new_empty((x.shape[0], x.shape[1], 2 * bh, 2 * bw))


@torch.library.custom_op("twinops::low_frequency_crop_backward", mutates_args=())
def _crop_backward(grad: torch.Tensor, height: int, width: int, bh: int, bw: int) -> torch.Tensor:
    return _launch(grad, _factors(height, width, bh, bw, grad.device, False), height, width)


@_crop_backward.register_fake
def _(grad, height, width, bh, bw):
    return grad.new_empty((grad.shape[0], grad.shape[1], height, width))


def _setup_context(ctx, inputs, output):
    x, bh, bw = inputs
    ctx.shape = (x.shape[2], x.shape[3], bh, bw)
    ctx.dtype = x.dtype


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return _crop_backward(grad, *ctx.shape).to(ctx.dtype), None, None


_crop.register_autograd(_backward, setup_context=_setup_context)


def low_frequency_crop(x, *, band=160):
    """Keep the low-frequency ``band`` of each (n, c) plane's spectrum: (N, C, H, W) -> (N, C, 2b_h, 2b_w).

    Same arguments and semantics as `twinops.reference.layers.low_frequency_crop`; returns the
    input dtype. Computed as two real matrix products per plane (no FFT, no complex intermediate).
    """
    rt.check_float_tensor(x, "x", 4, "(N, C, H, W)")
    bh, bw = _bands(band, x.shape[2], x.shape[3])
    rt.check_device(("x", x))
    return _crop(x, bh // 2, bw // 2)


class LowFrequencyCrop(torch.nn.Module):
    """``nn.Module`` form of `low_frequency_crop` (no parameters; the band is fixed at construction,
    or changed between curriculum stages by assigning ``module.band``)."""

    def __init__(self, *, band=160):
        super().__init__()
        self.band = band

    def forward(self, x):
        return low_frequency_crop(x, band=self.band)

    def extra_repr(self) -> str:
        return f"band={self.band}"
