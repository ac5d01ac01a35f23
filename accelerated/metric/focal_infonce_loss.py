"""Focal InfoNCE (P31) as flash-attention-shaped Triton kernels: the (B, B + H) score matrix is
never stored. See `twinops.reference.metric.focal_infonce_loss` for the definition.

Candidates are the B positives (in-batch negatives for every other query) followed by the H hard
negatives; they live in two tensors and every kernel walks them as two sweeps of the same code
(``HAS_DIAG`` marks the positives' sweep, where column i of row i is query i's own positive).

Forward, one program per block of BLOCK_M queries:
    for each BLOCK_N tile of candidates:  S = Q C^T / tau   (tl.dot over BLOCK_D slices of D)
        online max m_i, and s_off_i = sum_{j != i} exp(S_ij - m_i); S_ii picked from its tile
    u_i = (m_i - S_ii) + log1p(expm1(S_ii - m_i) + s_off_i)        (-log p_i, exact as p_i -> 1)
    loss_i = (1 - p_i)^gamma u_i,  coef_i = (1 - p_i)^gamma (1 + gamma u_i / expm1(u_i))
    saves (m_i, s_i = s_off_i + exp(S_ii - m_i), coef_i): 12 bytes a query.
Backward, dS_ij = g_i coef_i (exp(S_ij - m_i) / s_i - [j = i]), recomputed tile by tile:
    row pass     (one program per query block):      dQ  = dS C / tau
    column pass  (one program per candidate block):  dC  = dS^T Q / tau   (positives, then negatives)
Work: five (B, B + H, D) GEMMs for forward + backward (the scores are recomputed twice), against
three for eager PyTorch, which instead writes and re-reads the (B, B + H) matrix several times.
Extra memory: the O(B) statistics, and fp32 accumulators of the gradients (O((B + H) D)); when D
fits one BLOCK_D slice (D <= 256 on the GPU) the accumulators live in registers until the end,
otherwise they are updated in global memory one slice per tile.
Gradient dots: dS is cast to bf16 for bf16 inputs (as flash-attention does), kept in fp32 otherwise.

A non-finite score in a row (a NaN or inf in the query or in any candidate) makes that row's loss
NaN and stores m_i = NaN, so the backward turns the row's gradient terms into NaN as the
reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_bool, check_real
from .. import _runtime as rt
from .._triton_math import expm1, log1p

__all__ = ["focal_infonce_loss", "FocalInfoNCELoss"]

HAS_TRITON_BACKWARD = True

# Tiles on the GPU (queries x candidates x feature slice); untuned guesses pending a GPU sweep.
GPU_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=3)
INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16)
GPU_ONE_CHUNK_MAX = 256  # widest D whose backward accumulators (BLOCK x D fp32) stay in registers


def _tiles() -> dict:
    return dict(INTERPRETER_TILES) if rt.interpreting() else dict(GPU_TILES)


# ---------------------------------------------------------------------------------------------- helpers


@triton.jit
def _score_tile(
    q_ptr, stride_qb, stride_qd, rows, row_mask,  # query rows `rows` (BLOCK_M,) of the (B, D) queries
    c_ptr, stride_cb, stride_cd, cols, col_mask,  # candidate rows `cols` (BLOCK_N,) of an (N, D) tensor
    D, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """S = Q[rows] C[cols]^T / tau as a (BLOCK_M, BLOCK_N) fp32 tile; out-of-range rows/cols score 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = ds < D
        q = tl.load(q_ptr + rows[:, None] * stride_qb + ds[None, :] * stride_qd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        c_t = tl.load(c_ptr + cols[None, :] * stride_cb + ds[:, None] * stride_cd,  # (BLOCK_D, BLOCK_N) = C^T slice
                      mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(q, c_t, acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.jit
def _lse_sweep(
    q_ptr, stride_qb, stride_qd, rows, row_mask,
    c_ptr, stride_cb, stride_cd, N,  # one candidate set: (N, D) positives (N = B) or hard negatives (N = H)
    m, s_off, diag, bad,             # running row max, sum of exp(S_ij - m) over j != i, S_ii, non-finite count
    D, inv_temp,
    HAS_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold one candidate set into the online log-sum-exp of each query row."""
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < N
        s = _score_tile(q_ptr, stride_qb, stride_qd, rows, row_mask, c_ptr, stride_cb, stride_cd, cols, col_mask,
                        D, inv_temp, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        finite = (s == s) & (tl.abs(s) < float("inf"))
        bad += tl.sum(tl.where(col_mask[None, :] & ~finite, 1, 0), axis=1)
        s = tl.where(col_mask[None, :] & finite, s, float("-inf"))
        keep = col_mask[None, :]
        if HAS_DIAG:
            is_diag = cols[None, :] == rows[:, None]
            diag += tl.sum(tl.where(is_diag, s, 0.0), axis=1)
            keep = keep & ~is_diag
        m_new = tl.maximum(m, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_off = s_off * tl.exp(m - shift) + tl.sum(tl.where(keep, tl.exp(s - shift[:, None]), 0.0), axis=1)
        m = m_new
    return m, s_off, diag, bad


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _focal_infonce_forward_kernel(
    q_ptr, stride_qb, stride_qd,      # (B, D) queries
    pos_ptr, stride_pb, stride_pd,    # (B, D) positives: candidate j < B
    neg_ptr, stride_nb, stride_nd,    # (H, D) hard negatives: candidate B + k
    loss_ptr,                         # out (B,) fp32 per-query losses
    stats_ptr,                        # out (B, 3) fp32 contiguous: m_i, s_i, coef_i (backward's inputs)
    B, H, D, inv_temp, gamma,
    DETACH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < B

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_off = tl.zeros((BLOCK_M,), tl.float32)
    diag = tl.zeros((BLOCK_M,), tl.float32)
    bad = tl.zeros((BLOCK_M,), tl.int32)
    m, s_off, diag, bad = _lse_sweep(q_ptr, stride_qb, stride_qd, rows, row_mask, pos_ptr, stride_pb, stride_pd, B,
                                     m, s_off, diag, bad, D, inv_temp, True, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    m, s_off, diag, bad = _lse_sweep(q_ptr, stride_qb, stride_qd, rows, row_mask, neg_ptr, stride_nb, stride_nd, H,
                                     m, s_off, diag, bad, D, inv_temp, False, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)

    # u = -log p = lse - S_ii = (m - S_ii) + log(exp(S_ii - m) + s_off); log1p/expm1 keep p ~ 1 exact.
    t = diag - m
    u = -t + log1p(expm1(t) + s_off)
    u = tl.maximum(u, 0.0)
    one_minus_p = -expm1(-u)
    weight = tl.where(gamma == 0.0, 1.0, tl.exp(gamma * tl.log(one_minus_p)))  # (1 - p)^gamma, 0^0 = 1
    loss = weight * u
    if DETACH:
        coef = weight
    else:
        ratio = tl.where(u == 0.0, 1.0, u / expm1(u))  # u / (e^u - 1) = p (-log p) / (1 - p); 0 once e^u overflows
        coef = weight * (1.0 + gamma * ratio)
    invalid = bad > 0
    tl.store(loss_ptr + rows, tl.where(invalid, float("nan"), loss), mask=row_mask)
    tl.store(stats_ptr + rows * 3, tl.where(invalid, float("nan"), m), mask=row_mask)
    tl.store(stats_ptr + rows * 3 + 1, s_off + tl.exp(t), mask=row_mask)
    tl.store(stats_ptr + rows * 3 + 2, tl.where(invalid, float("nan"), coef), mask=row_mask)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def _ds_tile(s, rows, row_mask, cols, col_mask, stats_ptr, grad_ptr, stride_g, HAS_DIAG: tl.constexpr):
    """dS = g_i coef_i (exp(S - m_i) / s_i - [j = i]) for a recomputed score tile; 0 outside the
    matrix. A NaN m_i (a row with a non-finite score) makes the whole row NaN."""
    m = tl.load(stats_ptr + rows * 3, mask=row_mask, other=0.0)
    inv_s = 1.0 / tl.load(stats_ptr + rows * 3 + 1, mask=row_mask, other=1.0)
    g = tl.load(grad_ptr + rows * stride_g, mask=row_mask, other=0.0).to(tl.float32)
    g = g * tl.load(stats_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
    p = tl.exp(s - m[:, None]) * inv_s[:, None]
    if HAS_DIAG:
        p = p - tl.where(cols[None, :] == rows[:, None], 1.0, 0.0)
    return tl.where(row_mask[:, None] & col_mask[None, :], g[:, None] * p, 0.0)


@triton.jit
def _accumulate(acc, acc_ptr, out_rows, out_mask, ds, x_ptr, stride_xb, stride_xd, x_rows, x_mask, D,
                DS_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                ONE_CHUNK: tl.constexpr):
    """acc += ds @ X[x_rows] for a (BLOCK_R, BLOCK_K) coefficient tile ``ds`` and rows of an (N, D) input X.

    ONE_CHUNK (D <= BLOCK_D): the (BLOCK_R, BLOCK_D) fp32 accumulator lives in registers (``acc``).
    Otherwise it is too wide for registers (D = 1024) and lives in the zero-initialised fp32 buffer
    ``acc_ptr`` (row r at r * D; L2-resident, only this program's rows), one BLOCK_D slice at a time.
    """
    if ONE_CHUNK:
        dcols = tl.arange(0, BLOCK_D).to(tl.int64)
        x = tl.load(x_ptr + x_rows[:, None] * stride_xb + dcols[None, :] * stride_xd,
                    mask=x_mask[:, None] & (dcols < D)[None, :], other=0.0).to(DS_DTYPE)
        acc = tl.dot(ds, x, acc, input_precision=GRAD_PRECISION)
    else:
        for d0 in range(0, D, BLOCK_D):
            dcols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = dcols < D
            x = tl.load(x_ptr + x_rows[:, None] * stride_xb + dcols[None, :] * stride_xd,
                        mask=x_mask[:, None] & d_mask[None, :], other=0.0).to(DS_DTYPE)
            out = acc_ptr + out_rows[:, None] * D + dcols[None, :]
            out_mask2 = out_mask[:, None] & d_mask[None, :]
            partial = tl.load(out, mask=out_mask2, other=0.0)
            partial = tl.dot(ds, x, partial, input_precision=GRAD_PRECISION)
            tl.store(out, partial, mask=out_mask2)
    return acc


@triton.jit
def _store_accumulator(acc, acc_ptr, out_rows, out_mask, D, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """Write a register accumulator (ONE_CHUNK) to the fp32 buffer; the chunked path already did."""
    if ONE_CHUNK:
        dcols = tl.arange(0, BLOCK_D).to(tl.int64)
        tl.store(acc_ptr + out_rows[:, None] * D + dcols[None, :], acc,
                 mask=out_mask[:, None] & (dcols < D)[None, :])


@triton.jit
def _dq_sweep(
    q_ptr, stride_qb, stride_qd, rows, row_mask,
    c_ptr, stride_cb, stride_cd, N,   # one candidate set, as in _lse_sweep
    stats_ptr, grad_ptr, stride_g,
    acc, acc_ptr,                     # accumulator of sum_j dS_ij c_j for this block's rows (see _accumulate)
    D, inv_temp,
    HAS_DIAG: tl.constexpr, DS_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < N
        s = _score_tile(q_ptr, stride_qb, stride_qd, rows, row_mask, c_ptr, stride_cb, stride_cd, cols, col_mask,
                        D, inv_temp, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        ds = _ds_tile(s, rows, row_mask, cols, col_mask, stats_ptr, grad_ptr, stride_g, HAS_DIAG).to(DS_DTYPE)
        acc = _accumulate(acc, acc_ptr, rows, row_mask, ds, c_ptr, stride_cb, stride_cd, cols, col_mask, D,
                          DS_DTYPE, GRAD_PRECISION, BLOCK_D, ONE_CHUNK)
    return acc


@triton.jit
def _focal_infonce_dq_kernel(
    q_ptr, stride_qb, stride_qd,      # (B, D) queries
    pos_ptr, stride_pb, stride_pd,    # (B, D) positives
    neg_ptr, stride_nb, stride_nd,    # (H, D) hard negatives
    stats_ptr,                        # (B, 3) fp32 from the forward: m_i, s_i, coef_i
    grad_ptr, stride_g,               # (B,) upstream gradient of the per-query losses (stride 0 if broadcast)
    acc_ptr,                          # out (B, D) fp32 contiguous, zero-initialised: sum_j dS_ij c_j (dQ = acc / tau)
    B, H, D, inv_temp,
    DS_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Row pass: one program per block of queries sweeps every candidate."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < B
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc = _dq_sweep(q_ptr, stride_qb, stride_qd, rows, row_mask, pos_ptr, stride_pb, stride_pd, B, stats_ptr,
                    grad_ptr, stride_g, acc, acc_ptr, D, inv_temp, True, DS_DTYPE, GRAD_PRECISION, ONE_CHUNK,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    acc = _dq_sweep(q_ptr, stride_qb, stride_qd, rows, row_mask, neg_ptr, stride_nb, stride_nd, H, stats_ptr,
                    grad_ptr, stride_g, acc, acc_ptr, D, inv_temp, False, DS_DTYPE, GRAD_PRECISION, ONE_CHUNK,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    _store_accumulator(acc, acc_ptr, rows, row_mask, D, BLOCK_D, ONE_CHUNK)


@triton.jit
def _focal_infonce_dc_kernel(
    q_ptr, stride_qb, stride_qd,      # (B, D) queries
    c_ptr, stride_cb, stride_cd,      # (N, D) one candidate set: the positives (HAS_DIAG) or the hard negatives
    stats_ptr,                        # (B, 3) fp32 from the forward
    grad_ptr, stride_g,               # (B,) upstream gradient of the per-query losses
    acc_ptr,                          # out (N, D) fp32 contiguous, zero-initialised: sum_i dS_ij q_i (dC = acc / tau)
    B, N, D, inv_temp,
    HAS_DIAG: tl.constexpr, DS_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Column pass (flash-attention's dK/dV loop): one program per block of candidates sweeps every query."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, B, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < B
        s = _score_tile(q_ptr, stride_qb, stride_qd, rows, row_mask, c_ptr, stride_cb, stride_cd, cols, col_mask,
                        D, inv_temp, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        ds_t = tl.trans(_ds_tile(s, rows, row_mask, cols, col_mask, stats_ptr, grad_ptr, stride_g, HAS_DIAG))
        acc = _accumulate(acc, acc_ptr, cols, col_mask, ds_t.to(DS_DTYPE), q_ptr, stride_qb, stride_qd, rows,
                          row_mask, D, DS_DTYPE, GRAD_PRECISION, BLOCK_D, ONE_CHUNK)
    _store_accumulator(acc, acc_ptr, cols, col_mask, D, BLOCK_D, ONE_CHUNK)


# ---------------------------------------------------------------------------------------------- host


def _dot_settings(dtype: torch.dtype) -> dict:
    """Score tiles multiply the inputs as they are (16-bit products are exact in fp32). The gradient
    dots multiply dS by candidate or query slices: in bf16 for bf16 inputs (bf16 keeps fp32's range,
    as flash-attention does), in fp32 otherwise, because dS = g coef P can be far below fp16's
    smallest normal (a mean over 65536 queries times a probability of 1e-5)."""
    precision = rt.dot_precision(dtype)
    if dtype == torch.bfloat16:
        return dict(PRECISION=precision, DS_DTYPE=tl.bfloat16, GRAD_PRECISION=precision)
    grad_precision = rt.dot_precision(torch.float32) if dtype == torch.float32 else "tf32"
    return dict(PRECISION=precision, DS_DTYPE=tl.float32, GRAD_PRECISION=grad_precision)


def _kernel_kwargs(dtype: torch.dtype, d: int) -> tuple[dict, dict]:
    """Tiles, and the dot settings plus ONE_CHUNK (D fits one BLOCK_D slice: the backward keeps its
    accumulators in registers). On the GPU a D up to 256 is one slice."""
    tiles = _tiles()
    if not rt.interpreting() and d <= GPU_ONE_CHUNK_MAX:
        tiles["BLOCK_D"] = max(16, triton.next_power_of_2(d))
    dots = _dot_settings(dtype)
    dots["ONE_CHUNK"] = d <= tiles["BLOCK_D"]
    return tiles, dots


def _fp32_gamma(gamma: float) -> float:
    """gamma as the kernels evaluate it, in fp32: below 1e-30 it is 0 and above 1e30 it is 1e30.
    (1 - p)^gamma then differs from the exact power by less than the rounding of p itself."""
    return 0.0 if gamma < 1e-30 else min(gamma, 1e30)


@torch.library.custom_op("twinops::focal_infonce_loss_rows", mutates_args=())
def _focal_infonce_rows(
    query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
    temperature: float, gamma: float, detach_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, d = query.shape
    h = negatives.shape[0]
    loss = torch.empty(b, device=query.device, dtype=torch.float32)
    stats = torch.empty((b, 3), device=query.device, dtype=torch.float32)
    tiles, dots = _kernel_kwargs(query.dtype, d)
    grid = (triton.cdiv(b, tiles["BLOCK_M"]),)
    _focal_infonce_forward_kernel[grid](
        query, query.stride(0), query.stride(1),
        positive, positive.stride(0), positive.stride(1),
        negatives, negatives.stride(0), negatives.stride(1),
        loss, stats, b, h, d, 1.0 / temperature, _fp32_gamma(gamma),
        DETACH=detach_weight, PRECISION=dots["PRECISION"], **tiles,
    )
    return loss, stats


@_focal_infonce_rows.register_fake
def _(query, positive, negatives, temperature, gamma, detach_weight):
    b = query.shape[0]
    return query.new_empty(b, dtype=torch.float32), query.new_empty((b, 3), dtype=torch.float32)


@torch.library.custom_op("twinops::focal_infonce_loss_rows_backward", mutates_args=())
def _focal_infonce_rows_backward(
    grad_loss: torch.Tensor, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
    stats: torch.Tensor, temperature: float, need_query: bool, need_positive: bool, need_negatives: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, d = query.shape
    h = negatives.shape[0]
    tiles, dots = _kernel_kwargs(query.dtype, d)
    inv_temp = 1.0 / temperature
    qs, ps, ns = (query.stride(0), query.stride(1)), (positive.stride(0), positive.stride(1)), \
        (negatives.stride(0), negatives.stride(1))
    alloc = torch.empty if dots["ONE_CHUNK"] else torch.zeros  # the chunked path adds into its buffer
    # Gradients nobody asked for are distinct empty tensors (custom-op outputs must not alias).
    d_query, d_positive, d_negatives = query.new_empty(0), query.new_empty(0), query.new_empty(0)
    if need_query:
        acc = alloc((b, d), device=query.device, dtype=torch.float32)
        _focal_infonce_dq_kernel[(triton.cdiv(b, tiles["BLOCK_M"]),)](
            query, *qs, positive, *ps, negatives, *ns, stats, grad_loss, grad_loss.stride(0), acc,
            b, h, d, inv_temp, **dots, **tiles,
        )
        d_query = acc.mul_(inv_temp).to(query.dtype)
    for need, cand, strides, n, has_diag in ((need_positive, positive, ps, b, True),
                                             (need_negatives, negatives, ns, h, False)):
        if not need:
            continue
        acc = alloc((n, d), device=query.device, dtype=torch.float32)
        if n > 0:
            _focal_infonce_dc_kernel[(triton.cdiv(n, tiles["BLOCK_N"]),)](
                query, *qs, cand, *strides, stats, grad_loss, grad_loss.stride(0), acc,
                b, n, d, inv_temp, HAS_DIAG=has_diag, **dots, **tiles,
            )
        grad = acc.mul_(inv_temp).to(query.dtype)
        if has_diag:
            d_positive = grad
        else:
            d_negatives = grad
    return d_query, d_positive, d_negatives


@_focal_infonce_rows_backward.register_fake
def _(grad_loss, query, positive, negatives, stats, temperature, need_query, need_positive, need_negatives):
    def like(t, need):
        return t.new_empty(t.shape, dtype=query.dtype) if need else query.new_empty(0)

    return like(query, need_query), like(positive, need_positive), like(negatives, need_negatives)


def _setup_context(ctx, inputs, output):
    query, positive, negatives, temperature, gamma, detach_weight = inputs
    ctx.save_for_backward(query, positive, negatives, output[1])
    ctx.temperature = temperature


def _backward(ctx, grad_loss, grad_stats):
    query, positive, negatives, stats = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if not any(need):
        return None, None, None, None, None, None
    d_q, d_p, d_n = _focal_infonce_rows_backward(grad_loss, query, positive, negatives, stats, ctx.temperature,
                                                 *need)
    return (d_q if need[0] else None, d_p if need[1] else None, d_n if need[2] else None, None, None, None)


_focal_infonce_rows.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(query, positive, negatives):
    rt.check_float_tensor(query, "query", 2, "(B, D)")
    b, d = query.shape
    if b < 1:
        raise ValueError(f"query must hold at least one row (B >= 1), got shape {tuple(query.shape)}")
    if d < 1:
        raise ValueError(f"query must have at least one feature (D >= 1), got shape {tuple(query.shape)}")
    rt.check_float_tensor(positive, "positive", 2, "(B, D)")
    if positive.shape != query.shape:
        raise ValueError(f"positive must have the query's shape {tuple(query.shape)}, got {tuple(positive.shape)}")
    if positive.dtype != query.dtype:
        raise TypeError(f"positive must have the query's dtype {query.dtype}, got {positive.dtype}")
    if negatives is not None:
        rt.check_float_tensor(negatives, "negatives", 2, "(H, D)")
        if negatives.shape[1] != d:
            raise ValueError(f"negatives must have shape (H, {d}) to match query, got {tuple(negatives.shape)}")
        if negatives.dtype != query.dtype:
            raise TypeError(f"negatives must have the query's dtype {query.dtype}, got {negatives.dtype}")
    rt.check_device(("query", query), ("positive", positive), ("negatives", negatives))


def focal_infonce_loss(query, positive, negatives=None, *, temperature=0.01, gamma=1.0, detach_weight=False,
                       reduction="mean"):
    """Focal InfoNCE of P31 with in-batch negatives and shared hard negatives, on the GPU.

    Same arguments and semantics as `twinops.reference.metric.focal_infonce_loss`; returns the
    input dtype. Never forms the (B, B + H) score matrix: extra memory is O(B) forward and the
    gradients' fp32 accumulators backward.
    """
    _check_inputs(query, positive, negatives)
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    gamma = check_real(gamma, "gamma", low=0.0)
    detach_weight = check_bool(detach_weight, "detach_weight")
    rt.check_reduction(reduction)
    if negatives is None:
        negatives = query.new_empty((0, query.shape[1]))
    loss, _ = _focal_infonce_rows(query, positive, negatives, temperature, gamma, detach_weight)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.mean()
    return loss.to(query.dtype)


class FocalInfoNCELoss(torch.nn.Module):
    """``nn.Module`` form of `focal_infonce_loss`: ``loss_fn(query, positive, negatives=None)``."""

    def __init__(self, *, temperature=0.01, gamma=1.0, detach_weight=False, reduction="mean"):
        super().__init__()
        self.temperature, self.gamma, self.detach_weight, self.reduction = temperature, gamma, detach_weight, reduction

    def forward(self, query, positive, negatives=None):
        return focal_infonce_loss(query, positive, negatives, temperature=self.temperature, gamma=self.gamma,
                                  detach_weight=self.detach_weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, gamma={self.gamma}, detach_weight={self.detach_weight}, "
                f"reduction={self.reduction!r}")
