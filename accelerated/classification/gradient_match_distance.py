"""Gradient-matching distance (P17) as Triton kernels: one launch over a packed row table for the
per-row sums, one single-program launch for the total, and one launch for the whole backward,
whatever the number of parameter tensors. See
`twinops.reference.classification.gradient_match_distance` for the definition.

The eager form loops over the parameter list (reshape, three row reductions and a division per
tensor: ~5 launches a tensor, ~70 for a small ConvNet); here the work is memory-bound and tiny, so
the launch count is the cost. Every tensor of both lists is described by one row of an int64
*tensor table* (its address, its row view's sizes and strides, where its rows start in the packed
row numbering); program ``p`` finds its tensor by a binary search over the table's row starts and
reads its row in place: nothing is copied or concatenated.

Forward, per packed row p (row o of tensor l), a = real row, b = synthetic row:
    stats[p] = (d_p, <a,b>, |a|^2, |b|^2, |b - a|^2),  d_p = 1 - <a,b>/(|a||b| + eps)  (0 for 1-D tensors)
    total:  "ours" sum_p d_p,  "mse" sum_p |b - a|^2,  "cos" 1 - sum<a,b>/(sqrt(sum|a|^2) sqrt(sum|b|^2) + eps)
Backward, per packed row: d/db = alpha_p a + beta_p b, with (alpha, beta) from that row's sums
("ours"), the totals ("cos") or (-2g, 2g) ("mse"); written into one packed buffer that is
returned as per-tensor views. Extra memory: 5 floats a row and 17 int64 a tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice, check_real
from ...reference.classification.gradient_match_distance import METRICS, split_named
from .. import _runtime as rt

__all__ = ["gradient_match_distance", "gradient_match_distance_named", "GradientMatchDistance"]

HAS_TRITON_BACKWARD = True

# Columns of the tensor table, one int64 row per parameter tensor. A tensor's row view is
# (rows, n1 * n2 * n3): 4-D (O, I, kh, kw) -> n = (I, kh, kw); 3-D (C, h, w) -> (1, h, w);
# 2-D (O, I) -> (1, 1, I); 1-D (C,) -> one row (1, 1, C). Element (o, i1, i2, i3) of the
# synthetic tensor lies at SYN + o*S0 + i1*S1 + i2*S2 + i3*S3 (elements), of the real one at
# REAL + o*R0 + ... . When every row is one strided line (FLAT), n1 = n2 = 1 and S3/R3 step along it.
SYN, REAL, ROW_START, ROWS, N1, N2, N3 = 0, 1, 2, 3, 4, 5, 6
S0, S1, S2, S3, R0, R1, R2, R3 = 7, 8, 9, 10, 11, 12, 13, 14
OUT_START, COUNTED = 15, 16  # offset of the tensor in the packed gradient; 1 if it has >= 2 dims
NCOL = 17
STATS = 5  # d, <a,b>, |a|^2, |b|^2, |b-a|^2 per row
METRIC_IDS = {"ours": 0, "mse": 1, "cos": 2}

LAUNCH = rt.RowLaunch(block=1024, warps=4)


@triton.jit
def _find_tensor(table_ptr, p, num_tensors, LOG_K: tl.constexpr, NCOL: tl.constexpr, ROW_START: tl.constexpr):
    """The last tensor whose first packed row is <= p (tensors with no rows are skipped over)."""
    lo = p * 0
    hi = lo + num_tensors
    for _ in tl.static_range(LOG_K):
        mid = (lo + hi) // 2
        right = tl.load(table_ptr + mid * NCOL + ROW_START) <= p
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _column_offsets(j, n2, n3, s1, s2, s3, FLAT: tl.constexpr):
    """Element offsets of columns ``j`` of a row view whose trailing sizes are (n1, n2, n3)."""
    if FLAT:
        return j * s3
    i3 = j % n3
    rest = j // n3
    return (rest // n2) * s1 + (rest % n2) * s2 + i3 * s3


@triton.jit
def _row(table_ptr, p, num_tensors, DTYPE: tl.constexpr, LOG_K: tl.constexpr):
    """Locate packed row p: its table entry, row index o, row length, and its two row pointers."""
    entry = table_ptr + _find_tensor(table_ptr, p, num_tensors, LOG_K, 17, 2) * 17
    o = p - tl.load(entry + 2)
    n1, n2, n3 = tl.load(entry + 4), tl.load(entry + 5), tl.load(entry + 6)
    syn = tl.load(entry + 0).to(tl.pointer_type(DTYPE)) + o * tl.load(entry + 7)
    real = tl.load(entry + 1).to(tl.pointer_type(DTYPE)) + o * tl.load(entry + 11)
    return entry, o, n1 * n2 * n3, n2, n3, syn, real


@triton.jit
def _gm_rows_kernel(
    table_ptr, num_tensors,   # (K, 17) int64 tensor table (columns above)
    stats_ptr,                # out (R, 5) fp32 contiguous: d, <a,b>, |a|^2, |b|^2, |b-a|^2 of each packed row
    eps,
    DTYPE: tl.constexpr, FLAT: tl.constexpr, LOG_K: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    entry, o, length, n2, n3, syn, real = _row(table_ptr, p, num_tensors, DTYPE, LOG_K)
    s1, s2, s3 = tl.load(entry + 8), tl.load(entry + 9), tl.load(entry + 10)
    r1, r2, r3 = tl.load(entry + 12), tl.load(entry + 13), tl.load(entry + 14)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    aa = tl.zeros([BLOCK], dtype=tl.float32)
    bb = tl.zeros([BLOCK], dtype=tl.float32)
    dd = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, length, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < length
        a = tl.load(real + _column_offsets(j, n2, n3, r1, r2, r3, FLAT), mask=mask, other=0.0).to(tl.float32)
        b = tl.load(syn + _column_offsets(j, n2, n3, s1, s2, s3, FLAT), mask=mask, other=0.0).to(tl.float32)
        dot += a * b
        aa += a * a
        bb += b * b
        dd += (b - a) * (b - a)
    s, sa, sb = tl.sum(dot, axis=0), tl.sum(aa, axis=0), tl.sum(bb, axis=0)
    d = 1.0 - s / (tl.sqrt(sa) * tl.sqrt(sb) + eps)
    out = stats_ptr + p * 5
    tl.store(out + 0, tl.where(tl.load(entry + 16) != 0, d, 0.0))  # 1-D tensors are not compared
    tl.store(out + 1, s)
    tl.store(out + 2, sa)
    tl.store(out + 3, sb)
    tl.store(out + 4, tl.sum(dd, axis=0))


@triton.jit
def _gm_total_kernel(
    stats_ptr, num_rows,      # (R, 5) fp32 from _gm_rows_kernel
    out_ptr,                  # out () in the input dtype: the distance
    totals_ptr,               # out (3,) fp32: sum <a,b>, sum |a|^2, sum |b|^2 (for the "cos" backward)
    eps,
    METRIC: tl.constexpr, BLOCK: tl.constexpr,
):
    acc = tl.zeros([BLOCK, 8], dtype=tl.float32)
    cols = tl.arange(0, 8)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = (rows[:, None] < num_rows) & (cols[None, :] < 5)
        acc += tl.load(stats_ptr + rows[:, None] * 5 + cols[None, :], mask=mask, other=0.0)
    sums = tl.sum(acc, axis=0)
    d = tl.sum(tl.where(cols == 0, sums, 0.0), axis=0)
    s = tl.sum(tl.where(cols == 1, sums, 0.0), axis=0)
    sa = tl.sum(tl.where(cols == 2, sums, 0.0), axis=0)
    sb = tl.sum(tl.where(cols == 3, sums, 0.0), axis=0)
    mse = tl.sum(tl.where(cols == 4, sums, 0.0), axis=0)
    if METRIC == 0:
        value = d
    elif METRIC == 1:
        value = mse
    else:
        value = 1.0 - s / (tl.sqrt(sa) * tl.sqrt(sb) + eps)
    tl.store(out_ptr, value.to(out_ptr.dtype.element_ty))
    tl.store(totals_ptr + 0, s)
    tl.store(totals_ptr + 1, sa)
    tl.store(totals_ptr + 2, sb)


@triton.jit
def _cos_coefficients(g, s, sa, sb, eps):
    """(alpha, beta) with d/db [1 - s/(|a||b| + eps)] = alpha a + beta b, times the upstream g."""
    na, nb = tl.sqrt(sa), tl.sqrt(sb)
    q = na * nb + eps
    beta = tl.where(nb > 0, g * s * na / (tl.where(nb > 0, nb, 1.0) * q * q), 0.0)
    return -g / q, beta


@triton.jit
def _gm_backward_kernel(
    grad_ptr,                 # () upstream gradient of the distance
    table_ptr, num_tensors,   # the tensor table, as in the forward
    stats_ptr, totals_ptr,    # (R, 5) and (3,) fp32 saved by the forward
    out_ptr,                  # out (numel,) packed gradient in the input dtype: tensor l at OUT_START, row-major
    eps,
    DTYPE: tl.constexpr, FLAT: tl.constexpr, LOG_K: tl.constexpr, METRIC: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    entry, o, length, n2, n3, syn, real = _row(table_ptr, p, num_tensors, DTYPE, LOG_K)
    s1, s2, s3 = tl.load(entry + 8), tl.load(entry + 9), tl.load(entry + 10)
    r1, r2, r3 = tl.load(entry + 12), tl.load(entry + 13), tl.load(entry + 14)
    out = out_ptr + tl.load(entry + 15) + o * length
    g = tl.load(grad_ptr).to(tl.float32)
    compared = (tl.load(entry + 16) != 0) | (METRIC != 0)  # "ours" skips 1-D tensors
    if METRIC == 0:
        row = stats_ptr + p * 5
        alpha, beta = _cos_coefficients(g, tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), eps)
    elif METRIC == 1:
        alpha, beta = -2.0 * g, 2.0 * g
    else:
        alpha, beta = _cos_coefficients(g, tl.load(totals_ptr), tl.load(totals_ptr + 1), tl.load(totals_ptr + 2), eps)
    for start in range(0, length, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < length
        load = mask & compared
        a = tl.load(real + _column_offsets(j, n2, n3, r1, r2, r3, FLAT), mask=load, other=0.0).to(tl.float32)
        b = tl.load(syn + _column_offsets(j, n2, n3, s1, s2, s3, FLAT), mask=load, other=0.0).to(tl.float32)
        grad_b = tl.where(compared, alpha * a + beta * b, 0.0)  # 1-D tensors under "ours": exactly 0
        tl.store(out + j, grad_b.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ host side

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _row_view(t: torch.Tensor):
    """(rows, (n1, n2, n3), strides (row, 1, 2, 3)) of a tensor's row view; see the table columns."""
    st = t.stride()
    if t.ndim == 1:
        return 1, (1, 1, t.shape[0]), (0, 0, 0, st[0])
    if t.ndim == 2:
        return t.shape[0], (1, 1, t.shape[1]), (st[0], 0, 0, st[1])
    if t.ndim == 3:
        return t.shape[0], (1, t.shape[1], t.shape[2]), (st[0], 0, st[1], st[2])
    return t.shape[0], tuple(t.shape[1:]), tuple(st)


