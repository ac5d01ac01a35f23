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
    stats[p] = ([tensor has >= 2 dims], <a,b>, |a|^2, |b|^2, |b - a|^2)
    total:  "ours"  sum_p d_p over rows of tensors with >= 2 dims, d_p = 1 - <a,b>/(|a||b| + eps)
            "mse"   sum_p |b - a|^2
            "cos"   1 - sum<a,b> / (sqrt(sum |a|^2) sqrt(sum |b|^2) + eps)
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

# The tensor table: one int64 row of 17 columns per parameter tensor. A tensor's row view is
# (rows, n1 * n2 * n3): 4-D (O, I, kh, kw) -> (n1, n2, n3) = (I, kh, kw); 3-D (C, h, w) -> (1, h, w);
# 2-D (O, I) -> (1, 1, I); 1-D (C,) -> one row (1, 1, C). Element (o, i1, i2, i3) of the synthetic
# tensor lies at address col0 + (o*col7 + i1*col8 + i2*col9 + i3*col10) elements, of the real one at
# col1 + (o*col11 + i1*col12 + i2*col13 + i3*col14). When every row is one strided line (FLAT),
# n1 = n2 = 1 and col10 / col14 step along it.
#   0 synthetic address   1 real address   2 first packed row   3 rows   4-6 n1, n2, n3
#   7-10 synthetic strides (row, 1, 2, 3)   11-14 real strides   15 offset in the packed gradient
#   16 compared by "ours" (1 if the tensor has >= 2 dimensions)
NCOL = 17
STATS = 5  # compared by "ours", <a,b>, |a|^2, |b|^2, |b-a|^2 per row
METRIC_IDS = {"ours": 0, "mse": 1, "cos": 2}

LAUNCH = rt.RowLaunch(block=1024, warps=4)


@triton.jit
def _find_rows(table_ptr, p, num_tensors, num_rows, DTYPE: tl.constexpr, LOG_K: tl.constexpr):
    """For packed rows ``p`` (a vector): the table entry of each row's tensor, the row ``o`` inside it,
    the row length (0 for ``p`` past the last row), and the two row pointers."""
    # Binary search for the last tensor whose first packed row is <= p (tensors with no rows have
    # the same start as the next one and are passed over).
    lo = p * 0
    hi = lo + num_tensors
    for _ in tl.static_range(LOG_K):
        mid = (lo + hi) // 2
        right = tl.load(table_ptr + mid * 17 + 2) <= p
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    entry = table_ptr + lo * 17
    o = p - tl.load(entry + 2)
    length = tl.where(p < num_rows, tl.load(entry + 4) * tl.load(entry + 5) * tl.load(entry + 6), 0)
    syn = tl.load(entry + 0).to(tl.pointer_type(DTYPE)) + o * tl.load(entry + 7)
    real = tl.load(entry + 1).to(tl.pointer_type(DTYPE)) + o * tl.load(entry + 11)
    return entry, o, length, syn, real


