"""Weighted cross-entropy with per-sample statistics (P55) as Triton kernels: one read of the logits
forward (loss and four statistics per row), one read and one write backward. See
`twinops.reference.classification.weighted_ce_with_stats` for the definition.

Forward, per row i, walking the C logits in BLOCK_C chunks with O(1) state:
    m   = max_k z_k                      (running max)
    s   = sum_k exp(z_k - m)             (rescaled when m grows, as in ``row_max_sumexp``)
    t   = sum_k exp(z_k - m) (z_k - m)   (the entropy's first moment, rescaled with s)
    m_o = max_{k != y} z_k               (best other class, for the margin)
then  ce = log s - (z_y - m),  H = log s - t / s,  max_prob = 1 / s,
      label_prob = exp(z_y - m) / s,  margin = label_prob - exp(m_o - m) / s.
The forward saves (m, s), 8 bytes a row. Weighting and the reduction are O(N) tensor operations on
the host, so autograd gives d/d sample_weight directly; the backward kernel only needs the (N,)
gradient of the per-row cross-entropy, g_i, and writes dz_ik = g_i (p_ik - [k = y_i]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice
from ...reference.classification.weighted_ce_with_stats import REDUCTIONS
from .. import _runtime as rt
from ._cross_entropy import cross_entropy_rows_backward
from ._rowwise import load_label

__all__ = ["weighted_ce_with_stats", "WeightedCEWithStats"]

HAS_TRITON_BACKWARD = True

LAUNCH = rt.RowLaunch(block=4096, warps=8)


@triton.jit
def _weighted_ce_stats_forward_kernel(
    logits_ptr, stride_row, stride_col,  # (N, C) logits; element (i, k) at i*stride_row + k*stride_col
    target_ptr, stride_target,           # (N,) integer labels
    rows_ptr,                            # out (5, N) fp32 contiguous: ce, entropy, max_prob, label_prob, margin
    stats_ptr,                           # out (N, 2) fp32 contiguous: m_i and s_i, for the backward
    N, C, ignore_index,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)

    m = float("-inf")
    m_other = float("-inf")
    s = 0.0
    t = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        x = tl.load(row_ptr + cols * stride_col, mask=cols < C, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Moving the reference point from m to m_new: exp(z - m_new) = alpha exp(z - m) and
        # (z - m_new) = (z - m) + delta, so t becomes alpha (t + delta s). Before the first finite
        # logit s = t = 0 and delta is taken as 0.
        alpha = tl.exp(m - shift)
        delta = tl.where(m == float("-inf"), 0.0, m - shift)
        e = tl.exp(x - shift)
        t = alpha * (t + delta * s) + tl.sum(tl.where(e == 0.0, 0.0, e * (x - shift)), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
        m_other = tl.maximum(m_other, tl.max(tl.where(cols == y, float("-inf"), x), axis=0))

    s = tl.where(s == 0.0, float("nan"), s)  # an all -inf row has no distribution
    log_s = tl.log(s)
    inv_s = 1.0 / s
    z_y = tl.load(row_ptr + safe * stride_col).to(tl.float32) - m
    label_prob = tl.exp(z_y) * inv_s
    bad = tl.where(valid, 0.0, float("nan"))  # NaN for an out-of-range label
    ce = log_s - z_y + bad
    entropy = log_s - t * inv_s + bad
    max_prob = inv_s + bad
    margin = label_prob - tl.exp(m_other - m) * inv_s + bad
    label_prob = label_prob + bad
    tl.store(rows_ptr + row, tl.where(ignored, 0.0, ce))
    tl.store(rows_ptr + N + row, tl.where(ignored, 0.0, entropy))
    tl.store(rows_ptr + 2 * N + row, tl.where(ignored, 0.0, max_prob))
    tl.store(rows_ptr + 3 * N + row, tl.where(ignored, 0.0, label_prob))
    tl.store(rows_ptr + 4 * N + row, tl.where(ignored, 0.0, margin))
    tl.store(stats_ptr + row * 2, m)
    tl.store(stats_ptr + row * 2 + 1, s)


@torch.library.custom_op("twinops::weighted_ce_with_stats_rows", mutates_args=())
def _rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(5, N) fp32 rows: ce, entropy, max_prob, label_prob, margin; and the (N, 2) saved (m, s)."""
    n, c = logits.shape
    rows = torch.empty((5, n), device=logits.device, dtype=torch.float32)
    stats = torch.empty((n, 2), device=logits.device, dtype=torch.float32)
    if n > 0:
        _weighted_ce_stats_forward_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1), target, target.stride(0), rows, stats,
            n, c, ignore_index, **rt.row_launch(c, LAUNCH),
        )
    return rows, stats


@_rows.register_fake
def _(logits, target, ignore_index):
    n = logits.shape[0]
    return logits.new_empty((5, n), dtype=torch.float32), logits.new_empty((n, 2), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_rows, grad_stats):
    logits, target, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = cross_entropy_rows_backward(grad_rows[0], logits, target, stats, ctx.ignore_index)
    return grad, None, None


_rows.register_autograd(_backward, setup_context=_setup_context)


def weighted_ce_with_stats(logits, target, sample_weight, *, ignore_index=-100, reduction="mean"):
    """Weighted cross-entropy and the per-sample ``(entropy, max_prob, label_prob, margin)``, on the GPU.

    Same arguments and semantics as `twinops.reference.classification.weighted_ce_with_stats`;
    returns the logits' dtype for the loss and the statistics. Labels outside [0, C) that are not
    ``ignore_index`` give NaN for their row (and so for a reduced loss) instead of an error, since
    checking them would synchronise the device.
    """
    ignore_index = rt.check_row_loss(logits, target, ignore_index, "none")
    rt.check_float_tensor(sample_weight, "sample_weight", 1, "(N,)")
    if tuple(sample_weight.shape) != (logits.shape[0],):
        raise ValueError(f"sample_weight must have shape ({logits.shape[0]},) to match logits, "
                         f"got {tuple(sample_weight.shape)}")
    check_choice(reduction, "reduction", REDUCTIONS)
    rt.check_device(("logits", logits), ("sample_weight", sample_weight))

    rows, _ = _rows(logits, target, ignore_index)
    active = target != ignore_index
    w = torch.where(active, sample_weight.float(), 0.0)
    weighted = torch.where(active, w * rows[0], 0.0)
    if reduction == "none":
        loss = weighted
    else:
        total = weighted.sum()
        if reduction == "sum":
            loss = total
        else:
            d = active.sum().float() if reduction == "mean" else w.sum()
            nonzero = d != 0
            loss = torch.where(nonzero, total / torch.where(nonzero, d, 1.0), 0.0)
    stats = rows[1:].detach().to(logits.dtype)
    return loss.to(logits.dtype), stats[0], stats[1], stats[2], stats[3]


class WeightedCEWithStats(torch.nn.Module):
    """``nn.Module`` form of `weighted_ce_with_stats`: ``forward(logits, target, sample_weight)``
    returns ``(loss, entropy, max_prob, label_prob, margin)``."""

    def __init__(self, *, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, target, sample_weight):
        return weighted_ce_with_stats(logits, target, sample_weight, ignore_index=self.ignore_index,
                                      reduction=self.reduction)