def _flatten(sizes, strides):
    """A row view with one stride (n1 = n2 = 1) when its trailing dimensions are one strided line."""
    n1, n2, n3 = sizes
    _, s1, s2, s3 = strides
    step = s3 if n3 > 1 else (s2 if n2 > 1 else s1)
    if (n3 == 1 or s3 == step) and (n2 == 1 or s2 == step * n3) and (n1 == 1 or s1 == step * n2 * n3):
        return (1, 1, n1 * n2 * n3), (strides[0], 0, 0, step)
    return None


def _table(grads_syn, grads_real, device):
    """The tensor table (K, 17) int64 on ``device``, the packed row count, and whether it is FLAT."""
    entries, rows_so_far, numel_so_far, flat = [], 0, 0, True
    views = []
    for s, r in zip(grads_syn, grads_real):
        rows, sizes, s_strides = _row_view(s)
        _, _, r_strides = _row_view(r)
        fs, fr = _flatten(sizes, s_strides), _flatten(sizes, r_strides)
        views.append((rows, sizes, s_strides, r_strides, fs, fr))
        flat = flat and fs is not None and fr is not None
    for (rows, sizes, s_strides, r_strides, fs, fr), s, r in zip(views, grads_syn, grads_real):
        if flat:
            sizes, s_strides, r_strides = fs[0], fs[1], fr[1]
        entries.append([s.data_ptr(), r.data_ptr(), rows_so_far, rows, *sizes, *s_strides, *r_strides,
                        numel_so_far, int(s.ndim >= 2)])
        rows_so_far += rows
        numel_so_far += s.numel()
    table = torch.tensor(entries, dtype=torch.int64).reshape(-1, NCOL).to(device, non_blocking=True)
    return table, rows_so_far, numel_so_far, flat


