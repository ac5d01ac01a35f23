"""Mann–Whitney loss and exact AUC (P46) as Triton kernels over positive x negative tiles.
See `twinops.reference.metric.mann_whitney` for the definition and the semantics.

Grid: one program per (query q, tile of BLOCK_P positives, split of the negatives). A program keeps
its BLOCK_P positives in registers and walks its share of the negatives BLOCK_N at a time; each
step forms the BLOCK_P x BLOCK_N margins in registers and reduces them at once, so no (Q, P, N)
pair tensor ever exists. Per pair, in base 2 (x = z log2(e), with z = (s+ - s-) / tau):

    e = 2^(-|x|)                                                one exp2 (the only transcendental)
    softplus(-z) / ln 2 = max(-x, 0) + log2(1 + e)
    sigma(-z) = e / (1 + e) if x >= 0 else 1 / (1 + e)          one reciprocal, only for gradients

The log2(1 + e) terms are not taken pair by pair: each pair slot of the tile multiplies its factors
(1 + e) in [1, 2] over up to FLUSH = 64 steps and takes one log2 of the product, so the kernel
spends about one special-function instruction per pair (two with gradients), which is what bounds
it. The price is one rounding of a product per factor: an unbiased absolute error of about 6e-8 per
pair in the loss value (which the mean over pairs averages down), none in the gradients.

When the scores require gradients, the same pass also sums sigma(-z) along both tile axes: row
sums give d/ds+ = -sum_j sigma / tau, column sums d/ds- = +sum_i sigma / tau (for the unnormalised
per-query sum of pair losses). The backward then only scales those (Q, P) and (Q, N) vectors by the
per-query upstream gradient: the pairs are visited once per training step, not twice.

Extra memory (fp32): the per-program loss partials, row-sum partials (SPLITS, Q, P) with SPLITS <= 16,
and column-sum partials (TILES_P, Q, N) while TILES_P <= 4 (deterministic), else one (Q, N) buffer
filled with fp32 atomic adds (P > 4 * BLOCK_P: the pooled one-query form with many positives).
The AUC kernel counts 2 * [s+ > s-] + [s+ == s-] exactly in integers (int32 per tile row, int64 per
program) and the host divides once in float64.
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

# (BLOCK_P, BLOCK_N, num_warps) on the GPU: 32 pairs a thread keeps the per-pair temporaries in
# registers. 16 x 16 under the interpreter so small shapes cross tiles.
GPU_TILES = (64, 64, 4)
INTERPRETER_TILES = (16, 16, 1)
FLUSH = 64  # tiles of (1 + e) factors multiplied before one log2: the product stays below 2^64
MAX_SPLITS = 16          # splits of the negatives per (query, positive tile)
MAX_DETERMINISTIC_TILES_P = 4  # above this many positive tiles, column sums use fp32 atomics


@triton.jit
def _load_scores(ptr, stride_q, stride_k, mask_ptr, stride_mq, stride_mk, q, idx, limit, HAS_MASK: tl.constexpr):
    """Scores idx of query q as fp32, and which of them are valid (in range and not masked out)."""
    ok = idx < limit
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + q * stride_mq + idx * stride_mk, mask=ok, other=0) != 0)
    x = tl.load(ptr + q * stride_q + idx * stride_k, mask=ok, other=0.0).to(tl.float32)
    return x, ok


@triton.jit
def _mw_loss_kernel(
    pos_ptr, stride_pos_q, stride_pos_p,    # (Q, P) positive scores; (q, i) at q*stride_pos_q + i*stride_pos_p
    neg_ptr, stride_neg_q, stride_neg_n,    # (Q, N) negative scores (stride_neg_q may be 0: shared negatives)
    pmask_ptr, stride_pmask_q, stride_pmask_p,  # (Q, P) uint8 validity of the positives, read when HAS_PMASK
    nmask_ptr, stride_nmask_q, stride_nmask_n,  # (Q, N) uint8 validity of the negatives, read when HAS_NMASK
    loss_ptr,        # out (Q, TILES_P, SPLITS) fp32 contiguous: this program's sum of softplus(-z)
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
    p, row_ok = _load_scores(pos_ptr, stride_pos_q, stride_pos_p, pmask_ptr, stride_pmask_q, stride_pmask_p,
                             q, rows, P, HAS_PMASK)
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

    n_begin = split * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    for chunk in range(n_begin, n_end, FLUSH * BLOCK_N):
        prod = tl.full([BLOCK_P, BLOCK_N], 1.0, dtype=tl.float32)
        for start in range(chunk, tl.minimum(chunk + FLUSH * BLOCK_N, n_end), BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            n, col_ok = _load_scores(neg_ptr, stride_neg_q, stride_neg_n, nmask_ptr, stride_nmask_q,
                                     stride_nmask_n, q, cols, n_end, HAS_NMASK)
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

    loss = tl.sum(tl.sum(acc, axis=1), axis=0) * 0.6931471805599453
    tl.store(loss_ptr + (q * tiles_p + tile_p) * splits + split, loss)
    if GRAD_POS:
        tl.store(grad_pos_ptr + (split * Q + q) * P + rows, -tl.sum(sig, axis=1) * inv_tau, mask=rows < P)


@triton.jit
def _mw_auc_kernel(
    pos_ptr, stride_pos_q, stride_pos_p,    # (Q, P) positive scores, as in _mw_loss_kernel
    neg_ptr, stride_neg_q, stride_neg_n,    # (Q, N) negative scores
    pmask_ptr, stride_pmask_q, stride_pmask_p,
    nmask_ptr, stride_nmask_q, stride_nmask_n,
    count_ptr,       # out (Q, TILES_P, SPLITS) int64 contiguous: sum of 2*[s+ > s-] + [s+ == s-]
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
    p, row_ok = _load_scores(pos_ptr, stride_pos_q, stride_pos_p, pmask_ptr, stride_pmask_q, stride_pmask_p,
                             q, rows, P, HAS_PMASK)
    counts = tl.zeros([BLOCK_P], dtype=tl.int64)
    n_begin = split * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    for start in range(n_begin, n_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        n, col_ok = _load_scores(neg_ptr, stride_neg_q, stride_neg_n, nmask_ptr, stride_nmask_q, stride_nmask_n,
                                 q, cols, n_end, HAS_NMASK)
        ok = row_ok[:, None] & col_ok[None, :]
        a, b = p[:, None], n[None, :]
        twice = tl.where(ok & (a > b), 2, 0) + tl.where(ok & (a == b), 1, 0)  # int32, at most 2*BLOCK_N a row
        counts += tl.sum(twice, axis=1).to(tl.int64)
    tl.store(count_ptr + (q * tiles_p + tile_p) * splits + split, tl.sum(counts, axis=0))


@triton.jit
def _scale_rows_kernel(
    grad_ptr, stride_grad,    # (Q,) fp32 upstream gradient of the per-query pair sums
    src_ptr,                  # (Q, K) fp32 contiguous: d(pair sum of q)/d score, saved by the forward
    out_ptr, stride_out_q, stride_out_k,  # out (Q, K) in the scores' dtype
    K, BLOCK: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = cols < K
    g = tl.load(grad_ptr + q * stride_grad).to(tl.float32)
    d = tl.load(src_ptr + q * K + cols, mask=mask, other=0.0)
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


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    if mask is None:
        return like, 0, 0, False
    m = mask.view(torch.uint8)  # a view: same storage and strides
    return m, m.stride(0), m.stride(1), True


@torch.library.custom_op("twinops::mann_whitney_pair_sums", mutates_args=())
def _pair_sums(
    pos: torch.Tensor, neg: torch.Tensor, pos_mask: torch.Tensor | None, neg_mask: torch.Tensor | None,
    tau: float, grad_pos: bool, grad_neg: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: sum of softplus(-z) over valid pairs (Q,), and, when asked, its derivatives with
    respect to pos (Q, P) and neg (Q, N) in fp32 (empty tensors otherwise)."""
    q, p = pos.shape
    n = neg.shape[1]
    dev = pos.device
    tiles_p, splits, per_split, launch = _grid(q, p, n, dev)
    atomic = tiles_p > MAX_DETERMINISTIC_TILES_P
    loss = torch.empty((q, tiles_p, splits), device=dev, dtype=torch.float32)
    gpos = torch.empty((splits, q, p) if grad_pos else (0,), device=dev, dtype=torch.float32)
    if grad_neg:
        gneg = torch.zeros((1, q, n), device=dev, dtype=torch.float32) if atomic else \
            torch.empty((tiles_p, q, n), device=dev, dtype=torch.float32)
    else:
        gneg = torch.empty((0,), device=dev, dtype=torch.float32)
    pm, spm_q, spm_p, has_pm = _mask_args(pos_mask, pos)
    nm, snm_q, snm_n, has_nm = _mask_args(neg_mask, neg)
    _mw_loss_kernel[(q, tiles_p, splits)](
        pos, pos.stride(0), pos.stride(1), neg, neg.stride(0), neg.stride(1),
        pm, spm_q, spm_p, nm, snm_q, snm_n,
        loss, gpos, gneg, q, p, n, per_split, LOG2E / tau, 1.0 / tau,
        HAS_PMASK=has_pm, HAS_NMASK=has_nm, PAIR_MASK=has_pm or has_nm or p % launch["BLOCK_P"] != 0
        or n % launch["BLOCK_N"] != 0, FLUSH=FLUSH, GRAD_POS=grad_pos, GRAD_NEG=grad_neg, ATOMIC_NEG=atomic, **launch,
    )
    loss = loss.sum(dim=(1, 2))
    if grad_pos:
        gpos = gpos[0] if splits == 1 else gpos.sum(0)
    if grad_neg:
        gneg = gneg[0] if gneg.shape[0] == 1 else gneg.sum(0)
    return loss, gpos, gneg


