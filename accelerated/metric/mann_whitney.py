"""Mann–Whitney loss and exact AUC (P46) as Triton kernels over positive x negative tiles.
See `twinops.reference.metric.mann_whitney` for the definition and the semantics.

Grid: one program per (query q, tile of BLOCK_P positives, split of the negatives). A program keeps
its BLOCK_P positives in registers and walks its share of the negatives BLOCK_N at a time; each
step forms the BLOCK_P x BLOCK_N margins in registers, so no (Q, P, N) pair tensor ever exists.
Per pair, in base 2 (x = z log2(e), with z = (s+ - s-) / tau):

    e = 2^(-|x|)                                                one exp2 (the only transcendental)
    softplus(-z) / ln 2 = max(-x, 0) + log2(1 + e)
    sigma(-z) = e / (1 + e) if x >= 0 else 1 / (1 + e)          one reciprocal, only for gradients

The log2(1 + e) terms are not taken pair by pair: each pair slot of the tile multiplies its factors
(1 + e) in [1, 2] over up to FLUSH = 64 steps and takes one log2 of the product, so the kernel
spends about one special-function instruction per pair (two with gradients), which is what bounds
it. The price is one rounding of a product per factor: an unbiased absolute error of about 6e-8 per
pair in the loss value (which the mean over pairs averages down), none in the gradients.

When the scores require gradients, the same pass also sums sigma(-z): per pair slot over the
negatives (d/ds+ = -sum_j sigma / tau, reduced once at the end) and every step over the positives
(d/ds- = +sum_i sigma / tau). The backward only scales those vectors by the upstream gradient: the
pairs are visited once per training step, not twice.

A one-program finish kernel turns the per-program partial sums and valid counts into the per-query
losses, the requested reduction, and d loss / d (pair sum of query q) for the backward: a forward is
two launches, a backward one per input that requires a gradient.

Extra memory (fp32, int32): per-program partials (Q x TILES_P x SPLITS), d/ds+ partials
(SPLITS, Q, P) with SPLITS <= 16, and d/ds- partials (TILES_P, Q, N) while TILES_P <= 4
(deterministic), else one (Q, N) buffer filled with fp32 atomic adds (P > 4 * BLOCK_P: the pooled
one-query form with many positives). The AUC kernel counts 2 [s+ > s-] + [s+ == s-] exactly in
integers (int32 per tile row, int64 per program), with the valid and NaN counts, and its finish
kernel divides once in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import REDUCTIONS, check_choice, check_real
from .. import _runtime as rt

__all__ = ["mann_whitney_loss", "mann_whitney_auc", "MannWhitneyLoss"]

HAS_TRITON_BACKWARD = True

NORMALIZATIONS = ("pairs", "positives")
AUC_REDUCTIONS = ("mean", "none")

LOG2E = 1.4426950408889634

# (BLOCK_P, BLOCK_N, num_warps) on the GPU: 32 pairs a thread; the sm_90 build of the loss kernel
# uses about 120 registers (170 with gradients), no spills, and per pair ~8 instructions, one of
# them on the special-function unit (~17 and two with gradients). Not yet tuned on a GPU.
# 16 x 16 under the interpreter so small shapes cross tiles.
GPU_TILES = (64, 64, 4)
INTERPRETER_TILES = (16, 16, 1)
FLUSH = 64  # tiles of (1 + e) factors multiplied before one log2: the product stays below 2^64
MAX_SPLITS = 16          # splits of the negatives per (query, positive tile)
MAX_DETERMINISTIC_TILES_P = 4  # above this many positive tiles, column sums use fp32 atomics


@triton.jit
def _mw_loss_kernel(
    pos_ptr, stride_pos_q, stride_pos_p,    # (Q, P) positive scores; (q, i) at q*stride_pos_q + i*stride_pos_p
    neg_ptr, stride_neg_q, stride_neg_n,    # (Q, N) negative scores (stride_neg_q may be 0: shared negatives)
    pmask_ptr, stride_pmask_q, stride_pmask_p,  # (Q, P) uint8 validity of the positives, read when HAS_PMASK
    nmask_ptr, stride_nmask_q, stride_nmask_n,  # (Q, N) uint8 validity of the negatives, read when HAS_NMASK
    loss_ptr,        # out (Q, TILES_P, SPLITS) fp32 contiguous: this program's sum of softplus(-z)
    stats_ptr,       # out (Q, TILES_P, SPLITS, 2) int32 contiguous: valid positives (split 0), negatives (tile 0)
    grad_pos_ptr,    # out (SPLITS, Q, P) fp32 contiguous: -sum_j sigma(-z) / tau over this split (GRAD_POS)
    grad_neg_ptr,    # out (TILES_P, Q, N) fp32 contiguous, or (Q, N) zero-filled with ATOMIC_NEG (GRAD_NEG)
    Q, P, N, n_per_split,                   # n_per_split: negatives per split, a multiple of BLOCK_N
    scale2, inv_tau,                        # log2(e) / tau and 1 / tau
    HAS_PMASK: tl.constexpr, HAS_NMASK: tl.constexpr, PAIR_MASK: tl.constexpr,
    GRAD_POS: tl.constexpr, GRAD_NEG: tl.constexpr, ATOMIC_NEG: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, FLUSH: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    tile_p = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    tiles_p = tl.num_programs(1).to(tl.int64)
    splits = tl.num_programs(2).to(tl.int64)

    rows = tile_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < P  # valid positives: in range and not masked out
    if HAS_PMASK:
        row_ok &= tl.load(pmask_ptr + q * stride_pmask_q + rows * stride_pmask_p, mask=row_ok, other=0) != 0
    p = tl.load(pos_ptr + q * stride_pos_q + rows * stride_pos_p, mask=row_ok, other=0.0).to(tl.float32)
    # Tiles are [BLOCK_P, BLOCK_N], negatives along the fast axis (one load per thread and step).
    # The one reduction made every step, over the positives for d/ds-, runs along axis 0, which the
    # compiler's layout keeps mostly inside each thread. Everything else accumulates per pair slot
    # and is reduced once at the end:
    #   acc     softplus(-z) / ln 2: max(-x, 0) every step and, every FLUSH steps, log2 of
    #   prod    the running product of the factors (1 + e), each in [1, 2], so below 2^FLUSH:
    #           one log2 per FLUSH pairs instead of one per pair;
    #   sig     sigma(-z), summed over the negatives for d/ds+.
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    sig = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    valid_neg = tl.zeros([BLOCK_N], dtype=tl.int32)  # per lane, reduced once at the end

    n_begin = split * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    for chunk in range(n_begin, n_end, FLUSH * BLOCK_N):
        prod = tl.full([BLOCK_P, BLOCK_N], 1.0, dtype=tl.float32)
        for start in range(chunk, tl.minimum(chunk + FLUSH * BLOCK_N, n_end), BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = cols < n_end
            if HAS_NMASK:
                col_ok &= tl.load(nmask_ptr + q * stride_nmask_q + cols * stride_nmask_n, mask=col_ok, other=0) != 0
            n = tl.load(neg_ptr + q * stride_neg_q + cols * stride_neg_n, mask=col_ok, other=0.0).to(tl.float32)
            valid_neg += col_ok.to(tl.int32)
            # x = z * log2(e). Invalid pairs get x = +inf: softplus(-z) = 0 and sigma(-z) = 0 there.
            x = (p[:, None] - n[None, :]) * scale2
            if PAIR_MASK:
                x = tl.where(row_ok[:, None] & col_ok[None, :], x, float("inf"))
            e = tl.exp2(-tl.abs(x))
            u = 1.0 + e
            prod = prod * u
            acc -= tl.minimum(x, 0.0)  # max(-x, 0)
            if GRAD_POS or GRAD_NEG:
                sigma = tl.fdiv(tl.where(x >= 0, e, 1.0), u)  # sigma(-z); NaN stays NaN
                if GRAD_POS:
                    sig += sigma
                if GRAD_NEG:
                    col = tl.sum(sigma, axis=0) * inv_tau
                    in_range = cols < n_end
                    if ATOMIC_NEG:
                        tl.atomic_add(grad_neg_ptr + q * N + cols, col, mask=in_range)
                    else:
                        tl.store(grad_neg_ptr + (tile_p * Q + q) * N + cols, col, mask=in_range)
        acc += tl.log2(prod)

    program = (q * tiles_p + tile_p) * splits + split
    tl.store(loss_ptr + program, tl.sum(acc) * 0.6931471805599453)
    # Each count once per query: positives by the split-0 programs, negatives by the tile-0 ones.
    if split == 0:
        tl.store(stats_ptr + program * 2, tl.sum(row_ok.to(tl.int32)))
    else:
        tl.store(stats_ptr + program * 2, 0)
    if tile_p == 0:
        tl.store(stats_ptr + program * 2 + 1, tl.sum(valid_neg))
    else:
        tl.store(stats_ptr + program * 2 + 1, 0)
    if GRAD_POS:
        tl.store(grad_pos_ptr + (split * Q + q) * P + rows, -tl.sum(sig, axis=1) * inv_tau, mask=rows < P)


@triton.jit
def _mw_auc_kernel(
    pos_ptr, stride_pos_q, stride_pos_p,    # (Q, P) positive scores, as in _mw_loss_kernel
    neg_ptr, stride_neg_q, stride_neg_n,    # (Q, N) negative scores
    pmask_ptr, stride_pmask_q, stride_pmask_p,
    nmask_ptr, stride_nmask_q, stride_nmask_n,
    count_ptr,       # out (Q, TILES_P, SPLITS) int64 contiguous: sum of 2*[s+ > s-] + [s+ == s-]
    stats_ptr,       # out (Q, TILES_P, SPLITS, 4) int32 contiguous: valid and NaN positives (split 0),
                     #     valid and NaN negatives (tile 0)
    P, N, n_per_split,
    HAS_PMASK: tl.constexpr, HAS_NMASK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    tile_p = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    tiles_p = tl.num_programs(1).to(tl.int64)
    splits = tl.num_programs(2).to(tl.int64)

    rows = tile_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < P  # valid positives: in range and not masked out
    if HAS_PMASK:
        row_ok &= tl.load(pmask_ptr + q * stride_pmask_q + rows * stride_pmask_p, mask=row_ok, other=0) != 0
    p = tl.load(pos_ptr + q * stride_pos_q + rows * stride_pos_p, mask=row_ok, other=0.0).to(tl.float32)
    counts = tl.zeros([BLOCK_P], dtype=tl.int64)
    valid_neg = tl.zeros([BLOCK_N], dtype=tl.int32)  # per lane, reduced once at the end
    nan_neg = tl.zeros([BLOCK_N], dtype=tl.int32)
    n_begin = split * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    for start in range(n_begin, n_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < n_end
        if HAS_NMASK:
            col_ok &= tl.load(nmask_ptr + q * stride_nmask_q + cols * stride_nmask_n, mask=col_ok, other=0) != 0
        n = tl.load(neg_ptr + q * stride_neg_q + cols * stride_neg_n, mask=col_ok, other=0.0).to(tl.float32)
        valid_neg += col_ok.to(tl.int32)
        nan_neg += (col_ok & (n != n)).to(tl.int32)
        ok = row_ok[:, None] & col_ok[None, :]
        a, b = p[:, None], n[None, :]
        twice = tl.where(ok & (a > b), 2, 0) + tl.where(ok & (a == b), 1, 0)  # int32, at most 2*BLOCK_N a row
        counts += tl.sum(twice, axis=1).to(tl.int64)
    program = (q * tiles_p + tile_p) * splits + split
    tl.store(count_ptr + program, tl.sum(counts))
    # Each count once per query: positives by the split-0 programs, negatives by the tile-0 ones.
    if split == 0:
        tl.store(stats_ptr + program * 4, tl.sum(row_ok.to(tl.int32)))
        tl.store(stats_ptr + program * 4 + 1, tl.sum((row_ok & (p != p)).to(tl.int32)))
    else:
        tl.store(stats_ptr + program * 4, 0)
        tl.store(stats_ptr + program * 4 + 1, 0)
    if tile_p == 0:
        tl.store(stats_ptr + program * 4 + 2, tl.sum(valid_neg))
        tl.store(stats_ptr + program * 4 + 3, tl.sum(nan_neg))
    else:
        tl.store(stats_ptr + program * 4 + 2, 0)
        tl.store(stats_ptr + program * 4 + 3, 0)


@triton.jit
def _mw_loss_finish_kernel(
    part_ptr,      # (Q, PARTS) fp32 contiguous: the pair kernel's per-program loss sums, PARTS = TILES_P * SPLITS
    stats_ptr,     # (Q, PARTS, 2) int32 contiguous: the pair kernel's valid counts
    out_ptr,       # out, in the scores' dtype: (Q,) losses (REDUCTION 0) or the sum / mean (one element)
    weight_ptr,    # out (Q,) fp32: d out / d (pair sum of query q), i.e. c_q, divided by K for the mean
    Q, PARTS,
    BY_PAIRS: tl.constexpr, REDUCTION: tl.constexpr,  # REDUCTION: 0 "none", 1 "sum", 2 "mean"
    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program walks the queries BLOCK_Q at a time, and their partials BLOCK_T at a time.
    total = tl.zeros([BLOCK_Q], dtype=tl.float32)
    with_pairs = tl.zeros([BLOCK_Q], dtype=tl.int32)
    for q0 in range(0, Q, BLOCK_Q):
        qs = q0 + tl.arange(0, BLOCK_Q).to(tl.int64)
        q_ok = qs < Q
        pair_sum = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.float32)
        n_pos = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.int32)
        n_neg = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.int32)
        for t0 in range(0, PARTS, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = q_ok[:, None] & (t < PARTS)[None, :]
            at = qs[:, None] * PARTS + t[None, :]
            pair_sum += tl.load(part_ptr + at, mask=ok, other=0.0)
            n_pos += tl.load(stats_ptr + at * 2, mask=ok, other=0)
            n_neg += tl.load(stats_ptr + at * 2 + 1, mask=ok, other=0)
        pair_sum = tl.sum(pair_sum, axis=1)
        n_pos = tl.sum(n_pos, axis=1)
        n_neg = tl.sum(n_neg, axis=1)
        # c_q: 1 / (P_q N_q), or 1 / P_q (Eq. 3); 0 for a query without pairs.
        has_pairs = (n_pos > 0) & (n_neg > 0)
        if BY_PAIRS:
            denominator = n_pos.to(tl.float32) * n_neg.to(tl.float32)
        else:
            denominator = n_pos.to(tl.float32)
        c = tl.where(has_pairs, 1.0 / tl.where(has_pairs, denominator, 1.0), 0.0)
        loss = pair_sum * c
        if REDUCTION == 0:
            tl.store(out_ptr + qs, loss.to(out_ptr.dtype.element_ty), mask=q_ok)
        tl.store(weight_ptr + qs, c, mask=q_ok)
        total += tl.where(q_ok, loss, 0.0)
        with_pairs += (has_pairs & q_ok).to(tl.int32)
    if REDUCTION == 1:
        tl.store(out_ptr, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty))
    if REDUCTION == 2:
        k = tl.sum(with_pairs, axis=0)
        inv_k = 1.0 / tl.maximum(k, 1).to(tl.float32)
        mean = tl.where(k > 0, tl.sum(total, axis=0) * inv_k, float("nan"))  # no pairs anywhere: 0/0
        tl.store(out_ptr, mean.to(out_ptr.dtype.element_ty))
        tl.debug_barrier()
        for q0 in range(0, Q, BLOCK_Q):  # the mean's weights: c_q / K (each element re-read by its writer)
            qs = q0 + tl.arange(0, BLOCK_Q).to(tl.int64)
            q_ok = qs < Q
            tl.store(weight_ptr + qs, tl.load(weight_ptr + qs, mask=q_ok, other=0.0) * inv_k, mask=q_ok)


@triton.jit
def _mw_auc_finish_kernel(
    count_ptr,     # (Q, PARTS) int64 contiguous: the AUC kernel's per-program 2U counts
    stats_ptr,     # (Q, PARTS, 4) int32 contiguous: valid and NaN counts of positives and negatives
    out_ptr,       # out fp32: (Q,) AUCs (MEAN false) or their mean over queries with pairs (one element)
    Q, PARTS,
    MEAN: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
):
    total = tl.zeros([BLOCK_Q], dtype=tl.float64)
    with_pairs = tl.zeros([BLOCK_Q], dtype=tl.int32)
    for q0 in range(0, Q, BLOCK_Q):
        qs = q0 + tl.arange(0, BLOCK_Q).to(tl.int64)
        q_ok = qs < Q
        twice_u = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.int64)
        n_pos = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.int32)
        nan_pos = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.int32)
        n_neg = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.int32)
        nan_neg = tl.zeros([BLOCK_Q, BLOCK_T], dtype=tl.int32)
        for t0 in range(0, PARTS, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = q_ok[:, None] & (t < PARTS)[None, :]
            at = qs[:, None] * PARTS + t[None, :]
            twice_u += tl.load(count_ptr + at, mask=ok, other=0)
            n_pos += tl.load(stats_ptr + at * 4, mask=ok, other=0)
            nan_pos += tl.load(stats_ptr + at * 4 + 1, mask=ok, other=0)
            n_neg += tl.load(stats_ptr + at * 4 + 2, mask=ok, other=0)
            nan_neg += tl.load(stats_ptr + at * 4 + 3, mask=ok, other=0)
        twice_u = tl.sum(twice_u, axis=1)
        n_pos, nan_pos = tl.sum(n_pos, axis=1), tl.sum(nan_pos, axis=1)
        n_neg, nan_neg = tl.sum(n_neg, axis=1), tl.sum(nan_neg, axis=1)
        has_pairs = (n_pos > 0) & (n_neg > 0)
        pairs = tl.where(has_pairs, n_pos.to(tl.float64) * n_neg.to(tl.float64), 1.0)
        auc = twice_u.to(tl.float64) / (2.0 * pairs)  # one division of exact integers
        auc = tl.where(has_pairs & (nan_pos == 0) & (nan_neg == 0), auc, float("nan"))
        if not MEAN:
            tl.store(out_ptr + qs, auc.to(tl.float32), mask=q_ok)
        total += tl.where(has_pairs & q_ok, auc, 0.0)
        with_pairs += (has_pairs & q_ok).to(tl.int32)
    if MEAN:
        k = tl.sum(with_pairs, axis=0)
        mean = tl.sum(total, axis=0) / tl.maximum(k, 1).to(tl.float64)
        tl.store(out_ptr, tl.where(k > 0, mean, float("nan")).to(tl.float32))


@triton.jit
def _mw_grad_kernel(
    grad_ptr, stride_grad,    # upstream gradient of the output: (Q,) or a scalar (stride 0)
    weight_ptr,               # (Q,) fp32 from the finish kernel: d out / d (pair sum of q)
    src_ptr,                  # (PARTS, Q, K) fp32 contiguous: partial d(pair sum of q)/d score
    out_ptr, stride_out_q, stride_out_k,  # out (Q, K) in the scores' dtype
    Q, K, PARTS, BLOCK: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = cols < K
    g = tl.load(grad_ptr + q * stride_grad).to(tl.float32) * tl.load(weight_ptr + q)
    d = tl.zeros([BLOCK], dtype=tl.float32)
    for part in range(0, PARTS):
        d += tl.load(src_ptr + (part * Q + q) * K + cols, mask=mask, other=0.0)
    tl.store(out_ptr + q * stride_out_q + cols * stride_out_k, (g * d).to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ host


def _tiles():
    return INTERPRETER_TILES if rt.interpreting() else GPU_TILES


_SM_COUNT: dict = {}


def _target_programs(device: torch.device) -> int:
    """About 16 programs per SM: several resident at once and a short tail of the last wave."""
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return 16 * _SM_COUNT[device]


def _grid(q: int, p: int, n: int, device: torch.device):
    """(tiles_p, splits, n_per_split, launch kwargs): enough programs to fill the device, every split
    a whole number of BLOCK_N tiles (at least two splits under the interpreter, to test them)."""
    block_p, block_n, warps = _tiles()
    tiles_p = triton.cdiv(p, block_p)
    tiles_n = triton.cdiv(n, block_n)
    wanted = 2 if rt.interpreting() else triton.cdiv(_target_programs(device), q * tiles_p)
    per_split = triton.cdiv(tiles_n, max(1, min(wanted, MAX_SPLITS, tiles_n))) * block_n
    splits = triton.cdiv(n, per_split)
    return tiles_p, splits, per_split, dict(BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)


def _finish_launch() -> dict:
    return dict(BLOCK_Q=16, BLOCK_T=4, num_warps=1) if rt.interpreting() else dict(BLOCK_Q=256, BLOCK_T=16, num_warps=4)


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    if mask is None:
        return like, 0, 0, False
    m = mask.view(torch.uint8)  # a view: same storage and strides
    return m, m.stride(0), m.stride(1), True


def _score_args(pos, neg, pos_mask, neg_mask):
    pm, spm_q, spm_p, has_pm = _mask_args(pos_mask, pos)
    nm, snm_q, snm_n, has_nm = _mask_args(neg_mask, neg)
    args = (pos, pos.stride(0), pos.stride(1), neg, neg.stride(0), neg.stride(1), pm, spm_q, spm_p, nm, snm_q, snm_n)
    return args, has_pm, has_nm


_REDUCTION_CODE = {"none": 0, "sum": 1, "mean": 2}


@torch.library.custom_op("twinops::mann_whitney_loss", mutates_args=())
def _mw_loss(
    pos: torch.Tensor, neg: torch.Tensor, pos_mask: torch.Tensor | None, neg_mask: torch.Tensor | None,
    tau: float, normalization: str, reduction: str, grad_pos: bool, grad_neg: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss (in the scores' dtype), d loss / d (pair sum of each query) (Q,) fp32, and, when asked,
    the partial derivatives of the pair sums with respect to pos (SPLITS, Q, P) and neg (TILES_P, Q, N)
    or (1, Q, N), fp32 (empty tensors otherwise); the backward sums the partials."""
    q, p = pos.shape
    n = neg.shape[1]
    dev = pos.device
    tiles_p, splits, per_split, launch = _grid(q, p, n, dev)
    atomic = tiles_p > MAX_DETERMINISTIC_TILES_P
    f32 = dict(device=dev, dtype=torch.float32)
    part = torch.empty((q, tiles_p, splits), **f32)
    stats = torch.empty((q, tiles_p, splits, 2), device=dev, dtype=torch.int32)
    gpos = torch.empty((splits, q, p) if grad_pos else (0,), **f32)
    if not grad_neg:
        gneg = torch.empty((0,), **f32)
    else:
        gneg = torch.zeros((1, q, n), **f32) if atomic else torch.empty((tiles_p, q, n), **f32)
    args, has_pm, has_nm = _score_args(pos, neg, pos_mask, neg_mask)
    ragged = has_pm or has_nm or p % launch["BLOCK_P"] != 0 or n % launch["BLOCK_N"] != 0
    _mw_loss_kernel[(q, tiles_p, splits)](
        *args, part, stats, gpos, gneg, q, p, n, per_split, LOG2E / tau, 1.0 / tau,
        HAS_PMASK=has_pm, HAS_NMASK=has_nm, PAIR_MASK=ragged, FLUSH=FLUSH,
        GRAD_POS=grad_pos, GRAD_NEG=grad_neg, ATOMIC_NEG=atomic, **launch,
    )
    out = torch.empty((q,) if reduction == "none" else (), device=dev, dtype=pos.dtype)
    weight = torch.empty((q,), **f32)
    _mw_loss_finish_kernel[(1,)](
        part, stats, out, weight, q, tiles_p * splits,
        BY_PAIRS=normalization == "pairs", REDUCTION=_REDUCTION_CODE[reduction], **_finish_launch(),
    )
    return out, weight, gpos, gneg