def _launch(n: int) -> dict:
    opts = rt.row_launch(n, LAUNCH)
    if rt.interpreting():
        opts["BLOCK_C"] = 16
    return {"BLOCK": opts["BLOCK_C"], "num_warps": opts["num_warps"]}


def _log_k(k: int) -> int:
    return max(1, (k - 1).bit_length())


@torch.library.custom_op("twinops::gradient_match_distance", mutates_args=())
def _gm_forward(
    grads_syn: list[torch.Tensor], grads_real: list[torch.Tensor], metric: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = grads_syn[0].device
    dtype = grads_syn[0].dtype
    out = torch.empty((), device=device, dtype=dtype)
    totals = torch.empty(3, device=device, dtype=torch.float32)
    table, num_rows, _, flat = _table(grads_syn, grads_real, device)
    stats = torch.empty((num_rows, STATS), device=device, dtype=torch.float32)
    widest = max([t.numel() // max(1, t.shape[0]) if t.ndim > 1 else t.numel() for t in grads_syn])
    if num_rows > 0:
        _gm_rows_kernel[(num_rows,)](
            table, len(grads_syn), stats, eps, DTYPE=_TRITON_DTYPES[dtype], FLAT=flat,
            LOG_K=_log_k(len(grads_syn)), **_launch(widest),
        )
    _gm_total_kernel[(1,)](stats, num_rows, out, totals, eps, METRIC=METRIC_IDS[metric],
                           BLOCK=16 if rt.interpreting() else 256, num_warps=4)
    return out, stats, totals


@_gm_forward.register_fake
def _(grads_syn, grads_real, metric, eps):
    like = grads_syn[0]
    num_rows = sum(t.shape[0] if t.ndim > 1 else 1 for t in grads_syn)
    return (like.new_empty(()), like.new_empty((num_rows, STATS), dtype=torch.float32),
            like.new_empty(3, dtype=torch.float32))


@torch.library.custom_op("twinops::gradient_match_distance_backward", mutates_args=())
def _gm_backward(
    grad: torch.Tensor, grads_syn: list[torch.Tensor], grads_real: list[torch.Tensor], stats: torch.Tensor,
    totals: torch.Tensor, metric: str, eps: float,
) -> torch.Tensor:
    device, dtype = grads_syn[0].device, grads_syn[0].dtype
    # The table is rebuilt from the tensors this call receives (a compiler may hand the backward
    # recomputed copies of the forward's inputs, at other addresses).
    table, num_rows, numel, flat = _table(grads_syn, grads_real, device)
    packed = torch.empty(numel, device=device, dtype=dtype)
    widest = max([t.numel() // max(1, t.shape[0]) if t.ndim > 1 else t.numel() for t in grads_syn])
    if num_rows > 0:
        _gm_backward_kernel[(num_rows,)](
            grad, table, len(grads_syn), stats, totals, packed, eps, DTYPE=_TRITON_DTYPES[dtype], FLAT=flat,
            LOG_K=_log_k(len(grads_syn)), METRIC=METRIC_IDS[metric], **_launch(widest),
        )
    return packed


@_gm_backward.register_fake
def _(grad, grads_syn, grads_real, stats, totals, metric, eps):
    return grads_syn[0].new_empty(sum(t.numel() for t in grads_syn))


def _setup_context(ctx, inputs, output):
    grads_syn, grads_real, metric, eps = inputs
    _, stats, totals = output
    ctx.count = len(grads_syn)
    ctx.save_for_backward(*grads_syn, *grads_real, stats, totals)
    ctx.metric, ctx.eps = metric, eps


def _backward(ctx, grad_out, grad_stats, grad_totals):
    saved = ctx.saved_tensors
    syn, real = list(saved[:ctx.count]), list(saved[ctx.count:2 * ctx.count])
    stats, totals = saved[-2:]
    needs = ctx.needs_input_grad[0]
    grads = [None] * ctx.count
    if any(needs) if isinstance(needs, (list, tuple)) else needs:
        packed = _gm_backward(grad_out, syn, real, stats, totals, ctx.metric, ctx.eps)
        grads = [chunk.view(t.shape) for chunk, t in zip(packed.split([t.numel() for t in syn]), syn)]
    return grads, [None] * ctx.count, None, None


_gm_forward.register_autograd(_backward, setup_context=_setup_context)


def _check(grads_syn, grads_real, metric, eps):
    for seq, name in ((grads_syn, "grads_syn"), (grads_real, "grads_real")):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of gradient tensors, got {type(seq).__name__}")
    if len(grads_real) != len(grads_syn):
        raise ValueError(f"grads_real has {len(grads_real)} tensors but grads_syn has {len(grads_syn)}")
    for side, seq in (("grads_syn", grads_syn), ("grads_real", grads_real)):
        for i, t in enumerate(seq):
            rt.check_tensor(t, f"{side}[{i}]")
            if t.dtype not in rt.FLOAT_DTYPES:
                raise TypeError(f"{side}[{i}] must be float32, float16 or bfloat16, got {t.dtype}")
            if not 1 <= t.ndim <= 4:
                raise ValueError(f"{side}[{i}] must have 1 to 4 dimensions (a parameter gradient), "
                                 f"got shape {tuple(t.shape)}")
    for i, (s, r) in enumerate(zip(grads_syn, grads_real)):
        if s.shape != r.shape:
            raise ValueError(f"grads_real[{i}] has shape {tuple(r.shape)} but grads_syn[{i}] has shape "
                             f"{tuple(s.shape)}")
        if s.dtype != grads_syn[0].dtype or r.dtype != grads_syn[0].dtype:
            raise TypeError(f"every gradient must share one dtype: grads_syn[0] is {grads_syn[0].dtype}, "
                            f"grads_syn[{i}] is {s.dtype} and grads_real[{i}] is {r.dtype}")
        if r.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"grads_real[{i}] requires grad: the real-data gradients are constants of the "
                             f"distance; pass them detached (grads_real[{i}].detach())")
    check_choice(metric, "metric", METRICS)
    eps = check_real(eps, "eps", low=0.0)
    rt.check_device(*[(f"grads_syn[{i}]", t) for i, t in enumerate(grads_syn)],
                    *[(f"grads_real[{i}]", t) for i, t in enumerate(grads_real)])
    return eps


def gradient_match_distance(grads_syn, grads_real, *, metric="ours", eps=1e-6):
    """Gradient-matching distance of P17 (DC's ``match_loss``) between two lists of parameter
    gradients, on the GPU.

    Same arguments and semantics as `twinops.reference.classification.gradient_match_distance`;
    returns a 0-d tensor in the gradients' dtype (all tensors must share one dtype and device).
    Differentiable with respect to ``grads_syn`` (e.g. built with ``create_graph=True``);
    ``grads_real`` must not require grad.
    """
    eps = _check(grads_syn, grads_real, metric, eps)
    if len(grads_syn) == 0:
        return torch.tensor(1.0 if metric == "cos" else 0.0)
    out, _, _ = _gm_forward(list(grads_syn), list(grads_real), metric, eps)
    return out


def gradient_match_distance_named(*, metric="ours", eps=1e-6, **tensors):
    """`gradient_match_distance` with the tensors passed as ``g_s_0=…, g_r_0=…, g_s_1=…, …``."""
    syn, real = split_named(tensors)
    return gradient_match_distance(syn, real, metric=metric, eps=eps)


class GradientMatchDistance(torch.nn.Module):
    """``nn.Module`` form of `gradient_match_distance`: ``forward(grads_syn, grads_real)``."""

    def __init__(self, *, metric="ours", eps=1e-6):
        super().__init__()
        self.metric, self.eps = metric, eps

    def forward(self, grads_syn, grads_real):
        return gradient_match_distance(grads_syn, grads_real, metric=self.metric, eps=self.eps)
