"""DreamID's identity loss 1 - cos(u, v) (P4) as Triton kernels: one read of both embeddings
forward, one read of both and one write of each requested gradient backward. See
`twinops.reference.classification.id_cosine_loss` for the definition.

Forward, one program per BLOCK_R rows walking D in BLOCK_D chunks: per row the fp32 sums
u·v, |u|^2 and |v|^2, then cos = u·v / max(|u| |v|, eps) and the loss 1 - cos. The three sums are
saved, (B, 3) fp32 = 12 bytes a row, so the backward is a single elementwise pass:

    du = -g_i (v / den - cos u / |u|^2),   dv = -g_i (u / den - cos v / |v|^2)   (|u| |v| > eps)
    du = -g_i v / eps,                     dv = -g_i u / eps                     (inside the clamp)

with den = |u| |v|. A mean or sum adds the (B,) fp32 row losses in a one-program finishing kernel
(fixed order, no atomics). Launch-bound at DreamID's shapes (B x 512): two launches forward, one
backward, against about ten for the eager composition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt
from .._partials import sum_partials

__all__ = ["id_cosine_loss", "IDCosineLoss"]

HAS_TRITON_BACKWARD = True

INTERPRETER_TILE = dict(BLOCK_R=16, BLOCK_D=16)


def _tile(d: int) -> dict:
    """16 x 16 under the interpreter; on the GPU up to 512 features wide, 2048 elements a tile."""
    if rt.interpreting():
        return dict(INTERPRETER_TILE)
    block_d = max(16, min(512, triton.next_power_of_2(d)))
    return dict(BLOCK_R=max(1, 2048 // block_d), BLOCK_D=block_d, num_warps=4)


@triton.jit
def _id_cosine_forward_kernel(
    u_ptr, s_u0, s_u1,       # (B, D) pred embeddings; element (i, k) at i*s_u0 + k*s_u1
    v_ptr, s_v0, s_v1,       # (B, D) source embeddings
    loss_ptr, s_loss,        # out (B,): 1 - cos per row (pred's dtype for "none", fp32 before a reduction)
    stats_ptr,               # out (B, 3) fp32 contiguous: u·v, |u|^2, |v|^2 for the backward
    B, D, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < B
    dot = tl.zeros((BLOCK_R,), tl.float32)
    uu = tl.zeros((BLOCK_R,), tl.float32)
    vv = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        u = tl.load(u_ptr + rows[:, None] * s_u0 + cols[None, :] * s_u1, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * s_v0 + cols[None, :] * s_v1, mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(u * v, axis=1)
        uu += tl.sum(u * u, axis=1)
        vv += tl.sum(v * v, axis=1)
    product = tl.sqrt(uu) * tl.sqrt(vv)
    denominator = tl.where(product <= eps, eps, product)  # NaN rows are not clamped and stay NaN
    loss = 1.0 - dot / denominator
    tl.store(loss_ptr + rows * s_loss, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
    tl.store(stats_ptr + rows * 3, dot, mask=row_mask)
    tl.store(stats_ptr + rows * 3 + 1, uu, mask=row_mask)
    tl.store(stats_ptr + rows * 3 + 2, vv, mask=row_mask)


@triton.jit
def _id_cosine_backward_kernel(
    up_ptr, s_up,            # upstream gradient: (B,) for "none", else a 0-d tensor read with stride 0
    u_ptr, s_u0, s_u1,       # (B, D) pred embeddings
    v_ptr, s_v0, s_v1,       # (B, D) source embeddings
    stats_ptr,               # (B, 3) fp32 from the forward: u·v, |u|^2, |v|^2
    du_ptr, s_du0, s_du1,    # out (B, D) d loss / d pred in pred's dtype (unused unless NEED_U)
    dv_ptr, s_dv0, s_dv1,    # out (B, D) d loss / d source in source's dtype (unused unless NEED_V)
    B, D, eps, divisor,      # divisor: B for the mean, else 1
    NEED_U: tl.constexpr, NEED_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < B
    dot = tl.load(stats_ptr + rows * 3, mask=row_mask, other=0.0)
    uu = tl.load(stats_ptr + rows * 3 + 1, mask=row_mask, other=1.0)
    vv = tl.load(stats_ptr + rows * 3 + 2, mask=row_mask, other=1.0)
    product = tl.sqrt(uu) * tl.sqrt(vv)
    clamped = product <= eps
    denominator = tl.where(clamped, eps, product)
    cos = dot / denominator
    up = tl.load(up_ptr + rows * s_up, mask=row_mask, other=0.0).to(tl.float32) / divisor
    # Per row: d = -up * (a * other - b * self), with (a, b) = (1/den, cos/|self|^2), or (1/eps, 0) clamped.
    a = tl.where(clamped, 1.0 / eps, 1.0 / denominator)[:, None]
    b_u = tl.where(clamped, 0.0, cos / uu)[:, None]
    b_v = tl.where(clamped, 0.0, cos / vv)[:, None]
    up = up[:, None]
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        u = tl.load(u_ptr + rows[:, None] * s_u0 + cols[None, :] * s_u1, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * s_v0 + cols[None, :] * s_v1, mask=mask, other=0.0).to(tl.float32)
        if NEED_U:
            du = -up * (a * v - b_u * u)
            tl.store(du_ptr + rows[:, None] * s_du0 + cols[None, :] * s_du1,
                     du.to(du_ptr.dtype.element_ty), mask=mask)
        if NEED_V:
            dv = -up * (a * u - b_v * v)
            tl.store(dv_ptr + rows[:, None] * s_dv0 + cols[None, :] * s_dv1,
                     dv.to(dv_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("twinops::id_cosine_loss", mutates_args=())
def _id_cosine_forward(
    pred: torch.Tensor, source: torch.Tensor, eps: float, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    b, d = pred.shape
    tile = _tile(d)
    rows = torch.empty(b, device=pred.device, dtype=pred.dtype if reduction == "none" else torch.float32)
    stats = torch.empty((b, 3), device=pred.device, dtype=torch.float32)
    _id_cosine_forward_kernel[(triton.cdiv(b, tile["BLOCK_R"]),)](
        pred, pred.stride(0), pred.stride(1), source, source.stride(0), source.stride(1),
        rows, rows.stride(0), stats, b, d, eps, **tile,
    )
    if reduction == "none":
        return rows, stats
    out = torch.empty((), device=pred.device, dtype=pred.dtype)
    return sum_partials(rows.view(1, b), float(b) if reduction == "mean" else 1.0, out), stats


@_id_cosine_forward.register_fake
def _(pred, source, eps, reduction):
    b = pred.shape[0]
    return pred.new_empty((b,) if reduction == "none" else ()), pred.new_empty((b, 3), dtype=torch.float32)


@torch.library.custom_op("twinops::id_cosine_loss_backward", mutates_args=())
def _id_cosine_backward(
    grad: torch.Tensor, pred: torch.Tensor, source: torch.Tensor, stats: torch.Tensor, eps: float,
    reduction: str, need_pred: bool, need_source: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, d = pred.shape
    du = torch.empty((b, d) if need_pred else (0, 0), device=pred.device, dtype=pred.dtype)
    dv = torch.empty((b, d) if need_source else (0, 0), device=pred.device, dtype=source.dtype)
    tile = _tile(d)
    _id_cosine_backward_kernel[(triton.cdiv(b, tile["BLOCK_R"]),)](
        grad, grad.stride(0) if reduction == "none" else 0,
        pred, pred.stride(0), pred.stride(1), source, source.stride(0), source.stride(1), stats,
        du, du.stride(0), du.stride(1), dv, dv.stride(0), dv.stride(1),
        b, d, eps, float(b) if reduction == "mean" else 1.0, NEED_U=need_pred, NEED_V=need_source, **tile,
    )
    return du, dv


@_id_cosine_backward.register_fake
def _(grad, pred, source, stats, eps, reduction, need_pred, need_source):
    return (pred.new_empty(pred.shape if need_pred else (0, 0)),
            source.new_empty(source.shape if need_source else (0, 0)))


def _setup_context(ctx, inputs, output):
    pred, source, eps, reduction = inputs
    ctx.save_for_backward(pred, source, output[1])
    ctx.eps, ctx.reduction = eps, reduction


def _backward(ctx, grad, grad_stats):
    need_pred, need_source = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_pred or need_source):
        return None, None, None, None
    pred, source, stats = ctx.saved_tensors
    du, dv = _id_cosine_backward(grad, pred, source, stats, ctx.eps, ctx.reduction, need_pred, need_source)
    return (du if need_pred else None), (dv if need_source else None), None, None


_id_cosine_forward.register_autograd(_backward, setup_context=_setup_context)


def id_cosine_loss(pred, source, *, eps=1e-8, reduction="mean"):
    """DreamID's identity loss 1 - cos(pred, source) per row, reduced, on the GPU.

    Same arguments and semantics as `twinops.reference.classification.id_cosine_loss`; the result
    has ``pred``'s dtype, each gradient its input's. Either embedding may require grad.
    """
    rt.check_float_tensor(pred, "pred", 2, "(B, D)")
    if pred.shape[0] == 0 or pred.shape[1] == 0:
        raise ValueError(f"pred must have at least one row and one feature, got shape {tuple(pred.shape)}")
    rt.check_float_tensor(source, "source", 2, "(B, D)")
    if source.shape != pred.shape:
        raise ValueError(f"source must have the shape of pred {tuple(pred.shape)}, got {tuple(source.shape)}")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    rt.check_reduction(reduction)
    rt.check_device(("pred", pred), ("source", source))
    return _id_cosine_forward(pred, source, eps, reduction)[0]


class IDCosineLoss(torch.nn.Module):
    """``nn.Module`` form of `id_cosine_loss`: ``loss(pred, source)``."""

    def __init__(self, *, eps=1e-8, reduction="mean"):
        super().__init__()
        self.eps = check_real(eps, "eps", low=0.0, low_open=True)
        self.reduction = rt.check_reduction(reduction)

    def forward(self, pred, source):
        return id_cosine_loss(pred, source, eps=self.eps, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}"