@_mw_loss.register_fake
def _(pos, neg, pos_mask, neg_mask, tau, normalization, reduction, grad_pos, grad_neg):
    q, p = pos.shape
    n = neg.shape[1]
    tiles_p, splits, _, _ = _grid(q, p, n, pos.device)
    f32 = dict(dtype=torch.float32)
    neg_parts = 1 if tiles_p > MAX_DETERMINISTIC_TILES_P else tiles_p
    return (pos.new_empty((q,) if reduction == "none" else ()), pos.new_empty((q,), **f32),
            pos.new_empty((splits, q, p) if grad_pos else (0,), **f32),
            pos.new_empty((neg_parts, q, n) if grad_neg else (0,), **f32))


@torch.library.custom_op("twinops::mann_whitney_loss_backward", mutates_args=())
def _mw_loss_backward(grad: torch.Tensor, weight: torch.Tensor, parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad (x weight[q]) times the summed partials: the gradient of one input, in ``dtype``."""
    n_parts, q, k = parts.shape
    out = torch.empty((q, k), device=parts.device, dtype=dtype)
    block = 32 if rt.interpreting() else 1024
    stride = grad.stride(0) if grad.dim() == 1 else 0
    _mw_grad_kernel[(q, triton.cdiv(k, block))](grad, stride, weight, parts, out, out.stride(0), out.stride(1),
                                                q, k, n_parts, BLOCK=block)
    return out


@_mw_loss_backward.register_fake
def _(grad, weight, parts, dtype):
    return parts.new_empty(parts.shape[1:], dtype=dtype)


def _setup_context(ctx, inputs, output):
    pos, neg = inputs[0], inputs[1]
    ctx.save_for_backward(output[1], output[2], output[3])
    ctx.dtypes = (pos.dtype, neg.dtype)


def _backward(ctx, grad_out, _grad_weight, _grad_gpos, _grad_gneg):
    weight, gpos, gneg = ctx.saved_tensors
    grad_pos = grad_neg = None
    if ctx.needs_input_grad[0]:
        grad_pos = _mw_loss_backward(grad_out, weight, gpos, ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        grad_neg = _mw_loss_backward(grad_out, weight, gneg, ctx.dtypes[1])
    return grad_pos, grad_neg, None, None, None, None, None, None, None


_mw_loss.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("twinops::mann_whitney_auc", mutates_args=())
def _mw_auc(pos: torch.Tensor, neg: torch.Tensor, pos_mask: torch.Tensor | None,
            neg_mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-query AUC (Q,) or its mean over queries with pairs, fp32, from exact int64 counts."""
    q, p = pos.shape
    n = neg.shape[1]
    dev = pos.device
    tiles_p, splits, per_split, launch = _grid(q, p, n, dev)
    counts = torch.empty((q, tiles_p, splits), device=dev, dtype=torch.int64)
    stats = torch.empty((q, tiles_p, splits, 4), device=dev, dtype=torch.int32)
    args, has_pm, has_nm = _score_args(pos, neg, pos_mask, neg_mask)
    _mw_auc_kernel[(q, tiles_p, splits)](*args, counts, stats, p, n, per_split,
                                         HAS_PMASK=has_pm, HAS_NMASK=has_nm, **launch)
    out = torch.empty((q,) if reduction == "none" else (), device=dev, dtype=torch.float32)
    _mw_auc_finish_kernel[(1,)](counts, stats, out, q, tiles_p * splits, MEAN=reduction == "mean", **_finish_launch())
    return out


@_mw_auc.register_fake
def _(pos, neg, pos_mask, neg_mask, reduction):
    return pos.new_empty((pos.shape[0],) if reduction == "none" else (), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ API


def _check_inputs(pos, neg, pos_mask, neg_mask):
    """The reference's shape and type checks, on tensors (no device synchronisation)."""
    rt.check_float_tensor(pos, "pos", 2, "(Q, P)")
    rt.check_float_tensor(neg, "neg", 2, "(Q, N)")
    if neg.shape[0] != pos.shape[0]:
        raise ValueError(f"neg must have one row per query like pos ({pos.shape[0]}), got shape {tuple(neg.shape)}")
    if neg.dtype != pos.dtype:
        raise TypeError(f"neg must have the dtype of pos ({pos.dtype}), got {neg.dtype}")
    if min(pos.shape) == 0 or neg.shape[1] == 0:
        raise ValueError(f"empty input: pos has shape {tuple(pos.shape)} and neg has shape {tuple(neg.shape)}; "
                         "Q, P and N must all be >= 1")
    for mask, name, like in ((pos_mask, "pos_mask", pos), (neg_mask, "neg_mask", neg)):
        if mask is None:
            continue
        rt.check_tensor(mask, name)
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a boolean tensor (True = valid entry), got {mask.dtype}")
        if mask.shape != like.shape:
            raise ValueError(f"{name} must have shape {tuple(like.shape)} like {name[:3]}, got {tuple(mask.shape)}")
    rt.check_device(("pos", pos), ("neg", neg), ("pos_mask", pos_mask), ("neg_mask", neg_mask))


def mann_whitney_loss(pos, neg, pos_mask=None, neg_mask=None, *, tau=0.01, normalization="pairs",
                      reduction="mean"):
    """Mann–Whitney (MW) loss of P46 on the GPU: the logistic loss of every positive-minus-negative
    margin of each query, without forming the pairs in memory.

    Same arguments and semantics as `twinops.reference.metric.mann_whitney.mann_whitney_loss`;
    returns the scores' dtype. ``pos`` (Q, P) and ``neg`` (Q, N) may be non-contiguous views
    (``neg.expand(Q, N)`` for negatives shared by every query is read without a copy).
    """
    _check_inputs(pos, neg, pos_mask, neg_mask)
    tau = check_real(tau, "tau", low=0.0, low_open=True)
    check_choice(normalization, "normalization", NORMALIZATIONS)
    check_choice(reduction, "reduction", REDUCTIONS)
    grad_on = torch.is_grad_enabled()
    out, _, _, _ = _mw_loss(pos, neg, pos_mask, neg_mask, tau, normalization, reduction,
                            grad_on and pos.requires_grad, grad_on and neg.requires_grad)
    return out


def mann_whitney_auc(pos, neg, pos_mask=None, neg_mask=None, *, reduction="mean"):
    """Exact AUC of each query (Mann–Whitney U / (P N), ties one half) on the GPU; an evaluation
    metric without gradient.

    Same arguments and semantics as `twinops.reference.metric.mann_whitney.mann_whitney_auc`.
    Returns float32 whatever the scores' dtype (a 16-bit AUC would keep only 3 significant digits);
    the counts are exact integers, divided once in float64.
    """
    _check_inputs(pos, neg, pos_mask, neg_mask)
    check_choice(reduction, "reduction", AUC_REDUCTIONS)
    return _mw_auc(pos.detach(), neg.detach(), pos_mask, neg_mask, reduction)


class MannWhitneyLoss(torch.nn.Module):
    """``nn.Module`` form of `mann_whitney_loss`: ``loss = MannWhitneyLoss(tau=0.01)(pos, neg)``."""

    def __init__(self, *, tau=0.01, normalization="pairs", reduction="mean"):
        super().__init__()
        self.tau = check_real(tau, "tau", low=0.0, low_open=True)
        self.normalization = check_choice(normalization, "normalization", NORMALIZATIONS)
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)

    def forward(self, pos, neg, pos_mask=None, neg_mask=None):
        return mann_whitney_loss(pos, neg, pos_mask, neg_mask, tau=self.tau, normalization=self.normalization,
                                 reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, normalization={self.normalization!r}, reduction={self.reduction!r}"