@triton.jit
def _column_offsets(entry, j, first_stride: tl.constexpr, FLAT: tl.constexpr):
    """(rows, BLOCK) element offsets of columns ``j`` in each row's view, with the strides that start
    at table column ``first_stride`` (S1 for the synthetic tensor, R1 for the real one)."""
    s3 = tl.load(entry + first_stride + 2)[:, None]
    if FLAT:
        return j[None, :] * s3
    n2, n3 = tl.load(entry + 5)[:, None], tl.load(entry + 6)[:, None]
    s1, s2 = tl.load(entry + first_stride)[:, None], tl.load(entry + first_stride + 1)[:, None]
    jj = j[None, :]  # column j of the view is element (j // (n2 n3), (j // n3) % n2, j % n3)
    return (jj // (n2 * n3)) * s1 + ((jj // n3) % n2) * s2 + (jj % n3) * s3


@triton.jit
def _gm_rows_kernel(
    table_ptr, num_tensors,   # (K, 17) int64 tensor table (columns above)
    num_rows,                 # R, the packed row count
    stats_ptr,                # out (R, 5) fp32 contiguous, per packed row: compared by "ours" (1.0 / 0.0),
                              #   <a,b>, |a|^2, |b|^2, |b-a|^2
    DTYPE: tl.constexpr, FLAT: tl.constexpr, LOG_K: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # Each program reduces ROWS packed rows (possibly of different tensors) in (ROWS, BLOCK) tiles.
    p = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    entry, o, length, syn, real = _find_rows(table_ptr, p, num_tensors, num_rows, DTYPE, LOG_K)
    dot = tl.full([ROWS, BLOCK], 0.0, tl.float32)
    aa = tl.full([ROWS, BLOCK], 0.0, tl.float32)
    bb = tl.full([ROWS, BLOCK], 0.0, tl.float32)
    dd = tl.full([ROWS, BLOCK], 0.0, tl.float32)
    for start in range(0, tl.max(length, axis=0), BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = j[None, :] < length[:, None]
        a = tl.load(real[:, None] + _column_offsets(entry, j, 12, FLAT), mask=mask, other=0.0).to(tl.float32)
        b = tl.load(syn[:, None] + _column_offsets(entry, j, 8, FLAT), mask=mask, other=0.0).to(tl.float32)
        dot += a * b
        aa += a * a
        bb += b * b
        dd += (b - a) * (b - a)
    live = p < num_rows
    out = stats_ptr + p * 5
    tl.store(out + 1, tl.sum(dot, axis=1), mask=live)
    tl.store(out + 2, tl.sum(aa, axis=1), mask=live)
    tl.store(out + 3, tl.sum(bb, axis=1), mask=live)
    tl.store(out + 4, tl.sum(dd, axis=1), mask=live)
    tl.store(out, (tl.load(entry + 16) != 0).to(tl.float32), mask=live)  # 1 if compared by "ours" (>= 2 dims)


@triton.jit
def _gm_total_kernel(
    stats_ptr, num_rows,      # (R, 5) fp32 from _gm_rows_kernel
    out_ptr,                  # out () in the input dtype: the distance
    totals_ptr,               # out (4,) fp32: sum d, sum <a,b>, sum |a|^2, sum |b|^2 (the last three feed
                              #   the "cos" backward)
    eps,
    METRIC: tl.constexpr, BLOCK: tl.constexpr,
):
    d = tl.full([BLOCK], 0.0, tl.float32)
    dot = tl.full([BLOCK], 0.0, tl.float32)
    aa = tl.full([BLOCK], 0.0, tl.float32)
    bb = tl.full([BLOCK], 0.0, tl.float32)
    dd = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, num_rows, BLOCK):
        row = stats_ptr + (start + tl.arange(0, BLOCK).to(tl.int64)) * 5
        mask = start + tl.arange(0, BLOCK) < num_rows
        compared = tl.load(row, mask=mask, other=0.0) != 0.0
        s = tl.load(row + 1, mask=mask, other=0.0)
        sa = tl.load(row + 2, mask=mask, other=0.0)
        sb = tl.load(row + 3, mask=mask, other=0.0)
        d += tl.where(compared, 1.0 - s / (tl.sqrt(sa) * tl.sqrt(sb) + eps), 0.0)
        dot += s
        aa += sa
        bb += sb
        dd += tl.load(row + 4, mask=mask, other=0.0)
    d, s, sa, sb = tl.sum(d, axis=0), tl.sum(dot, axis=0), tl.sum(aa, axis=0), tl.sum(bb, axis=0)
    tl.store(totals_ptr + 0, d)
    tl.store(totals_ptr + 1, s)
    tl.store(totals_ptr + 2, sa)
    tl.store(totals_ptr + 3, sb)
    if METRIC == 0:
        value = d
    elif METRIC == 1:
        value = tl.sum(dd, axis=0)
    else:
        value = 1.0 - s / (tl.sqrt(sa) * tl.sqrt(sb) + eps)
    tl.store(out_ptr, value.to(out_ptr.dtype.element_ty))


@triton.jit
def _gm_backward_kernel(
    grad_ptr,                 # () upstream gradient of the distance
    table_ptr, num_tensors,   # the tensor table, as in the forward
    num_rows,                 # R, the packed row count
    stats_ptr, totals_ptr,    # (R, 5) and (4,) fp32 saved by the forward
    out_ptr,                  # out (numel,) packed gradient in the input dtype: tensor l at OUT_START, row-major
    eps,
    DTYPE: tl.constexpr, FLAT: tl.constexpr, LOG_K: tl.constexpr, METRIC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    entry, o, length, syn, real = _find_rows(table_ptr, p, num_tensors, num_rows, DTYPE, LOG_K)
    live = p < num_rows
    out = out_ptr + tl.load(entry + 15) + o * length

    # d/db [1 - s/(|a||b| + eps)] = alpha a + beta b, with the sums of the row ("ours") or of
    # everything ("cos"); beta is 0 where |b| = 0. "mse": d/db |b - a|^2 = 2 (b - a).
    g = tl.load(grad_ptr).to(tl.float32)
    if METRIC == 0:
        row = stats_ptr + p * 5
        s = tl.load(row + 1, mask=live, other=0.0)
        sa = tl.load(row + 2, mask=live, other=0.0)
        sb = tl.load(row + 3, mask=live, other=0.0)
    else:
        s, sa, sb = tl.load(totals_ptr + 1), tl.load(totals_ptr + 2), tl.load(totals_ptr + 3)
    na, nb = tl.sqrt(sa), tl.sqrt(sb)
    q = na * nb + eps
    alpha = -g / q + p * 0.0
    beta = tl.where(nb > 0, g * s * na / (tl.where(nb > 0, nb, 1.0) * q * q), 0.0) + p * 0.0
    if METRIC == 1:
        alpha, beta = -2.0 * g + p * 0.0, 2.0 * g + p * 0.0
    compared = (tl.load(entry + 16) != 0) | (METRIC != 0)  # "ours" gives 1-D tensors a zero gradient

    for start in range(0, tl.max(length, axis=0), BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = j[None, :] < length[:, None]
        load = mask & compared[:, None]
        a = tl.load(real[:, None] + _column_offsets(entry, j, 12, FLAT), mask=load, other=0.0).to(tl.float32)
        b = tl.load(syn[:, None] + _column_offsets(entry, j, 8, FLAT), mask=load, other=0.0).to(tl.float32)
        grad_b = tl.where(compared[:, None], alpha[:, None] * a + beta[:, None] * b, 0.0)
        tl.store(out[:, None] + j[None, :], grad_b.to(out_ptr.dtype.element_ty), mask=mask)


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


def _launch(widest: int) -> dict:
    """Tile (ROWS packed rows x BLOCK columns) and warps. On the GPU two rows a program, their
    columns in chunks of up to 1024; under the interpreter 16 x 16 tiles, so short test rows cross
    chunk boundaries and programs are few."""
    if rt.interpreting():
        return {"ROWS": 16, "BLOCK": 16, "num_warps": 1}
    opts = rt.row_launch(widest, LAUNCH)
    return {"ROWS": 2, "BLOCK": opts["BLOCK_C"], "num_warps": opts["num_warps"]}


def _log_k(k: int) -> int:
    return max(1, (k - 1).bit_length())


@torch.library.custom_op("twinops::gradient_match_distance", mutates_args=())
def _gm_forward(
    grads_syn: list[torch.Tensor], grads_real: list[torch.Tensor], metric: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = grads_syn[0].device
    dtype = grads_syn[0].dtype
    out = torch.empty((), device=device, dtype=dtype)
    totals = torch.empty(4, device=device, dtype=torch.float32)
    table, num_rows, _, flat = _table(grads_syn, grads_real, device)
    stats = torch.empty((num_rows, STATS), device=device, dtype=torch.float32)
    widest = max([t.numel() // max(1, t.shape[0]) if t.ndim > 1 else t.numel() for t in grads_syn])
    if num_rows > 0:
        launch = _launch(widest)
        _gm_rows_kernel[(triton.cdiv(num_rows, launch["ROWS"]),)](
            table, len(grads_syn), num_rows, stats, DTYPE=_TRITON_DTYPES[dtype], FLAT=flat,
            LOG_K=_log_k(len(grads_syn)), **launch,
        )
    _gm_total_kernel[(1,)](stats, num_rows, out, totals, eps, METRIC=METRIC_IDS[metric],
                           BLOCK=16 if rt.interpreting() else 256, num_warps=4)
    return out, stats, totals


@_gm_forward.register_fake
def _(grads_syn, grads_real, metric, eps):
    like = grads_syn[0]
    num_rows = sum(t.shape[0] if t.ndim > 1 else 1 for t in grads_syn)
    return (like.new_empty(()), like.new_empty((num_rows, STATS), dtype=torch.float32),
            like.new_empty(4, dtype=torch.float32))


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
        launch = _launch(widest)
        _gm_backward_kernel[(triton.cdiv(num_rows, launch["ROWS"]),)](
            grad, table, len(grads_syn), num_rows, stats, totals, packed, eps, DTYPE=_TRITON_DTYPES[dtype],
            FLAT=flat, LOG_K=_log_k(len(grads_syn)), METRIC=METRIC_IDS[metric], **launch,
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
    ``grads_real`` must not require grad. Empty lists give a constant CPU float32 0-d tensor
    (0, or 1 for ``"cos"``).
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
