"""AnyLoss (P6) as Triton kernels: one read of the probabilities and targets forward, one read of
each and one write of the gradient backward. See `twinops.reference.classification.anyloss` for the
definition.

Every column k of the (N, K) probabilities is one binary task (a 1-D input is one column).
Forward, two deterministic stages (no atomics, the same bits on every run):
  1. ``_partials_kernel``: program (b, j) takes rows [b*BLOCK_N, (b+1)*BLOCK_N) of columns
     [j*BLOCK_K, (j+1)*BLOCK_K), computes a = sigmoid(L (p - 1/2)) and 1 - a = sigmoid(-L (p - 1/2))
     in fp32 and writes its block sums TP = sum y a, FP = sum (1-y) a, TN = sum (1-y)(1-a) and
     Y1 = sum y to a (4, blocks, K) fp32 buffer.
  2. ``_combine_kernel``: one program per column adds the block sums in a fixed order, evaluates the
     metric (loss_k = 1 - M_k) and the two values dM/da_i takes (one for y_i = 1, one for y_i = 0),
     pre-multiplied by -L, which are all the backward needs: 8 bytes a column.
Backward, one elementwise pass: dp_i = g_k * a_i (1 - a_i) * c_k[y_i], recomputing a_i from p_i.
Extra memory: 16 bytes per (block, column) forward, nothing but the gradient backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice, check_real
from ...reference.classification.anyloss import METRICS
from .. import _runtime as rt

__all__ = ["anyloss", "AnyLoss"]

HAS_TRITON_BACKWARD = True

METRIC_ID = {name: i for i, name in enumerate(METRICS)}  # constexpr switch in the combine kernel
TARGET_DTYPES = rt.INT_DTYPES + (torch.bool,) + rt.FLOAT_DTYPES + (torch.float64,)

# Elements one program handles (BLOCK_N x BLOCK_K) and warps on the GPU; 16 x 16 tiles under the
# interpreter, so small test shapes cross block boundaries.
GPU_TILE, GPU_WARPS, GPU_BLOCK_K = 4096, 4, 32
INTERPRETER_TILE = 16


@triton.jit
def _sigmoid_pair(z):
    """sigmoid(z) and 1 - sigmoid(z) = sigmoid(-z), without overflow or cancellation."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0, r, e * r), tl.where(z >= 0, e * r, r)


@triton.jit
def _load_tile(probs_ptr, stride_pn, stride_pk, target_ptr, stride_tn, stride_tk, rows, cols, mask, amplifier):
    """a, 1 - a and y (fp32) for a (BLOCK_N, BLOCK_K) tile; y is NaN where the target is not 0 or 1."""
    p = tl.load(probs_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pk, mask=mask, other=0.5)
    y = tl.load(target_ptr + rows[:, None] * stride_tn + cols[None, :] * stride_tk, mask=mask, other=0)
    y = y.to(tl.float32)
    y = tl.where((y == 0.0) | (y == 1.0), y, float("nan"))
    a, a_bar = _sigmoid_pair(amplifier * (p.to(tl.float32) - 0.5))
    return a, a_bar, y


