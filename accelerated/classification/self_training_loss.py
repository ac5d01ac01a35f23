"""Self-training objective (P28) as Triton kernels: one read of each logits matrix forward, one read
and one write backward. See `twinops.reference.classification.self_training_loss` for the definition.

One row kernel serves both batches, one program per row walking C in BLOCK_C chunks:
- labelled rows (``PSEUDO=False``): online max m and s = sum_k exp(z_k - m) (``row_max_sumexp``),
  then ce = log s - (z_y - m), 0 on ignored rows;
- unlabelled rows (``PSEUDO=True``): the same statistics and, in the same pass, the pseudo-label
  a = lowest index of the row maximum (``row_max_sumexp_argmax``); the term is
  log s - (z_a - m) = log s, since z_a = m. The label a is stored for the backward.
Both save (m, s), 8 bytes a row (plus the 8-byte pseudo-label). The backward is the shared
``cross_entropy_rows_backward``:
dz_k = g (p_k - [k = label]) with p_k = exp(z_k - m) / s recomputed from the saved statistics,
where g is the upstream gradient of the row's term (lam and 1/n applied by autograd on the host,
where the O(m + n) reduction runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt
from ._cross_entropy import cross_entropy_rows_backward
from ._rowwise import load_label, row_max_sumexp, row_max_sumexp_argmax

__all__ = ["self_training_loss", "SelfTrainingLoss"]

HAS_TRITON_BACKWARD = True

LAUNCH = rt.RowLaunch(block=4096, warps=8)


@triton.jit
def _self_training_forward_kernel(
    logits_ptr, stride_row, stride_col,  # (R, C) logits; element (i, k) at i*stride_row + k*stride_col
    target_ptr, stride_target,           # (R,) integer labels; read only when not PSEUDO
    loss_ptr,                            # out (R,) fp32: the row's cross-entropy (0 if ignored, NaN if label invalid)
    label_ptr,                           # out (R,) int64 pseudo-labels; written only when PSEUDO
    stats_ptr,                           # out (R, 2) fp32 contiguous: m_i and s_i, for the backward
    C, ignore_index,
    PSEUDO: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    if PSEUDO:
        m, s, arg = row_max_sumexp_argmax(row_ptr, stride_col, C, BLOCK_C)
        s = tl.where(s == 0.0, float("nan"), s)  # an all -inf row has no distribution
        loss = tl.log(s)
        tl.store(label_ptr + row, arg)
    else:
        y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)
        m, s = row_max_sumexp(row_ptr, stride_col, C, 1.0, BLOCK_C)
        s = tl.where(s == 0.0, float("nan"), s)
        loss = tl.log(s) - (tl.load(row_ptr + safe * stride_col).to(tl.float32) - m)
        loss = tl.where(ignored, 0.0, tl.where(valid, loss, float("nan")))
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row * 2, m)
    tl.store(stats_ptr + row * 2 + 1, s)


def _launch_forward(logits, target, ignore_index, pseudo):
    r, c = logits.shape
    loss = torch.empty(r, device=logits.device, dtype=torch.float32)
    labels = torch.empty(r if pseudo else 0, device=logits.device, dtype=torch.int64)
    stats = torch.empty((r, 2), device=logits.device, dtype=torch.float32)
    if r > 0:
        _self_training_forward_kernel[(r,)](
            logits, logits.stride(0), logits.stride(1), target, target.stride(0), loss, labels, stats,
            c, ignore_index, PSEUDO=pseudo, **rt.row_launch(c, LAUNCH),
        )
    return loss, labels, stats


@torch.library.custom_op("twinops::self_training_labelled_rows", mutates_args=())
def _labelled_rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m,) fp32 cross-entropy of the labelled rows and their (m, 2) saved statistics."""
    loss, _, stats = _launch_forward(logits, target, ignore_index, pseudo=False)
    return loss, stats


