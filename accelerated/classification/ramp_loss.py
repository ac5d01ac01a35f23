"""Ramp loss (P28) as Triton kernels: one read of the scores and labels forward, one read and one
write backward. See `twinops.reference.classification.ramp_loss` for the definition.

Per element i:  y_i = +1 if target_i == 1 else -1,  m_i = kappa * y_i * f_i,
                loss_i = min(1, max(0, 1 - m_i)),  d loss_i / d f_i = -kappa * y_i  if 0 < m_i < 1 else 0.
The scores are cut into BLOCK-wide tiles, one program per tile. For ``reduction="none"`` the forward
writes the (N,) losses; for "sum"/"mean" each program writes its tile's partial sum instead (N / BLOCK
floats, summed on the host in a fixed order, so the result is deterministic) and no per-element
loss is stored. The backward needs nothing saved beyond the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt

__all__ = ["ramp_loss", "RampLoss"]

HAS_TRITON_BACKWARD = True

GPU_BLOCK = 2048
GPU_WARPS = 8


def _block(n: int) -> int:
    cap = 16 if rt.interpreting() else GPU_BLOCK
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


@triton.jit
def _label_sign(target_ptr, offs, stride_target, mask):
    """+1 for label 1, -1 for labels -1 and 0, NaN for anything else (an invalid label)."""
    t = tl.load(target_ptr + offs * stride_target, mask=mask, other=1).to(tl.int64)
    valid = (t == 1) | (t == 0) | (t == -1)
    return tl.where(valid, tl.where(t == 1, 1.0, -1.0), float("nan"))


@triton.jit
def _ramp_forward_kernel(
    scores_ptr, stride_scores,   # (N,) scores f
    target_ptr, stride_target,   # (N,) integer labels in {-1, 0, +1}
    out_ptr,                     # out fp32: (N,) losses if PER_ELEMENT, else one partial sum per program
    N, kappa,
    PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < N
    f = tl.load(scores_ptr + offs * stride_scores, mask=mask, other=0.0).to(tl.float32)
    y = _label_sign(target_ptr, offs, stride_target, mask)
    margin = kappa * y * f
    loss = tl.minimum(tl.maximum(1.0 - margin, 0.0), 1.0)
    loss = tl.where(margin != margin, float("nan"), loss)  # min/max may drop a NaN
    if PER_ELEMENT:
        tl.store(out_ptr + offs, loss, mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))


@triton.jit
def _ramp_backward_kernel(
    grad_ptr, stride_grad,       # upstream gradient: (N,) per element, or a scalar with stride 0
    scores_ptr, stride_scores,
    target_ptr, stride_target,
    grad_scores_ptr,             # out (N,) contiguous, in the scores' dtype
    N, kappa,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < N
    f = tl.load(scores_ptr + offs * stride_scores, mask=mask, other=0.0).to(tl.float32)
    y = _label_sign(target_ptr, offs, stride_target, mask)
    g = tl.load(grad_ptr + offs * stride_grad, mask=mask, other=0.0).to(tl.float32)
    margin = kappa * y * f
    linear = (margin > 0.0) & (margin < 1.0)
    d = tl.where(linear, -kappa * y * g, 0.0)
    d = tl.where(margin != margin, float("nan"), d)
    tl.store(grad_scores_ptr + offs, d.to(grad_scores_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("twinops::ramp_loss", mutates_args=())
def _ramp_forward(scores: torch.Tensor, target: torch.Tensor, kappa: float, per_element: bool) -> torch.Tensor:
    """(N,) fp32 losses when ``per_element``, else their fp32 sum as a 0-d tensor."""
    n = scores.shape[0]
    block = _block(n)
    programs = triton.cdiv(n, block)
    out = torch.empty(n if per_element else programs, device=scores.device, dtype=torch.float32)
    if n > 0:
        _ramp_forward_kernel[(programs,)](
            scores, scores.stride(0), target, target.stride(0), out, n, kappa,
            PER_ELEMENT=per_element, BLOCK=block, num_warps=GPU_WARPS if block >= 1024 else 4,
        )
    return out if per_element else out.sum()


@_ramp_forward.register_fake
def _(scores, target, kappa, per_element):
    return scores.new_empty(scores.shape if per_element else (), dtype=torch.float32)


@torch.library.custom_op("twinops::ramp_loss_backward", mutates_args=())
def _ramp_backward(grad: torch.Tensor, scores: torch.Tensor, target: torch.Tensor, kappa: float) -> torch.Tensor:
    n = scores.shape[0]
    grad_scores = torch.empty(n, device=scores.device, dtype=scores.dtype)
    if n > 0:
        block = _block(n)
        stride_grad = grad.stride(0) if grad.ndim == 1 else 0
        _ramp_backward_kernel[(triton.cdiv(n, block),)](
            grad, stride_grad, scores, scores.stride(0), target, target.stride(0), grad_scores,
            n, kappa, BLOCK=block, num_warps=GPU_WARPS if block >= 1024 else 4,
        )
    return grad_scores


@_ramp_backward.register_fake
def _(grad, scores, target, kappa):
    return scores.new_empty(scores.shape)


def _setup_context(ctx, inputs, output):
    scores, target, kappa, per_element = inputs
    ctx.save_for_backward(scores, target)
    ctx.kappa = kappa


def _backward(ctx, grad):
    scores, target = ctx.saved_tensors
    grad_scores = None
    if ctx.needs_input_grad[0]:
        grad_scores = _ramp_backward(grad, scores, target, ctx.kappa)
    return grad_scores, None, None, None


_ramp_forward.register_autograd(_backward, setup_context=_setup_context)


def ramp_loss(scores, target, *, kappa=1.0, reduction="mean"):
    """Ramp loss $\\min(1, \\max(0, 1 - \\kappa y f))$ of binary scores, on the GPU.

    Same arguments and semantics as `twinops.reference.classification.ramp_loss`; returns the
    scores' dtype. A label outside {-1, 0, +1} gives NaN for its element (and so for a mean or sum)
    instead of an error, since checking it would synchronise the device.
    """
    rt.check_float_tensor(scores, "scores", 1, "(N,)")
    rt.check_int_tensor(target, "target", tuple(scores.shape), what="binary labels in {-1, 0, +1}")
    kappa = check_real(kappa, "kappa", low=0.0, low_open=True)
    rt.check_reduction(reduction)
    rt.check_device(("scores", scores), ("target", target))
    out = _ramp_forward(scores, target, kappa, reduction == "none")
    if reduction == "mean":
        out = out / scores.shape[0] if scores.shape[0] > 0 else out * float("nan")
    return out.to(scores.dtype)


class RampLoss(torch.nn.Module):
    """``nn.Module`` form of `ramp_loss`."""

    def __init__(self, *, kappa=1.0, reduction="mean"):
        super().__init__()
        self.kappa, self.reduction = kappa, reduction

    def forward(self, scores, target):
        return ramp_loss(scores, target, kappa=self.kappa, reduction=self.reduction)
