"""Triton building blocks for row-wise classification losses over (N, C) logits.

Each program owns one row and walks its C logits in ``BLOCK_C``-wide chunks, so any C works in one
pass per direction with O(1) state per row. Offsets are 64-bit: ``row * stride_row`` and
``col * stride_col`` are formed in int64, so tensors past 2**31 elements and transposed views
(large ``stride_col``) are addressed correctly without a copy.
"""

import triton
import triton.language as tl


@triton.jit
def load_label(target_ptr, stride_target, row, C, ignore_index):
    """Row ``row``'s label, whether it is ignored, whether it is a valid class, and a safe column.

    ``safe`` is ``y`` for valid labels and 0 otherwise, so that gathering the target logit never
    reads outside the row; callers turn invalid labels into NaN.
    """
    y = tl.load(target_ptr + row * stride_target).to(tl.int64)
    ignored = y == ignore_index
    valid = (y >= 0) & (y < C) & (~ignored)
    safe = tl.where(valid, y, 0)
    return y, ignored, valid, safe


@triton.jit
def row_max_sumexp(row_ptr, stride_col, C, inv_temp, BLOCK_C: tl.constexpr):
    """Online max ``mx`` of a row's ``x_k`` and ``s = sum_k exp((x_k - mx) * inv_temp)``.

    The max is tracked in logit units, so each exponent is a difference of two logits times
    ``inv_temp``. A chunk that raises the max rescales ``s`` by ``exp((mx_old - mx_new) * inv_temp)``.
    Masked lanes load ``-inf`` and contribute 0; a row of ``-inf`` keeps ``mx = -inf`` and ``s = 0``.
    NaN or ``+inf`` in the row makes ``s`` NaN.
    """
    mx = float("-inf")
    s = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        x = tl.load(row_ptr + cols * stride_col, mask=cols < C, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(mx, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp((mx - shift) * inv_temp) + tl.sum(tl.exp((x - shift) * inv_temp), axis=0)
        mx = m_new
    return mx, s


@triton.jit
def row_max_sumexp_argmax(row_ptr, stride_col, C, BLOCK_C: tl.constexpr):
    """``row_max_sumexp`` (at temperature 1) plus ``arg``, the lowest column holding the row maximum.

    Within a chunk the lowest column equal to the chunk maximum is taken; across chunks a later
    chunk replaces ``arg`` only when its maximum is strictly larger, so ties resolve to the lowest
    index. An all ``-inf`` row keeps ``arg = 0``; with NaN in the row ``s`` is NaN and ``arg`` is some
    column in [0, C) (the row's results are NaN whatever it is).
    """
    mx = float("-inf")
    s = 0.0
    arg = tl.full([], 0, tl.int64)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        x = tl.load(row_ptr + cols * stride_col, mask=cols < C, other=float("-inf")).to(tl.float32)
        chunk_max = tl.max(x, axis=0)
        chunk_arg = tl.min(tl.where(x == chunk_max, cols, C), axis=0)
        arg = tl.where((chunk_max > mx) & (chunk_arg < C), chunk_arg, arg)
        m_new = tl.maximum(mx, chunk_max)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(mx - shift) + tl.sum(tl.exp(x - shift), axis=0)
        mx = m_new
    return mx, s, arg


@triton.jit
def store_softmax_grad(row_ptr, stride_col, out_ptr, stride_out_col, C, y, m, s, g, ignored,
                       BLOCK_C: tl.constexpr):
    """Write ``g * (p_k - [k == y])`` for every column k of a row, the cross-entropy gradient, with
    ``p_k = exp(x_k - m) / s`` recomputed from the max ``m`` and sum of exponentials ``s`` the
    forward saved. An ignored row gets exact zeros (even when it holds NaN); callers make ``g`` NaN
    for invalid labels."""
    inv_s = 1.0 / s
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < C
        x = tl.load(row_ptr + cols * stride_col, mask=mask, other=0.0).to(tl.float32)
        d = g * (tl.exp(x - m) * inv_s - tl.where(cols == y, 1.0, 0.0))
        d = tl.where(ignored, 0.0, d)
        tl.store(out_ptr + cols * stride_out_col, d.to(out_ptr.dtype.element_ty), mask=mask)

