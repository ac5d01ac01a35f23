"""Mean-squared-error distillation losses as Triton row kernels: logit MSE (P45) and softmax MSE
against the ground truth and the teacher (P60). See `twinops.reference.classification.distillation`
for the definitions. The teacher's logits are a constant: they are detached and never get a gradient.

Logit MSE, per row i of the student s and teacher t (K classes):
  forward   loss_i = sum_k (s_ik - t_ik)^2 / K          one read of s_i and t_i
  backward  ds_ik = g_i * 2 (s_ik - t_ik) / K           one read of s_i and t_i, one write
Softmax MSE, per row i of the student z, teacher t, label y (C classes), p = softmax(z_i), q = softmax(t_i):
  forward   pass 1: max and sum-exp of z_i and of t_i   (``row_max_sumexp``, one read of each)
            pass 2: loss_i = (alpha sum_k (p_k - [k = y])^2 + (1 - alpha) sum_k (p_k - q_k)^2) / C
                    and <p, r> with r = p - alpha onehot(y) - (1 - alpha) q    (one read of each)
  backward  dz_ik = g_i * 2/C * p_k (r_k - <p, r>)      (J r with J = diag(p) - p p^T; one read of
                                                        each, one write)
The forward saves (m_z, s_z, m_t, s_t, <p, r>), 20 bytes a row; the squared differences are formed
directly (never as sum p^2 - 2 sum p q + sum q^2, which cancels when the student matches its teacher).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt
from ._rowwise import load_label, row_max_sumexp

__all__ = ["logit_mse_distillation", "softmax_mse_distillation", "LogitMSEDistillation", "SoftmaxMSEDistillation"]

HAS_TRITON_BACKWARD = True

# Chunk width x warps per row program, as comp_sum_loss (not swept separately).
LAUNCH = rt.RowLaunch(block=4096, warps=8)


# --- P45: logit MSE ---------------------------------------------------------------------------------


@triton.jit
def _logit_mse_forward_kernel(
    student_ptr, stride_s_row, stride_s_col,   # (N, K) student logits; (i, k) at i*stride_s_row + k*stride_s_col
    teacher_ptr, stride_t_row, stride_t_col,   # (N, K) teacher logits
    loss_ptr,                                  # out (N,) fp32: the row's mean squared difference
    K,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = 0.0
    for start in range(0, K, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < K
        s = tl.load(student_ptr + row * stride_s_row + cols * stride_s_col, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + row * stride_t_row + cols * stride_t_col, mask=mask, other=0.0).to(tl.float32)
        diff = s - t
        acc += tl.sum(diff * diff, axis=0)
    tl.store(loss_ptr + row, acc / K)


@triton.jit
def _logit_mse_backward_kernel(
    grad_loss_ptr, stride_grad,                # (N,) upstream gradient of the per-row losses (stride 0 if broadcast)
    student_ptr, stride_s_row, stride_s_col,
    teacher_ptr, stride_t_row, stride_t_col,
    grad_ptr, stride_g_row, stride_g_col,      # out (N, K) in the student's dtype
    K,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(grad_loss_ptr + row * stride_grad).to(tl.float32) * (2.0 / K)
    for start in range(0, K, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < K
        s = tl.load(student_ptr + row * stride_s_row + cols * stride_s_col, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + row * stride_t_row + cols * stride_t_col, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_ptr + row * stride_g_row + cols * stride_g_col,
                 (factor * (s - t)).to(grad_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("twinops::logit_mse_distillation_rows", mutates_args=())
def _logit_mse_rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    n, k = student.shape
    loss = torch.empty(n, device=student.device, dtype=torch.float32)
    if n > 0:
        _logit_mse_forward_kernel[(n,)](
            student, student.stride(0), student.stride(1), teacher, teacher.stride(0), teacher.stride(1),
            loss, k, **rt.row_launch(k, LAUNCH),
        )
    return loss


@_logit_mse_rows.register_fake
def _(student, teacher):
    return student.new_empty(student.shape[0], dtype=torch.float32)


@torch.library.custom_op("twinops::logit_mse_distillation_rows_backward", mutates_args=())
def _logit_mse_rows_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    n, k = student.shape
    grad = torch.empty((n, k), device=student.device, dtype=student.dtype)
    if n > 0:
        _logit_mse_backward_kernel[(n,)](
            grad_loss, grad_loss.stride(0), student, student.stride(0), student.stride(1),
            teacher, teacher.stride(0), teacher.stride(1), grad, grad.stride(0), grad.stride(1), k,
            **rt.row_launch(k, LAUNCH),
        )
    return grad


@_logit_mse_rows_backward.register_fake
def _(grad_loss, student, teacher):
    return student.new_empty(student.shape)


def _logit_mse_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _logit_mse_backward(ctx, grad_loss):
    student, teacher = ctx.saved_tensors
    grad = _logit_mse_rows_backward(grad_loss, student, teacher) if ctx.needs_input_grad[0] else None
    return grad, None


_logit_mse_rows.register_autograd(_logit_mse_backward, setup_context=_logit_mse_setup_context)


def _pair(student, teacher, student_name: str):
    rt.check_float_tensor(student, student_name, 2, "(N, C)")
    rt.check_float_tensor(teacher, "teacher_logits", 2, "(N, C)")
    if student.shape[1] < 1:
        raise ValueError(f"{student_name} must have at least one class (C >= 1), got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits must have the shape of {student_name} {tuple(student.shape)}, "
                         f"got {tuple(teacher.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher_logits must have the dtype of {student_name} ({student.dtype}), got {teacher.dtype}")


def logit_mse_distillation(student_logits, teacher_logits, *, reduction="mean"):
    """Logit-matching distillation loss of N2N (P45) on the GPU: per-row mean squared difference
    between student and teacher logits; ``"mean"`` is ``F.mse_loss(student, teacher.detach())``.

    Same arguments and semantics as `twinops.reference.classification.distillation.logit_mse_distillation`;
    returns the student's dtype. ``teacher_logits`` is detached.
    """
    _pair(student_logits, teacher_logits, "student_logits")
    rt.check_reduction(reduction)
    rt.check_device(("student_logits", student_logits), ("teacher_logits", teacher_logits))
    loss = _logit_mse_rows(student_logits, teacher_logits.detach())
    return rt.reduce_rows(loss, torch.ones_like(loss), reduction, student_logits.dtype)


class LogitMSEDistillation(torch.nn.Module):
    """``nn.Module`` form of `logit_mse_distillation`: ``loss(student_logits, teacher_logits)``."""

    def __init__(self, *, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits):
        return logit_mse_distillation(student_logits, teacher_logits, reduction=self.reduction)


# --- P60: softmax MSE against ground truth and teacher ------------------------------------------------


@triton.jit
def _softmax_mse_forward_kernel(
    logits_ptr, stride_row, stride_col,        # (N, C) student logits z
    teacher_ptr, stride_t_row, stride_t_col,   # (N, C) teacher logits t
    target_ptr, stride_target,                 # (N,) integer labels
    loss_ptr,                                  # out (N,) fp32: loss_i; 0 if ignored; NaN if label invalid
    row_weight_ptr,                            # out (N,) fp32: 1, or 0 if ignored (the mean's denominator)
    stats_ptr,                                 # out (N, 5) fp32 contiguous: m_z, s_z, m_t, s_t, <p, r>
    C, alpha, ignore_index,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_row
    t_row = teacher_ptr + row * stride_t_row
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)

    m_z, s_z = row_max_sumexp(z_row, stride_col, C, 1.0, BLOCK_C)
    m_t, s_t = row_max_sumexp(t_row, stride_t_col, C, 1.0, BLOCK_C)
    inv_sz = 1.0 / s_z
    inv_st = 1.0 / s_t

    sq_truth = 0.0   # sum_k (p_k - [k = y])^2
    sq_teacher = 0.0  # sum_k (p_k - q_k)^2
    p_dot_r = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < C
        z = tl.load(z_row + cols * stride_col, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols * stride_t_col, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - m_z) * inv_sz
        q = tl.exp(t - m_t) * inv_st
        onehot = tl.where(cols == safe, 1.0, 0.0)
        r = p - alpha * onehot - (1.0 - alpha) * q
        sq_truth += tl.sum(tl.where(mask, (p - onehot) * (p - onehot), 0.0), axis=0)
        sq_teacher += tl.sum(tl.where(mask, (p - q) * (p - q), 0.0), axis=0)
        p_dot_r += tl.sum(tl.where(mask, p * r, 0.0), axis=0)

    loss = (alpha * sq_truth + (1.0 - alpha) * sq_teacher) / C
    loss = tl.where(valid, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(row_weight_ptr + row, tl.where(ignored, 0.0, 1.0))
    tl.store(stats_ptr + row * 5, m_z)
    tl.store(stats_ptr + row * 5 + 1, s_z)
    tl.store(stats_ptr + row * 5 + 2, m_t)
    tl.store(stats_ptr + row * 5 + 3, s_t)
    tl.store(stats_ptr + row * 5 + 4, p_dot_r)


@triton.jit
def _softmax_mse_backward_kernel(
    grad_loss_ptr, stride_grad,                # (N,) upstream gradient of the per-row losses (stride 0 if broadcast)
    logits_ptr, stride_row, stride_col,        # (N, C) student logits, as in the forward
    teacher_ptr, stride_t_row, stride_t_col,   # (N, C) teacher logits
    target_ptr, stride_target,
    stats_ptr,                                 # (N, 5) fp32 saved by the forward
    grad_ptr, stride_g_row, stride_g_col,      # out (N, C) in the logits' dtype
    C, alpha, ignore_index,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_row
    t_row = teacher_ptr + row * stride_t_row
    y, ignored, valid, safe = load_label(target_ptr, stride_target, row, C, ignore_index)

    m_z = tl.load(stats_ptr + row * 5)
    inv_sz = 1.0 / tl.load(stats_ptr + row * 5 + 1)
    m_t = tl.load(stats_ptr + row * 5 + 2)
    inv_st = 1.0 / tl.load(stats_ptr + row * 5 + 3)
    p_dot_r = tl.load(stats_ptr + row * 5 + 4)
    factor = tl.load(grad_loss_ptr + row * stride_grad).to(tl.float32) * (2.0 / C)
    factor = tl.where(valid, factor, float("nan"))

    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < C
        z = tl.load(z_row + cols * stride_col, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols * stride_t_col, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - m_z) * inv_sz
        q = tl.exp(t - m_t) * inv_st
        r = p - alpha * tl.where(cols == safe, 1.0, 0.0) - (1.0 - alpha) * q
        g = tl.where(ignored, 0.0, factor * p * (r - p_dot_r))
        tl.store(grad_ptr + row * stride_g_row + cols * stride_g_col, g.to(grad_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("twinops::softmax_mse_distillation_rows", mutates_args=())
def _softmax_mse_rows(
    logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor, alpha: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    row_weight = torch.empty_like(loss)
    stats = torch.empty((n, 5), device=logits.device, dtype=torch.float32)
    if n > 0:
        _softmax_mse_forward_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1), teacher, teacher.stride(0), teacher.stride(1),
            target, target.stride(0), loss, row_weight, stats, c, alpha, ignore_index,
            **rt.row_launch(c, LAUNCH),
        )
    return loss, row_weight, stats


@_softmax_mse_rows.register_fake
def _(logits, target, teacher, alpha, ignore_index):
    n = logits.shape[0]
    out = logits.new_empty(n, dtype=torch.float32)
    return out, torch.empty_like(out), logits.new_empty((n, 5), dtype=torch.float32)


@torch.library.custom_op("twinops::softmax_mse_distillation_rows_backward", mutates_args=())
def _softmax_mse_rows_backward(
    grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor,
    stats: torch.Tensor, alpha: float, ignore_index: int,
) -> torch.Tensor:
    n, c = logits.shape
    grad = torch.empty((n, c), device=logits.device, dtype=logits.dtype)
    if n > 0:
        _softmax_mse_backward_kernel[(n,)](
            grad_loss, grad_loss.stride(0), logits, logits.stride(0), logits.stride(1),
            teacher, teacher.stride(0), teacher.stride(1), target, target.stride(0), stats,
            grad, grad.stride(0), grad.stride(1), c, alpha, ignore_index, **rt.row_launch(c, LAUNCH),
        )
    return grad


@_softmax_mse_rows_backward.register_fake
def _(grad_loss, logits, target, teacher, stats, alpha, ignore_index):
    return logits.new_empty(logits.shape)


def _softmax_mse_setup_context(ctx, inputs, output):
    logits, target, teacher, alpha, ignore_index = inputs
    ctx.save_for_backward(logits, target, teacher, output[2])
    ctx.alpha, ctx.ignore_index = alpha, ignore_index


def _softmax_mse_backward(ctx, grad_loss, grad_row_weight, grad_stats):
    logits, target, teacher, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _softmax_mse_rows_backward(grad_loss, logits, target, teacher, stats, ctx.alpha, ctx.ignore_index)
    return grad, None, None, None, None


_softmax_mse_rows.register_autograd(_softmax_mse_backward, setup_context=_softmax_mse_setup_context)


def softmax_mse_distillation(logits, target, teacher_logits, *, alpha=0.6, ignore_index=-100, reduction="mean"):
    """Self-distillation loss with ground-truth targets (P60) on the GPU:
    ``alpha`` MSE(softmax(logits), onehot(target)) + (1 - ``alpha``) MSE(softmax(logits), softmax(teacher)).

    Same arguments and semantics as `twinops.reference.classification.distillation.softmax_mse_distillation`;
    returns the logits' dtype. ``teacher_logits`` is detached. Labels outside [0, C) that are not
    ``ignore_index`` give NaN for their row instead of an error, since checking them would
    synchronise the device.
    """
    ignore_index = rt.check_row_loss(logits, target, ignore_index, reduction)
    _pair(logits, teacher_logits, "logits")
    rt.check_device(("logits", logits), ("teacher_logits", teacher_logits))
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    loss, row_weight, _ = _softmax_mse_rows(logits, target, teacher_logits.detach(), alpha, ignore_index)
    return rt.reduce_rows(loss, row_weight, reduction, logits.dtype)


class SoftmaxMSEDistillation(torch.nn.Module):
    """``nn.Module`` form of `softmax_mse_distillation`: ``loss(logits, target, teacher_logits)``."""

    def __init__(self, *, alpha=0.6, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.alpha, self.ignore_index, self.reduction = alpha, ignore_index, reduction

    def forward(self, logits, target, teacher_logits):
        return softmax_mse_distillation(logits, target, teacher_logits, alpha=self.alpha,
                                        ignore_index=self.ignore_index, reduction=self.reduction)