@_pair_sums.register_fake
def _(pos, neg, pos_mask, neg_mask, tau, grad_pos, grad_neg):
    q, p = pos.shape
    n = neg.shape[1]
    f32 = dict(dtype=torch.float32)
    return (pos.new_empty((q,), **f32), pos.new_empty((q, p) if grad_pos else (0,), **f32),
            pos.new_empty((q, n) if grad_neg else (0,), **f32))


@torch.library.custom_op("twinops::mann_whitney_pair_sums_backward", mutates_args=())
def _pair_sums_backward(grad: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad[q] * saved[q, k] in ``dtype``: the VJP of the per-query pair sums for one input."""
    q, k = saved.shape
    out = torch.empty((q, k), device=saved.device, dtype=dtype)
    block = 1024 if not rt.interpreting() else 32
    _scale_rows_kernel[(q, triton.cdiv(k, block))](grad, grad.stride(0), saved, out, out.stride(0), out.stride(1),
                                                   k, BLOCK=block)
    return out


@_pair_sums_backward.register_fake
def _(grad, saved, dtype):
    return saved.new_empty(saved.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    pos, neg = inputs[0], inputs[1]
    ctx.save_for_backward(output[1], output[2])
    ctx.dtypes = (pos.dtype, neg.dtype)


def _backward(ctx, grad_loss, _grad_gpos, _grad_gneg):
    gpos, gneg = ctx.saved_tensors
    grad_pos = grad_neg = None
    if ctx.needs_input_grad[0]:
        grad_pos = _pair_sums_backward(grad_loss, gpos, ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        grad_neg = _pair_sums_backward(grad_loss, gneg, ctx.dtypes[1])
    return grad_pos, grad_neg, None, None, None, None, None


_pair_sums.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("twinops::mann_whitney_auc_counts", mutates_args=())
def _auc_counts(pos: torch.Tensor, neg: torch.Tensor, pos_mask: torch.Tensor | None,
                neg_mask: torch.Tensor | None) -> torch.Tensor:
    """Per query: the int64 doubled Mann–Whitney count 2U = 2 #[s+ > s-] + #[s+ == s-] over valid pairs."""
    q, p = pos.shape
    n = neg.shape[1]
    tiles_p, splits, per_split, launch = _grid(q, p, n, pos.device)
    counts = torch.empty((q, tiles_p, splits), device=pos.device, dtype=torch.int64)
    pm, spm_q, spm_p, has_pm = _mask_args(pos_mask, pos)
    nm, snm_q, snm_n, has_nm = _mask_args(neg_mask, neg)
    _mw_auc_kernel[(q, tiles_p, splits)](
        pos, pos.stride(0), pos.stride(1), neg, neg.stride(0), neg.stride(1),
        pm, spm_q, spm_p, nm, snm_q, snm_n, counts, p, n, per_split,
        HAS_PMASK=has_pm, HAS_NMASK=has_nm, **launch,
    )
    return counts.sum(dim=(1, 2))


@_auc_counts.register_fake
def _(pos, neg, pos_mask, neg_mask):
    return pos.new_empty((pos.shape[0],), dtype=torch.int64)


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


def _valid_counts(pos, neg, pos_mask, neg_mask):
    """(Q,) numbers of valid positives and negatives, as fp32 (exact below 2^24 per query)."""
    q, p = pos.shape
    n = neg.shape[1]
    n_pos = pos_mask.sum(1, dtype=torch.float32) if pos_mask is not None else pos.new_full((q,), p, dtype=torch.float32)
    n_neg = neg_mask.sum(1, dtype=torch.float32) if neg_mask is not None else pos.new_full((q,), n, dtype=torch.float32)
    return n_pos, n_neg


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
    sums, _, _ = _pair_sums(pos, neg, pos_mask, neg_mask, tau,
                            grad_on and pos.requires_grad, grad_on and neg.requires_grad)
    n_pos, n_neg = _valid_counts(pos, neg, pos_mask, neg_mask)
    has_pairs = (n_pos > 0) & (n_neg > 0)
    denom = n_pos * n_neg if normalization == "pairs" else n_pos
    c = torch.where(has_pairs, 1.0 / torch.where(has_pairs, denom, 1.0), 0.0)
    per_query = sums * c
    if reduction == "none":
        return per_query.to(pos.dtype)
    total = per_query.sum()
    if reduction == "sum":
        return total.to(pos.dtype)
    k = has_pairs.sum()
    mean = total / k.clamp(min=1)
    return torch.where(k > 0, mean, float("nan")).to(pos.dtype)


def mann_whitney_auc(pos, neg, pos_mask=None, neg_mask=None, *, reduction="mean"):
    """Exact AUC of each query (Mann–Whitney U / (P N), ties one half) on the GPU; an evaluation
    metric without gradient.

    Same arguments and semantics as `twinops.reference.metric.mann_whitney.mann_whitney_auc`.
    Returns float32 whatever the scores' dtype (a 16-bit AUC would keep only 3 significant digits);
    the counts are exact int64 and are divided once in float64.
    """
    _check_inputs(pos, neg, pos_mask, neg_mask)
    check_choice(reduction, "reduction", AUC_REDUCTIONS)
    pos, neg = pos.detach(), neg.detach()
    twice_u = _auc_counts(pos, neg, pos_mask, neg_mask)
    n_pos, n_neg = _valid_counts(pos, neg, pos_mask, neg_mask)
    has_pairs = (n_pos > 0) & (n_neg > 0)
    nan_pos = pos.isnan() if pos_mask is None else pos.isnan() & pos_mask
    nan_neg = neg.isnan() if neg_mask is None else neg.isnan() & neg_mask
    defined = has_pairs & ~(nan_pos.any(1) | nan_neg.any(1))
    pairs = n_pos.double() * n_neg.double()
    auc = twice_u.double() / (2.0 * torch.where(has_pairs, pairs, 1.0))
    auc = torch.where(defined, auc, float("nan"))
    if reduction == "none":
        return auc.float()
    k = has_pairs.sum()
    mean = torch.where(has_pairs, auc, 0.0).sum() / k.clamp(min=1)
    return torch.where(k > 0, mean, float("nan")).float()


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