@triton.jit
def _partials_kernel(
    probs_ptr, stride_pn, stride_pk,    # (N, K) probabilities; element (i, k) at i*stride_pn + k*stride_pk
    target_ptr, stride_tn, stride_tk,   # (N, K) targets in {0, 1}, any integer, bool or float dtype
    partials_ptr,                       # out (4, blocks, K) fp32 contiguous: TP, FP, TN, Y1 of each block
    N, K, amplifier,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    col_ok = cols < K
    mask = (rows[:, None] < N) & col_ok[None, :]
    a, a_bar, y = _load_tile(probs_ptr, stride_pn, stride_pk, target_ptr, stride_tn, stride_tk,
                             rows, cols, mask, amplifier)
    # A target that is not 0 or 1 makes y NaN, so TP (and the loss of its column) NaN.
    tp = tl.sum(tl.where(mask, y * a, 0.0), axis=0)
    fp = tl.sum(tl.where(mask, (1.0 - y) * a, 0.0), axis=0)
    tn = tl.sum(tl.where(mask, (1.0 - y) * a_bar, 0.0), axis=0)
    y1 = tl.sum(tl.where(mask, y, 0.0), axis=0)  # an exact count: a block holds far fewer than 2^24 rows
    plane = tl.num_programs(0).to(tl.int64) * K  # one (blocks, K) plane per statistic
    out = partials_ptr + block * K + cols
    tl.store(out, tp, mask=col_ok)
    tl.store(out + plane, fp, mask=col_ok)
    tl.store(out + 2 * plane, tn, mask=col_ok)
    tl.store(out + 3 * plane, y1, mask=col_ok)


@triton.jit
def _combine_kernel(
    partials_ptr,                       # (4, blocks, K) fp32 from _partials_kernel
    plane,                              # blocks * K: the distance between two statistics' planes
    loss_ptr,                           # out (K,) fp32: 1 - M_k
    coef_ptr,                           # out (K, 2) fp32 contiguous: -L dM/da for y = 1, then for y = 0
    blocks, K, n_rows, beta2, amplifier, smoothing,
    METRIC: tl.constexpr, BLOCK_B: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    tp = tl.zeros((BLOCK_B,), tl.float32)
    fp = tl.zeros((BLOCK_B,), tl.float32)
    tn = tl.zeros((BLOCK_B,), tl.float32)
    y1 = tl.zeros((BLOCK_B,), tl.float32)
    for start in range(0, blocks, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = b < blocks
        ptr = partials_ptr + b * K + k
        tp += tl.load(ptr, mask=mask, other=0.0)
        fp += tl.load(ptr + plane, mask=mask, other=0.0)
        tn += tl.load(ptr + 2 * plane, mask=mask, other=0.0)
        y1 += tl.load(ptr + 3 * plane, mask=mask, other=0.0)
    tp = tl.sum(tp, axis=0)
    fp = tl.sum(fp, axis=0)
    tn = tl.sum(tn, axis=0)
    y1 = tl.sum(y1, axis=0)  # exact up to 2^24 positives a column, then within fp32 rounding
    n = n_rows * 1.0  # as fp32 (an integer argument equal to 1 arrives as a constant)
    y0 = n - y1
    if METRIC == 0:    # F_beta = (1 + b^2) TP / D,  D = b^2 Y1 + TP + FP + s
        d = beta2 * y1 + tp + fp + smoothing
        metric = (1.0 + beta2) * tp / d
        scale = (1.0 + beta2) / (d * d)
        d_pos = scale * (beta2 * y1 + fp + smoothing)  # (1 + b^2)(D - TP)/D^2 without the cancellation
        d_neg = -scale * tp
    elif METRIC == 1:  # G = TP TN / (Y1 Y0 + s)
        e = y1 * y0 + smoothing
        metric = tp * tn / e
        d_pos = tn / e
        d_neg = -tp / e
    elif METRIC == 2:  # BAcc = (Y0 TP + Y1 TN) / (2 Y1 Y0 + s)
        e = 2.0 * y1 * y0 + smoothing
        metric = (y0 * tp + y1 * tn) / e
        d_pos = y0 / e + 0.0 * tp  # 0 * TP: a column with a NaN stays NaN
        d_neg = -y1 / e + 0.0 * tp
    else:              # Acc = (TP + TN) / N
        metric = (tp + tn) / n
        d_pos = 1.0 / n + 0.0 * tp
        d_neg = -1.0 / n + 0.0 * tp
    tl.store(loss_ptr + k, 1.0 - metric)
    tl.store(coef_ptr + 2 * k, -amplifier * d_pos)
    tl.store(coef_ptr + 2 * k + 1, -amplifier * d_neg)


@triton.jit
def _backward_kernel(
    grad_loss_ptr, stride_g,            # (K,) upstream gradient of the per-column losses (stride 0 if broadcast)
    probs_ptr, stride_pn, stride_pk,    # (N, K) probabilities, as in the forward
    target_ptr, stride_tn, stride_tk,   # (N, K) targets, as in the forward
    coef_ptr,                           # (K, 2) fp32 from _combine_kernel
    grad_ptr, stride_gn, stride_gk,     # out (N, K) gradient in the probabilities' dtype
    N, K, amplifier,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    col_ok = cols < K
    mask = (rows[:, None] < N) & col_ok[None, :]
    a, a_bar, y = _load_tile(probs_ptr, stride_pn, stride_pk, target_ptr, stride_tn, stride_tk,
                             rows, cols, mask, amplifier)
    g = tl.load(grad_loss_ptr + cols * stride_g, mask=col_ok, other=0.0).to(tl.float32)
    c_pos = tl.load(coef_ptr + 2 * cols, mask=col_ok, other=0.0)
    c_neg = tl.load(coef_ptr + 2 * cols + 1, mask=col_ok, other=0.0)
    c = tl.where(y == 1.0, c_pos[None, :], c_neg[None, :])
    c = tl.where(y == y, c, float("nan"))  # a target that is not 0 or 1
    dp = g[None, :] * c * (a * a_bar)
    tl.store(grad_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gk,
             dp.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch(n: int, k: int) -> dict:
    """Tile (BLOCK_N x BLOCK_K elements a program) and warps for an (n, k) input."""
    if rt.interpreting():
        return {"BLOCK_N": INTERPRETER_TILE, "BLOCK_K": min(INTERPRETER_TILE, triton.next_power_of_2(k)),
                "num_warps": 1}
    block_k = min(GPU_BLOCK_K, triton.next_power_of_2(k))
    block_n = max(16, min(GPU_TILE // block_k, triton.next_power_of_2(n)))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": GPU_WARPS}


@torch.library.custom_op("twinops::anyloss", mutates_args=())
def _anyloss_columns(
    probs: torch.Tensor, target: torch.Tensor, metric: str, beta: float, amplifier: float, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = probs.shape
    launch = _launch(n, k)
    blocks = triton.cdiv(n, launch["BLOCK_N"])
    partials = torch.empty((4, blocks, k), device=probs.device, dtype=torch.float32)
    _partials_kernel[(blocks, triton.cdiv(k, launch["BLOCK_K"]))](
        probs, probs.stride(0), probs.stride(1), target, target.stride(0), target.stride(1),
        partials, n, k, amplifier, **launch,
    )
    loss = torch.empty(k, device=probs.device, dtype=torch.float32)
    coef = torch.empty((k, 2), device=probs.device, dtype=torch.float32)
    _combine_kernel[(k,)](
        partials, blocks * k, loss, coef, blocks, k, n, beta * beta, amplifier, smoothing,
        METRIC=METRIC_ID[metric], BLOCK_B=16 if rt.interpreting() else 256,
    )
    return loss, coef


@_anyloss_columns.register_fake
def _(probs, target, metric, beta, amplifier, smoothing):
    k = probs.shape[1]
    return probs.new_empty(k, dtype=torch.float32), probs.new_empty((k, 2), dtype=torch.float32)


@torch.library.custom_op("twinops::anyloss_backward", mutates_args=())
def _anyloss_columns_backward(
    grad_loss: torch.Tensor, probs: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, amplifier: float
) -> torch.Tensor:
    n, k = probs.shape
    grad = torch.empty((n, k), device=probs.device, dtype=probs.dtype)
    launch = _launch(n, k)
    grid = (triton.cdiv(n, launch["BLOCK_N"]), triton.cdiv(k, launch["BLOCK_K"]))
    _backward_kernel[grid](
        grad_loss, grad_loss.stride(0), probs, probs.stride(0), probs.stride(1),
        target, target.stride(0), target.stride(1), coef, grad, grad.stride(0), grad.stride(1),
        n, k, amplifier, **launch,
    )
    return grad


@_anyloss_columns_backward.register_fake
def _(grad_loss, probs, target, coef, amplifier):
    return probs.new_empty(probs.shape)


def _setup_context(ctx, inputs, output):
    probs, target, metric, beta, amplifier, smoothing = inputs
    ctx.save_for_backward(probs, target, output[1])
    ctx.amplifier = amplifier


def _backward(ctx, grad_loss, grad_coef):
    probs, target, coef = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _anyloss_columns_backward(grad_loss, probs, target, coef, ctx.amplifier)
    return grad, None, None, None, None, None


_anyloss_columns.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(probs, target):
    rt.check_tensor(probs, "probs")
    if probs.dtype not in rt.FLOAT_DTYPES:
        raise TypeError(f"probs must be float32, float16 or bfloat16, got {probs.dtype}")
    if probs.ndim not in (1, 2):
        raise ValueError(f"probs must have shape (N,) or (N, K), got {probs.ndim} dimensions {tuple(probs.shape)}")
    if probs.shape[0] < 1 or (probs.ndim == 2 and probs.shape[1] < 1):
        raise ValueError(f"probs must hold at least one sample (N >= 1) and one column, got shape {tuple(probs.shape)}")
    rt.check_tensor(target, "target")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must be a tensor of 0/1 labels, got {target.dtype}")
    if target.shape != probs.shape:
        raise ValueError(f"target must have the shape of probs {tuple(probs.shape)}, got {tuple(target.shape)}")
    rt.check_device(("probs", probs), ("target", target))


def anyloss(probs, target, *, metric="f_beta", beta=1.0, amplifier=73.0, smoothing=1e-5, reduction="mean"):
    """AnyLoss of P6 (1 - F_beta, G-mean², balanced accuracy or accuracy of the soft confusion
    matrix), on the GPU.

    Same arguments and semantics as `twinops.reference.classification.anyloss`; returns the dtype
    of ``probs``. A target that is not 0 or 1 gives NaN for the loss (and gradient) of its column
    instead of an error, since checking it would synchronise the device.
    """
    _check_inputs(probs, target)
    check_choice(metric, "metric", METRICS)
    beta = check_real(beta, "beta", low=0.0)
    amplifier = check_real(amplifier, "amplifier", low=0.0, low_open=True)
    smoothing = check_real(smoothing, "smoothing", low=0.0)
    rt.check_reduction(reduction)
    one_d = probs.ndim == 1
    columns = (probs[:, None], target[:, None]) if one_d else (probs, target)
    loss, _ = _anyloss_columns(*columns, metric, beta, amplifier, smoothing)
    if one_d:
        out = loss[0]  # one column: every reduction is its loss
    elif reduction == "none":
        out = loss
    else:
        out = loss.sum() if reduction == "sum" else loss.mean()
    return out.to(probs.dtype)


class AnyLoss(torch.nn.Module):
    """``nn.Module`` form of `anyloss`: ``AnyLoss(metric="f_beta")(probs, target)``."""

    def __init__(self, *, metric="f_beta", beta=1.0, amplifier=73.0, smoothing=1e-5, reduction="mean"):
        super().__init__()
        check_choice(metric, "metric", METRICS)
        self.metric, self.beta, self.amplifier, self.smoothing, self.reduction = (
            metric, beta, amplifier, smoothing, reduction)

    def forward(self, probs, target):
        return anyloss(probs, target, metric=self.metric, beta=self.beta, amplifier=self.amplifier,
                       smoothing=self.smoothing, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, beta={self.beta}, amplifier={self.amplifier}, reduction={self.reduction!r}"
