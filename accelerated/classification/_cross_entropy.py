"""Backward of row-wise cross-entropy from saved statistics, shared by every loss whose logits
gradient is ``g_i (softmax(z_i) - onehot(y_i))`` with the forward's per-row max ``m_i`` and sum of
exponentials ``s_i`` saved as an (R, 2) fp32 array (``self_training_loss``,
``weighted_ce_with_stats``): one read of the logits and one write of the gradient."""

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from ._rowwise import load_label, store_softmax_grad

LAUNCH = rt.RowLaunch(block=4096, warps=8)


@triton.jit
def cross_entropy_backward_kernel(
    grad_ptr, stride_grad,               # (R,) upstream gradient of each row's cross-entropy term
    logits_ptr, stride_row, stride_col,  # (R, C) logits, as in the forward
    label_ptr, stride_label,             # (R,) labels (targets, or saved pseudo-labels)
    stats_ptr,                           # (R, 2) fp32 contiguous, saved by the forward: m_i, s_i
    grad_logits_ptr, stride_grad_row, stride_grad_col,  # out (R, C) in the logits' dtype
    C, ignore_index,
    BLOCK_C: tl.constexpr,
):
    """One program per row: ``store_softmax_grad``. Rows with an invalid label get NaN."""
    row = tl.program_id(0).to(tl.int64)
    y, ignored, valid, safe = load_label(label_ptr, stride_label, row, C, ignore_index)
    m = tl.load(stats_ptr + row * 2)
    s = tl.load(stats_ptr + row * 2 + 1)
    g = tl.load(grad_ptr + row * stride_grad).to(tl.float32)
    g = tl.where(valid, g, float("nan"))
    store_softmax_grad(logits_ptr + row * stride_row, stride_col, grad_logits_ptr + row * stride_grad_row,
                       stride_grad_col, C, y, m, s, g, ignored, BLOCK_C)


@torch.library.custom_op("twinops::cross_entropy_rows_backward", mutates_args=())
def cross_entropy_rows_backward(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                                stats: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(R, C) gradient of the per-row cross-entropies whose upstream gradient is ``grad`` (R,)."""
    r, c = logits.shape
    grad_logits = torch.empty((r, c), device=logits.device, dtype=logits.dtype)
    if r > 0:
        cross_entropy_backward_kernel[(r,)](
            grad, grad.stride(0), logits, logits.stride(0), logits.stride(1), labels, labels.stride(0), stats,
            grad_logits, grad_logits.stride(0), grad_logits.stride(1), c, ignore_index,
            **rt.row_launch(c, LAUNCH),
        )
    return grad_logits


@cross_entropy_rows_backward.register_fake
def _(grad, logits, labels, stats, ignore_index):
    return logits.new_empty(logits.shape)