@_labelled_rows.register_fake
def _(logits, target, ignore_index):
    m = logits.shape[0]
    return logits.new_empty(m, dtype=torch.float32), logits.new_empty((m, 2), dtype=torch.float32)


@torch.library.custom_op("twinops::self_training_pseudo_rows", mutates_args=())
def _pseudo_rows(logits_unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n,) fp32 cross-entropy against the row's own argmax, the (n,) int64 pseudo-labels and the
    (n, 2) saved statistics."""
    return _launch_forward(logits_unlabeled, logits_unlabeled, -1, pseudo=True)


@_pseudo_rows.register_fake
def _(logits_unlabeled):
    n = logits_unlabeled.shape[0]
    return (logits_unlabeled.new_empty(n, dtype=torch.float32), logits_unlabeled.new_empty(n, dtype=torch.int64),
            logits_unlabeled.new_empty((n, 2), dtype=torch.float32))


def _labelled_setup(ctx, inputs, output):
    logits, target, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.ignore_index = ignore_index


def _labelled_backward(ctx, grad_loss, grad_stats):
    logits, target, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = cross_entropy_rows_backward(grad_loss, logits, target, stats, ctx.ignore_index)
    return grad, None, None


def _pseudo_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1], output[2])


def _pseudo_backward(ctx, grad_loss, grad_labels, grad_stats):
    logits_unlabeled, labels, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None
    return cross_entropy_rows_backward(grad_loss, logits_unlabeled, labels, stats, -1)


_labelled_rows.register_autograd(_labelled_backward, setup_context=_labelled_setup)
_pseudo_rows.register_autograd(_pseudo_backward, setup_context=_pseudo_setup)


def self_training_loss(logits, target, logits_unlabeled, *, lam=1.0, ignore_index=-100, reduction="mean"):
    """Cross-entropy of the labelled rows plus ``lam`` times the cross-entropy of the unlabelled rows
    against their own argmax, on the GPU.

    Same arguments and semantics as `twinops.reference.classification.self_training_loss`; returns
    the logits' dtype. Labels outside [0, C) that are not ``ignore_index`` give NaN for their row
    (and so for a mean or sum) instead of an error, since checking them would synchronise the device.
    """
    ignore_index = rt.check_row_loss(logits, target, ignore_index, reduction)
    rt.check_logits(logits_unlabeled, "logits_unlabeled")
    if logits_unlabeled.shape[1] != logits.shape[1]:
        raise ValueError(f"logits_unlabeled must have the C = {logits.shape[1]} columns of logits, "
                         f"got shape {tuple(logits_unlabeled.shape)}")
    if logits_unlabeled.dtype != logits.dtype:
        raise TypeError(f"logits_unlabeled must have the dtype of logits ({logits.dtype}), "
                        f"got {logits_unlabeled.dtype}")
    lam = check_real(lam, "lam", low=0.0)
    rt.check_device(("logits", logits), ("logits_unlabeled", logits_unlabeled))

    labelled, _ = _labelled_rows(logits, target, ignore_index)
    pseudo = _pseudo_rows(logits_unlabeled)[0] * lam
    if reduction == "none":
        return torch.cat([labelled, pseudo]).to(logits.dtype)
    if reduction == "sum":
        return (labelled.sum() + pseudo.sum()).to(logits.dtype)
    active = (target != ignore_index).sum().clamp_min(1)
    return (labelled.sum() / active + pseudo.sum() / max(pseudo.shape[0], 1)).to(logits.dtype)


class SelfTrainingLoss(torch.nn.Module):
    """``nn.Module`` form of `self_training_loss`: ``forward(logits, target, logits_unlabeled)``."""

    def __init__(self, *, lam=1.0, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.lam, self.ignore_index, self.reduction = lam, ignore_index, reduction

    def forward(self, logits, target, logits_unlabeled):
        return self_training_loss(logits, target, logits_unlabeled, lam=self.lam,
                                  ignore_index=self.ignore_index, reduction=self.reduction)
