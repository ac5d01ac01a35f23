"""Masked mean pooling (P31) as bandwidth-bound Triton kernels: one read of the (B, T, D) token
states forward, one write of their gradient backward. See `twinops.reference.metric.masked_mean_pool`
for the definition.

Forward, one program per (sequence b, slice of BLOCK_D features):
    walk T in BLOCK_T chunks, loading only kept tokens (padding is never read, so NaN there is
    ignored), fp32 sums and the kept count n_b; e_b = sum / max(n_b, 1) (an all-masked row is 0).
    With ``normalize`` the means go to an fp32 (B, D) buffer and a row kernel divides each by
    max(||e_b||, eps).
Backward, with de_b = grad_b (or the normalisation's VJP of it, one row kernel):
    d hidden[b, t, :] = [m_bt != 0] de_b / max(n_b, 1), one program per (b, T chunk, D slice).
Saved for the backward: 1 / max(n_b, 1) and ||e_b|| per row (8 bytes), and with ``normalize``
the fp32 means (O(B D)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_bool, check_real
from .. import _runtime as rt

__all__ = ["masked_mean_pool", "MaskedMeanPool"]

HAS_TRITON_BACKWARD = True

# Token chunk x feature slice per program; untuned guesses pending a GPU sweep.
GPU_BLOCKS = dict(BLOCK_T=32, BLOCK_D=128, num_warps=4)
INTERPRETER_BLOCKS = dict(BLOCK_T=16, BLOCK_D=16)
ROW_BLOCK = {"gpu": 1024, "interpreter": 16}  # feature chunk of the row-wise normalisation kernels


def _blocks() -> dict:
    return dict(INTERPRETER_BLOCKS) if rt.interpreting() else dict(GPU_BLOCKS)


def _row_block() -> int:
    return ROW_BLOCK["interpreter" if rt.interpreting() else "gpu"]


@triton.jit
def _pool_forward_kernel(
    h_ptr, stride_hb, stride_ht, stride_hd,  # (B, T, D) token states; (b, t, d) at b*stride_hb + t*stride_ht + d*stride_hd
    mask_ptr, stride_mb, stride_mt,          # (B, T) bool/integer mask; nonzero keeps the token
    out_ptr, stride_ob, stride_od,           # out (B, D): the means (input dtype, or fp32 when normalising next)
    stats_ptr,                               # out (B, 2) fp32 contiguous: [b, 0] = 1 / max(n_b, 1) (first feature slice)
    T, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    ds = d_block.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = ds < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    count = tl.zeros((BLOCK_T,), tl.int32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        keep = tl.load(mask_ptr + b * stride_mb + ts * stride_mt, mask=ts < T, other=0) != 0
        x = tl.load(h_ptr + b * stride_hb + ts[:, None] * stride_ht + ds[None, :] * stride_hd,
                    mask=keep[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
        count += keep.to(tl.int32)
    inv_count = 1.0 / tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + ds * stride_od, (acc * inv_count).to(out_ptr.dtype.element_ty), mask=d_mask)
    if d_block == 0:
        tl.store(stats_ptr + b * 2, inv_count)


@triton.jit
def _normalize_kernel(
    mean_ptr,                      # (B, D) fp32 contiguous means
    out_ptr, stride_ob, stride_od,  # out (B, D) input dtype: mean / max(||mean||, eps)
    stats_ptr,                     # out (B, 2) fp32 contiguous: [b, 1] = ||mean||
    D, eps,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    sq = tl.zeros((BLOCK,), tl.float32)
    for d0 in range(0, D, BLOCK):
        ds = d0 + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(mean_ptr + b * D + ds, mask=ds < D, other=0.0)
        sq += x * x
    norm = tl.sqrt(tl.sum(sq, axis=0))
    inv = 1.0 / tl.where(norm > eps, norm, eps)  # NaN norms fall through to NaN
    inv = tl.where(norm != norm, norm, inv)
    for d0 in range(0, D, BLOCK):
        ds = d0 + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(mean_ptr + b * D + ds, mask=ds < D, other=0.0)
        tl.store(out_ptr + b * stride_ob + ds * stride_od, (x * inv).to(out_ptr.dtype.element_ty), mask=ds < D)
    tl.store(stats_ptr + b * 2 + 1, norm)


@triton.jit
def _normalize_backward_kernel(
    grad_ptr, stride_gb, stride_gd,  # (B, D) upstream gradient of the normalised output
    mean_ptr,                        # (B, D) fp32 contiguous means saved by the forward
    stats_ptr,                       # (B, 2) fp32 from the forward: [b, 1] = ||mean||
    d_mean_ptr,                      # out (B, D) fp32 contiguous: the gradient of the means
    D, eps,
    BLOCK: tl.constexpr,
):
    """de = (g - y (y . g)) / ||e|| with y = e / ||e|| above eps; g / eps at or below it
    (F.normalize's clamp makes the norm a constant there)."""
    b = tl.program_id(0).to(tl.int64)
    norm = tl.load(stats_ptr + b * 2 + 1)
    clamped = norm <= eps
    inv = 1.0 / tl.where(clamped, eps, norm)
    yg = tl.zeros((BLOCK,), tl.float32)
    for d0 in range(0, D, BLOCK):
        ds = d0 + tl.arange(0, BLOCK).to(tl.int64)
        g = tl.load(grad_ptr + b * stride_gb + ds * stride_gd, mask=ds < D, other=0.0).to(tl.float32)
        e = tl.load(mean_ptr + b * D + ds, mask=ds < D, other=0.0)
        yg += e * inv * g
    y_dot_g = tl.sum(yg, axis=0)
    for d0 in range(0, D, BLOCK):
        ds = d0 + tl.arange(0, BLOCK).to(tl.int64)
        g = tl.load(grad_ptr + b * stride_gb + ds * stride_gd, mask=ds < D, other=0.0).to(tl.float32)
        e = tl.load(mean_ptr + b * D + ds, mask=ds < D, other=0.0)
        de = tl.where(clamped, g * inv, (g - e * inv * y_dot_g) * inv)
        tl.store(d_mean_ptr + b * D + ds, de, mask=ds < D)


@triton.jit
def _pool_backward_kernel(
    d_mean_ptr, stride_db, stride_dd,        # (B, D) gradient of the means (the upstream gradient, or fp32)
    mask_ptr, stride_mb, stride_mt,          # (B, T) mask
    stats_ptr,                               # (B, 2) fp32 from the forward: [b, 0] = 1 / max(n_b, 1)
    grad_h_ptr, stride_gb, stride_gt, stride_gd,  # out (B, T, D) in the states' dtype
    T, D, T_BLOCKS,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * T_BLOCKS + t_block: grid dimension 0 has room for B * T / BLOCK_T
    b = pid // T_BLOCKS
    ts = (pid % T_BLOCKS) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    ds = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    t_mask, d_mask = ts < T, ds < D
    keep = tl.load(mask_ptr + b * stride_mb + ts * stride_mt, mask=t_mask, other=0) != 0
    de = tl.load(d_mean_ptr + b * stride_db + ds * stride_dd, mask=d_mask, other=0.0).to(tl.float32)
    de = de * tl.load(stats_ptr + b * 2)
    g = tl.where(keep[:, None], de[None, :], 0.0)
    tl.store(grad_h_ptr + b * stride_gb + ts[:, None] * stride_gt + ds[None, :] * stride_gd,
             g.to(grad_h_ptr.dtype.element_ty), mask=t_mask[:, None] & d_mask[None, :])


@torch.library.custom_op("twinops::masked_mean_pool", mutates_args=())
def _masked_mean_pool(
    hidden: torch.Tensor, mask: torch.Tensor, normalize: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, d = hidden.shape
    out = torch.empty((b, d), device=hidden.device, dtype=hidden.dtype)
    mean = torch.empty((b, d) if normalize else (0,), device=hidden.device, dtype=torch.float32)
    stats = torch.zeros((b, 2), device=hidden.device, dtype=torch.float32)  # 1 / max(n_b, 1), ||e_b||
    if b == 0 or d == 0:
        return out, mean, stats
    blocks = _blocks()
    target = mean if normalize else out
    _pool_forward_kernel[(b, triton.cdiv(d, blocks["BLOCK_D"]))](
        hidden, hidden.stride(0), hidden.stride(1), hidden.stride(2), mask, mask.stride(0), mask.stride(1),
        target, target.stride(0), target.stride(1), stats, t, d, **blocks,
    )
    if normalize:
        _normalize_kernel[(b,)](mean, out, out.stride(0), out.stride(1), stats, d, eps, BLOCK=_row_block())
    return out, mean, stats


@_masked_mean_pool.register_fake
def _(hidden, mask, normalize, eps):
    b, _, d = hidden.shape
    return (hidden.new_empty((b, d)), hidden.new_empty((b, d) if normalize else (0,), dtype=torch.float32),
            hidden.new_empty((b, 2), dtype=torch.float32))


@torch.library.custom_op("twinops::masked_mean_pool_backward", mutates_args=())
def _masked_mean_pool_backward(
    grad: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, stats: torch.Tensor,
    normalize: bool, eps: float,
) -> torch.Tensor:
    b, t, d = hidden.shape
    grad_h = torch.empty((b, t, d), device=hidden.device, dtype=hidden.dtype)
    if grad_h.numel() == 0:
        return grad_h
    d_mean = grad
    if normalize:
        d_mean = torch.empty((b, d), device=hidden.device, dtype=torch.float32)
        _normalize_backward_kernel[(b,)](grad, grad.stride(0), grad.stride(1), mean, stats, d_mean, d, eps,
                                         BLOCK=_row_block())
    blocks = _blocks()
    t_blocks = triton.cdiv(t, blocks["BLOCK_T"])
    _pool_backward_kernel[(b * t_blocks, triton.cdiv(d, blocks["BLOCK_D"]))](
        d_mean, d_mean.stride(0), d_mean.stride(1), mask, mask.stride(0), mask.stride(1), stats,
        grad_h, grad_h.stride(0), grad_h.stride(1), grad_h.stride(2), t, d, t_blocks, **blocks,
    )
    return grad_h


@_masked_mean_pool_backward.register_fake
def _(grad, hidden, mask, mean, stats, normalize, eps):
    return hidden.new_empty(hidden.shape)


def _setup_context(ctx, inputs, output):
    hidden, mask, normalize, eps = inputs
    ctx.save_for_backward(hidden, mask, output[1], output[2])
    ctx.normalize, ctx.eps = normalize, eps


def _backward(ctx, grad, grad_mean, grad_stats):
    hidden, mask, mean, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return _masked_mean_pool_backward(grad, hidden, mask, mean, stats, ctx.normalize, ctx.eps), None, None, None


_masked_mean_pool.register_autograd(_backward, setup_context=_setup_context)


def masked_mean_pool(hidden, mask, *, normalize=False, eps=1e-12):
    """Mean of the kept token states of each sequence, (B, D); unit rows when ``normalize``.

    Same arguments and semantics as `twinops.reference.metric.masked_mean_pool`; returns the
    states' dtype. Padding tokens are never read.
    """
    rt.check_float_tensor(hidden, "hidden", 3, "(B, T, D)")
    rt.check_tensor(mask, "mask")
    if mask.dtype != torch.bool and mask.dtype not in rt.INT_DTYPES:
        raise TypeError(f"mask must be a bool or integer tensor (nonzero keeps a token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])} (B, T) to match hidden, "
                         f"got {tuple(mask.shape)}")
    normalize = check_bool(normalize, "normalize")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    rt.check_device(("hidden", hidden), ("mask", mask))
    return _masked_mean_pool(hidden, mask, normalize, eps)[0]


class MaskedMeanPool(torch.nn.Module):
    """``nn.Module`` form of `masked_mean_pool`: ``pool(hidden, attention_mask)``."""

    def __init__(self, *, normalize=False, eps=1e-12):
        super().__init__()
        self.normalize, self.eps = normalize, eps

    def forward(self, hidden, mask):
        return masked_mean_pool(hidden, mask, normalize=self.normalize, eps=self.eps)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, eps={self.eps}"
