"""HPM (P30) as Triton kernels: the relative (pairwise ranking) loss of the patch-loss predictor and
the easy-to-hard mask. See `twinops.reference.metric.hpm` for the definitions.

Relative loss. The eager form broadcasts three (B, M, M) tensors; here one program per image walks
the M x M pairs in (BLOCK, BLOCK) tiles held in registers:

    forward, image b:   loss_b = sum_{i,j: t_i != t_j} phi(s_ij (p_j - p_i)),   count_b = #{i, j: t_i != t_j}
    backward, rows i:   dp_i = 2 g_b sum_{j: t_j != t_i} s_ij sigma(x) sigma(-x) / (sigma(x) + eps),
                        x = s_ij (p_j - p_i)

with phi(x) = -log(sigma(x) + eps) and s_ij = sign(t_j - t_i). Both orders of a pair give the same
term, hence the factor 2 and no scatter: each row's gradient is a sum over its own pairs. Extra
memory: two numbers per image. The batch reduction (sum / count) runs on the (B,) results.

Easy-to-hard mask. Two passes of rank counting, each program owning BLOCK patches of one image and
comparing them with every patch of the image (L ~ 200: an L x L comparison is cheaper than a sort):
pass 1 marks the n_hard hardest patches (pred descending, index ascending, NaN first); pass 2 keeps
the n_keep non-hard patches with the smallest (noise, index), NaN last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_int, check_real
from .. import _runtime as rt
from .._triton_math import log1p

__all__ = ["hpm_relative_loss", "HPMRelativeLoss", "easy_to_hard_mask"]

HAS_TRITON_BACKWARD = True


def _block(n: int) -> int:
    """Tile width: 16 under the interpreter (small test shapes cross tiles), up to 64 on the GPU."""
    cap = 16 if rt.interpreting() else 64
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _pair_tile(pred_ptr, stride_pm, target_ptr, stride_tm, base_p, base_t, rows, cols, M):
    """x = s_ij (p_j - p_i) and the non-tied mask for a (rows, cols) tile of one image."""
    row_ok = rows < M
    col_ok = cols < M
    p_i = tl.load(pred_ptr + base_p + rows * stride_pm, mask=row_ok, other=0.0).to(tl.float32)
    t_i = tl.load(target_ptr + base_t + rows * stride_tm, mask=row_ok, other=0.0).to(tl.float32)
    p_j = tl.load(pred_ptr + base_p + cols * stride_pm, mask=col_ok, other=0.0).to(tl.float32)
    t_j = tl.load(target_ptr + base_t + cols * stride_tm, mask=col_ok, other=0.0).to(tl.float32)
    inside = row_ok[:, None] & col_ok[None, :]
    positive = (t_j[None, :] > t_i[:, None]) & inside
    negative = (t_j[None, :] < t_i[:, None]) & inside
    valid = positive | negative
    z = p_j[None, :] - p_i[:, None]
    x = tl.where(positive, z, -z)
    return tl.where(valid, x, 0.0), valid


@triton.jit
def _relative_forward_kernel(
    pred_ptr, stride_pb, stride_pm,      # (B, M) predicted patch losses; (b, i) at b*stride_pb + i*stride_pm
    target_ptr, stride_tb, stride_tm,    # (B, M) measured patch losses (no gradient)
    loss_ptr,                            # out (B,) fp32: sum over the image's non-tied ordered pairs of phi(x)
    count_ptr,                           # out (B,) int64: number of non-tied ordered pairs
    M, eps,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    base_p = b * stride_pb
    base_t = b * stride_tb
    total = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    count = tl.zeros((BLOCK, BLOCK), dtype=tl.int64)
    for start_i in range(0, M, BLOCK):
        rows = start_i + tl.arange(0, BLOCK).to(tl.int64)
        for start_j in range(0, M, BLOCK):
            cols = start_j + tl.arange(0, BLOCK).to(tl.int64)
            x, valid = _pair_tile(pred_ptr, stride_pm, target_ptr, stride_tm, base_p, base_t, rows, cols, M)
            # eps = 0: softplus(-x) = max(-x, 0) + log(1 + exp(-|x|)), exact far out in both tails
            softplus = tl.maximum(-x, 0.0) + log1p(tl.exp(-tl.abs(x)))
            phi = tl.where(eps == 0.0, softplus, -tl.log(_sigmoid(x) + eps))
            total += tl.where(valid, phi, 0.0)
            count += valid.to(tl.int64)
    tl.store(loss_ptr + b, tl.sum(tl.sum(total, axis=1), axis=0))
    tl.store(count_ptr + b, tl.sum(tl.sum(count, axis=1), axis=0))


@triton.jit
def _relative_backward_kernel(
    grad_ptr, stride_g,                  # (B,) upstream gradient of the per-image sums (already / count for "mean")
    pred_ptr, stride_pb, stride_pm,
    target_ptr, stride_tb, stride_tm,
    grad_pred_ptr, stride_db, stride_dm,  # out (B, M) in pred's dtype
    M, eps,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    base_p = b * stride_pb
    base_t = b * stride_tb
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start_j in range(0, M, BLOCK):
        cols = start_j + tl.arange(0, BLOCK).to(tl.int64)
        x, valid = _pair_tile(pred_ptr, stride_pm, target_ptr, stride_tm, base_p, base_t, rows, cols, M)
        sig = _sigmoid(x)
        sig_neg = _sigmoid(-x)
        # d l_ij / d p_i = -s_ij phi'(x), phi'(x) = -sigma(x) sigma(-x) / (sigma(x) + eps)
        # (at eps = 0 this is sigma(-x); written so, sigma(x) may underflow)
        term = tl.where(eps == 0.0, sig_neg, sig * sig_neg / (sig + eps))
        t_i = tl.load(target_ptr + base_t + rows * stride_tm, mask=rows < M, other=0.0).to(tl.float32)
        t_j = tl.load(target_ptr + base_t + cols * stride_tm, mask=cols < M, other=0.0).to(tl.float32)
        s = tl.where(t_j[None, :] > t_i[:, None], 1.0, -1.0)
        acc += tl.sum(tl.where(valid, s * term, 0.0), axis=1)
    g = tl.load(grad_ptr + b * stride_g).to(tl.float32)
    out = 2.0 * g * acc
    tl.store(grad_pred_ptr + b * stride_db + rows * stride_dm, out.to(grad_pred_ptr.dtype.element_ty), mask=rows < M)


@torch.library.custom_op("twinops::hpm_relative_loss_images", mutates_args=())
def _relative_images(pred: torch.Tensor, target: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, m = pred.shape
    loss = torch.empty(b, device=pred.device, dtype=torch.float32)
    count = torch.empty(b, device=pred.device, dtype=torch.int64)
    if b > 0:
        _relative_forward_kernel[(b,)](
            pred, pred.stride(0), pred.stride(1), target, target.stride(0), target.stride(1),
            loss, count, m, eps, BLOCK=_block(m),
        )
    return loss, count


@_relative_images.register_fake
def _(pred, target, eps):
    b = pred.shape[0]
    return pred.new_empty(b, dtype=torch.float32), pred.new_empty(b, dtype=torch.int64)


@torch.library.custom_op("twinops::hpm_relative_loss_images_backward", mutates_args=())
def _relative_images_backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    b, m = pred.shape
    grad_pred = torch.empty((b, m), device=pred.device, dtype=pred.dtype)
    if b > 0 and m > 0:
        block = _block(m)
        _relative_backward_kernel[(b, triton.cdiv(m, block))](
            grad, grad.stride(0), pred, pred.stride(0), pred.stride(1), target, target.stride(0), target.stride(1),
            grad_pred, grad_pred.stride(0), grad_pred.stride(1), m, eps, BLOCK=block,
        )
    return grad_pred


@_relative_images_backward.register_fake
def _(grad, pred, target, eps):
    return pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    pred, target, eps = inputs
    ctx.save_for_backward(pred, target)
    ctx.eps = eps


def _backward(ctx, grad_loss, grad_count):
    pred, target = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _relative_images_backward(grad_loss, pred, target, ctx.eps)
    return grad, None, None


_relative_images.register_autograd(_backward, setup_context=_setup_context)


def hpm_relative_loss(pred, target, *, eps=1e-6, reduction="mean"):
    """HPM's pairwise ranking loss of predicted patch losses against measured ones, on the GPU.

    Same arguments and semantics as `twinops.reference.metric.hpm.hpm_relative_loss`; returns
    ``pred``'s dtype. ``target`` is never differentiated.
    """
    rt.check_float_tensor(pred, "pred", 2, "(B, M)")
    rt.check_float_tensor(target, "target", 2, "(B, M)")
    if target.shape != pred.shape:
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    eps = check_real(eps, "eps", low=0.0)
    rt.check_reduction(reduction)
    rt.check_device(("pred", pred), ("target", target))
    loss, count = _relative_images(pred, target.detach(), eps)
    if reduction == "none":
        return loss.to(pred.dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(pred.dtype)
    pairs = count.sum()
    return torch.where(pairs > 0, total / pairs.clamp(min=1), torch.zeros_like(total)).to(pred.dtype)


class HPMRelativeLoss(torch.nn.Module):
    """``nn.Module`` form of `hpm_relative_loss`: ``forward(pred, target)``."""

    def __init__(self, *, eps=1e-6, reduction="mean"):
        super().__init__()
        self.eps, self.reduction = eps, reduction

    def forward(self, pred, target):
        return hpm_relative_loss(pred, target, eps=self.eps, reduction=self.reduction)


# ----------------------------------------------------------------------------- easy-to-hard mask


@triton.jit
def _hard_kernel(
    pred_ptr, stride_pb, stride_pl,      # (B, L) predicted patch losses
    hard_ptr,                            # out (B, L) int8 contiguous: 1 for the n_hard hardest patches
    L, n_hard,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    q_i = tl.load(pred_ptr + b * stride_pb + rows * stride_pl, mask=rows < L, other=0.0).to(tl.float32)
    nan_i = q_i != q_i
    rank = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, L, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        q_j = tl.load(pred_ptr + b * stride_pb + cols * stride_pl, mask=cols < L, other=0.0).to(tl.float32)
        nan_j = q_j != q_j
        earlier = cols[None, :] < rows[:, None]
        # j is harder than i: larger prediction, or equal and a lower index; NaN above every number.
        harder = (q_j[None, :] > q_i[:, None]) | ((q_j[None, :] == q_i[:, None]) & earlier)
        harder = tl.where(nan_i[:, None], nan_j[None, :] & earlier, harder | nan_j[None, :])
        harder = harder & (cols < L)[None, :]
        rank += tl.sum(harder.to(tl.int32), axis=1)
    tl.store(hard_ptr + b * L + rows, (rank < n_hard).to(tl.int8), mask=rows < L)


@triton.jit
def _keep_kernel(
    noise_ptr, stride_nb, stride_nl,     # (B, L) random keys
    hard_ptr,                            # (B, L) int8 contiguous, from _hard_kernel
    mask_ptr, stride_mb, stride_ml,      # out (B, L) bool (as uint8): 1 = removed
    L, n_keep,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    u_i = tl.load(noise_ptr + b * stride_nb + rows * stride_nl, mask=rows < L, other=0.0).to(tl.float32)
    hard_i = tl.load(hard_ptr + b * L + rows, mask=rows < L, other=1) != 0
    nan_i = u_i != u_i
    rank = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, L, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        u_j = tl.load(noise_ptr + b * stride_nb + cols * stride_nl, mask=cols < L, other=0.0).to(tl.float32)
        hard_j = tl.load(hard_ptr + b * L + cols, mask=cols < L, other=1) != 0
        nan_j = u_j != u_j
        earlier = cols[None, :] < rows[:, None]
        # j comes before i: smaller key, or equal and a lower index; NaN after every number.
        before = (u_j[None, :] < u_i[:, None]) | ((u_j[None, :] == u_i[:, None]) & earlier)
        before = tl.where(nan_i[:, None], (~nan_j[None, :]) | earlier, before & ~nan_j[None, :])
        before = before & ~hard_j[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    removed = hard_i | (rank >= n_keep)
    tl.store(mask_ptr + b * stride_mb + rows * stride_ml, removed.to(tl.uint8), mask=rows < L)


@torch.library.custom_op("twinops::easy_to_hard_mask", mutates_args=())
def _easy_to_hard(pred: torch.Tensor, noise: torch.Tensor, n_keep: int, n_hard: int) -> torch.Tensor:
    b, length = pred.shape
    mask = torch.empty((b, length), device=pred.device, dtype=torch.bool)
    if b > 0 and length > 0:
        hard = torch.empty((b, length), device=pred.device, dtype=torch.int8)
        block = _block(length)
        grid = (b, triton.cdiv(length, block))
        _hard_kernel[grid](pred, pred.stride(0), pred.stride(1), hard, length, n_hard, BLOCK=block)
        out = mask.view(torch.uint8)
        _keep_kernel[grid](noise, noise.stride(0), noise.stride(1), hard, out, out.stride(0), out.stride(1),
                           length, n_keep, BLOCK=block)
    return mask


@_easy_to_hard.register_fake
def _(pred, noise, n_keep, n_hard):
    return pred.new_empty(pred.shape, dtype=torch.bool)


def easy_to_hard_mask(pred, noise, *, epoch, total_epochs, mask_ratio=0.75):
    """HPM's easy-to-hard mask, (B, L) bool with True where a patch is removed, on the GPU.

    Same arguments and semantics as `twinops.reference.metric.hpm.easy_to_hard_mask` (pass
    ``noise = torch.rand(B, L)`` for the authors' random fill). No gradient.
    """
    rt.check_float_tensor(pred, "pred", 2, "(B, L)")
    rt.check_float_tensor(noise, "noise", 2, "(B, L)")
    if noise.shape != pred.shape:
        raise ValueError(f"noise must have the shape of pred {tuple(pred.shape)}, got {tuple(noise.shape)}")
    total_epochs = check_int(total_epochs, "total_epochs")
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    epoch = check_int(epoch, "epoch")
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must lie in [0, total_epochs) = [0, {total_epochs}), got {epoch}")
    mask_ratio = check_real(mask_ratio, "mask_ratio", low=0.0, high=1.0)
    rt.check_device(("pred", pred), ("noise", noise))
    length = pred.shape[1]
    n_keep = int(length * (1 - mask_ratio))
    n_hard = max(int((length - n_keep) * (float((epoch + 1) / total_epochs) * 0.5)), 0)
    return _easy_to_hard(pred.detach(), noise.detach(), n_keep, n_hard)
