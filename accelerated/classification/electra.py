"""ELECTRA (P35) as Triton kernels: the generator's LM head, MLM loss and Gumbel-max sampler fused
so that the (M, V) logits are never stored, and the discriminator's RTD loss. See
`twinops.reference.classification.electra` for the definitions.

Generator, x (M, H) hidden states, W (V, H) LM head, logits h = x Wᵀ + b computed tile by tile:
  forward, one program per (BLOCK_M slots, vocabulary split), walking its split in BLOCK_V tiles;
      each logit tile is a K loop of tl.dot over H. Per slot it keeps the online max m and sum-exp s
      of the logits, the target logit h_t, and a running (value, index) argmax of h/T + g (g the
      Gumbel noise of u, lowest index on ties), and writes them per split (28 bytes a slot and
      split). The splits (about four programs per SM in all; two under the interpreter) keep the GPU
      busy when M / BLOCK_M is below the SM count. A short host merge (O(SPLIT x M) torch ops)
      combines them into the slot's loss term w (m - h_t + log s), its sample, and (m, s) for the
      backward.
  backward, with G = c (softmax(h) - onehot(t)) and c the slot's upstream gradient times w:
      dx kernel: one program per BLOCK_M slots walks the vocabulary, recomputes each logit tile and
          its G tile, and adds G W[tile] into its own rows of an fp32 (M, H) buffer;
      dW kernel: one program per BLOCK_V vocabulary rows walks the slots, recomputes each tile, adds
          Gᵀ x[tile] into its own rows of an fp32 dW accumulator and sums G over slots for db.
      Each program owns the rows it accumulates, so there are no atomics and the result is
      deterministic; the price is a second recompute (8 MVH FLOPs backward instead of 6 MVH) and
      fp32 accumulators read-modify-written per tile (a program's rows stay in L2). 16-bit inputs
      round G to the input dtype before the two gradient products (as flash-attention does with P);
      fp32 keeps G in fp32.
  Extra memory: forward, the (SPLIT, M) partial statistics and (M, 2) fp32 (m, s), a few MB at
  M = 8192; backward, besides the gradients themselves, the fp32 (M, H) dx accumulator (16-bit
  inputs; fp32 ones accumulate in place) and, for 16-bit weights, an fp32 dW accumulator of at most
  two waves of vocabulary rows (16896 on an H100), reused chunk after chunk of the vocabulary:
  O(M + M H + min(V, chunk) H), never O(M V). At M = 8192, H = 768 that is 77 MB, 15% (V = 30522)
  and 3.7% (V = 128256) of the bf16 (M, V) logits the eager version stores.
  The noise u (M, V) is an input, read once by the forward. A counter-based generator (Philox of
  (seed, slot, token)) inside the kernel would remove that read and the (M, V) allocation; it is a
  follow-up, and the explicit-noise form stays as the testable contract. The samples carry no
  gradient.

RTD loss, z (B, L): an elementwise kernel writes the masked per-token terms a (softplus(z) - y z)
  in fp32 and the host sums them (mean: divided by sum(a) + 1e-6); the backward kernel writes
  dz = g a (sigmoid(z) - y) elementwise, honouring a per-token upstream gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_bool, check_real
from .. import _runtime as rt
from .._triton_math import log1p

__all__ = ["electra_generator_sample", "ElectraGeneratorSample", "rtd_loss", "RTDLoss"]

HAS_TRITON_BACKWARD = True

EPS = 1e-6
GUMBEL_EPS = tl.constexpr(1e-9)  # constants read inside kernels must be constexpr globals
DISALLOW_PENALTY = tl.constexpr(1000.0)

# Starting points pending a GPU sweep (tl.dot tiles; BLOCK_K is the H chunk of every product),
# chosen so that ptxas (sm_90a) reports no or a few bytes of register spills at 8 warps; fp32 (exact
# or TF32 products) needs narrower tiles than 16-bit inputs. The interpreter uses 16-wide tiles so
# small test shapes cross tile boundaries.
GPU_TILES = {
    "16bit": {
        "forward": dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
        "dx": dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2),
        "dw": dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=2),
    },
    "fp32": {
        "forward": dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=2),
        "dx": dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=2),
        "dw": dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=2),
    },
}
INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_V=16, BLOCK_K=16)
RTD_BLOCK = 1024


def _tiles(kind: str, dtype: torch.dtype) -> dict:
    if rt.interpreting():
        return dict(INTERPRETER_TILES)
    return dict(GPU_TILES["fp32" if dtype == torch.float32 else "16bit"][kind])


# ---------------------------------------------------------------------------------------- generator


@triton.jit
def _logit_tile(
    x_ptr, stride_xm, stride_xh,  # (M, H) hidden states
    w_ptr, stride_wv, stride_wh,  # (V, H) LM head
    b_ptr, stride_b,              # (V,) bias, read only when HAS_BIAS
    rows, row_ok, cols, col_ok, H,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The fp32 (BLOCK_M, BLOCK_V) tile x[rows] W[cols]ᵀ + b[cols]; rows outside ``row_ok`` read as 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < H
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wh,  # (BLOCK_K, BLOCK_V) = Wᵀ tile
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _gumbel(u):
    """g = -log(-log(u + 1e-9) + 1e-9) in fp32. Near u = 1 the inner -log(u) is tiny: a log evaluated
    next to 1 (an approximate GPU log above all) loses it, and fp32 drops the two 1e-9 terms, which
    cancel there to within 1e-10 of it. So for u >= 0.9 the inner term is the series
    -log(u) = 2 atanh(z) = 2 z (1 + z^2/3 + z^4/5 + z^6/7 + z^8/9), z = (1 - u) / (1 + u) <= 0.053
    (1 - u is exact; the truncation is below 1e-12 relative)."""
    z = (1.0 - u) / (1.0 + u)
    z2 = z * z
    series = 2.0 * z * (1.0 + z2 * (1.0 / 3.0 + z2 * (1.0 / 5.0 + z2 * (1.0 / 7.0 + z2 * (1.0 / 9.0)))))
    inner = tl.where(u >= 0.9, series, -tl.log(u + GUMBEL_EPS) + GUMBEL_EPS)
    return -tl.log(inner)


@triton.jit
def _generator_forward_kernel(
    x_ptr, stride_xm, stride_xh,    # (M, H) hidden states
    w_ptr, stride_wv, stride_wh,    # (V, H) LM head
    b_ptr, stride_b,                # (V,) bias (unused without HAS_BIAS)
    t_ptr, stride_t,                # (M,) original token ids
    u_ptr, stride_um, stride_uv,    # (M, V) uniform noise
    part_ptr,                       # out (SPLIT, M, 4) fp32 contiguous: per vocabulary split, m, s, h_t, best score
    index_ptr,                      # out (SPLIT, M) int64 contiguous: the best score's token id
    flag_ptr,                       # out (SPLIT, M) int32 contiguous: 1 NaN score, 2 noise outside [0, 1), 3 both
    M, V, H, SPLIT_V, inv_temp,     # SPLIT_V: vocabulary entries per split, a multiple of BLOCK_V
    DISALLOW: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_ok = rows < M
    t = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=0).to(tl.int64)
    mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    h_t = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int64) + split * SPLIT_V
    nan_score = tl.zeros((BLOCK_M,), tl.int32)
    bad_noise = tl.zeros((BLOCK_M,), tl.int32)
    v_begin = split * SPLIT_V
    v_end = tl.minimum(v_begin + SPLIT_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_end
        tile_ok = row_ok[:, None] & col_ok[None, :]
        h = _logit_tile(x_ptr, stride_xm, stride_xh, w_ptr, stride_wv, stride_wh, b_ptr, stride_b,
                        rows, row_ok, cols, col_ok, H, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        is_t = cols[None, :] == t[:, None]
        # Online log-sum-exp, as in _rowwise.row_max_sumexp, one value per slot.
        hl = tl.where(col_ok[None, :], h, float("-inf"))
        m_new = tl.maximum(mx, tl.max(hl, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(mx - shift) + tl.sum(tl.exp(hl - shift[:, None]), axis=1)
        mx = m_new
        h_t += tl.sum(tl.where(is_t, h, 0.0), axis=1)
        # Gumbel-max: running (value, index) argmax of h / T + g, lowest index on ties.
        u = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :] * stride_uv, mask=tile_ok,
                    other=0.5).to(tl.float32)
        u_bad = ~((u >= 0.0) & (u < 1.0))  # NaN fails both comparisons
        bad_noise = tl.maximum(bad_noise, tl.max(tl.where(tile_ok & u_bad, 2, 0), axis=1))
        score = h * inv_temp + _gumbel(u)
        if DISALLOW:
            score = tl.where(is_t, score - DISALLOW_PENALTY, score)
        is_nan = score != score
        nan_score = tl.maximum(nan_score, tl.max(tl.where(tile_ok & is_nan, 1, 0), axis=1))
        score = tl.where(col_ok[None, :] & ~is_nan, score, float("-inf"))
        tile_best = tl.max(score, axis=1)
        # Masked lanes sit above every valid column, so the lowest tied index is a valid one.
        tile_idx = tl.min(tl.where(score == tile_best[:, None], cols[None, :], V + BLOCK_V), axis=1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)

    out = split * M + rows
    tl.store(part_ptr + out * 4, mx, mask=row_ok)
    tl.store(part_ptr + out * 4 + 1, s, mask=row_ok)
    tl.store(part_ptr + out * 4 + 2, h_t, mask=row_ok)
    tl.store(part_ptr + out * 4 + 3, best, mask=row_ok)
    tl.store(index_ptr + out, best_idx, mask=row_ok)
    tl.store(flag_ptr + out, nan_score + bad_noise, mask=row_ok)


def _combine_splits(part, index, flags, target, slot_weight, v):
    """Merge the per-split statistics (O(SPLIT x M) work): log-sum-exp of the splits, the target
    logit (only its split holds it, the others hold 0), the best score (the first split wins ties,
    which keeps the lowest index). Returns the per-slot terms, the samples and (m, s)."""
    m_parts, s_parts, ht_parts, best_parts = part.unbind(-1)  # each (SPLIT, M)
    mx = m_parts.max(dim=0).values
    shift = torch.where(mx == float("-inf"), 0.0, mx)
    s = (s_parts * torch.exp(m_parts - shift)).sum(dim=0)
    h_t = ht_parts.sum(dim=0)
    winner = best_parts.argmax(dim=0, keepdim=True)  # first maximum
    samples = index.gather(0, winner)[0]
    flag = (flags & 1).amax(dim=0) | (flags & 2).amax(dim=0)  # 1: a NaN score, 2: noise outside [0, 1)
    w = slot_weight.to(torch.float32)
    ce = (mx - h_t) + torch.log(s)  # lse - h_t, with m kept apart from log s for accuracy near p_t = 1
    terms = torch.where(w != 0.0, w * ce, 0.0)
    valid = (target >= 0) & (target < v) & ((flag & 2) == 0)
    terms = torch.where(valid, terms, float("nan"))
    samples = torch.where(flag != 0, -1, samples)
    return terms, samples, torch.stack((mx, s), dim=1)


@triton.jit
def _slot_coefficients(t_ptr, stride_t, sw_ptr, stride_sw, g_ptr, stride_g, stats_ptr, rows, row_ok, V):
    """Per slot: its id, whether it is weighted, c = upstream gradient x w (NaN for a bad id), m, s."""
    t = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=0).to(tl.int64)
    w = tl.load(sw_ptr + rows * stride_sw, mask=row_ok, other=0.0).to(tl.float32)
    active = row_ok & (w != 0.0)
    c = tl.load(g_ptr + rows * stride_g, mask=row_ok, other=0.0).to(tl.float32) * w
    c = tl.where((t >= 0) & (t < V), c, float("nan"))
    mx = tl.load(stats_ptr + rows * 2, mask=active, other=0.0)
    s = tl.load(stats_ptr + rows * 2 + 1, mask=active, other=1.0)
    return t, active, c, mx, s


@triton.jit
def _logit_grad_tile(h, cols, col_ok, t, active, c, mx, s):
    """G = c (softmax(h) - onehot(t)) on one tile; exactly 0 for padding slots and columns."""
    p = tl.exp(h - mx[:, None]) / s[:, None]
    grad = c[:, None] * (p - tl.where(cols[None, :] == t[:, None], 1.0, 0.0))
    return tl.where(active[:, None] & col_ok[None, :], grad, 0.0)


@triton.jit
def _generator_dx_kernel(
    g_ptr, stride_g,                # (M,) upstream gradient of the per-slot terms (stride 0 if broadcast)
    x_ptr, stride_xm, stride_xh,    # (M, H) hidden states
    w_ptr, stride_wv, stride_wh,    # (V, H) LM head
    b_ptr, stride_b,                # (V,) bias (unused without HAS_BIAS)
    t_ptr, stride_t,                # (M,) token ids
    sw_ptr, stride_sw,              # (M,) slot weights
    stats_ptr,                      # (M, 2) fp32 from the forward: m, s
    dx_ptr,                         # in/out (M, H) fp32 contiguous, zero-initialised: dL/dx
    M, V, H,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    t, active, c, mx, s = _slot_coefficients(t_ptr, stride_t, sw_ptr, stride_sw, g_ptr, stride_g, stats_ptr,
                                             rows, row_ok, V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        h = _logit_tile(x_ptr, stride_xm, stride_xh, w_ptr, stride_wv, stride_wh, b_ptr, stride_b,
                        rows, active, cols, col_ok, H, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        grad = _logit_grad_tile(h, cols, col_ok, t, active, c, mx, s).to(w_ptr.dtype.element_ty)
        # The accumulator rows were stored by this program's previous tile, possibly by other threads
        # than the ones that now load them: a CTA barrier orders those global writes before the reads.
        tl.debug_barrier()
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = ks < H
            wk = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,  # (BLOCK_V, BLOCK_K)
                         mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            out = dx_ptr + rows[:, None] * H + ks[None, :]
            keep = active[:, None] & k_ok[None, :]  # padding slots keep their gradient of exactly 0
            acc = tl.load(out, mask=keep, other=0.0)
            tl.store(out, tl.dot(grad, wk, acc, input_precision=PRECISION), mask=keep)


@triton.jit
def _generator_dw_kernel(
    g_ptr, stride_g,                # (M,) upstream gradient of the per-slot terms
    x_ptr, stride_xm, stride_xh,    # (M, H) hidden states
    w_ptr, stride_wv, stride_wh,    # (V, H) LM head
    b_ptr, stride_b,                # (V,) bias (unused without HAS_BIAS)
    t_ptr, stride_t,                # (M,) token ids
    sw_ptr, stride_sw,              # (M,) slot weights
    stats_ptr,                      # (M, 2) fp32 from the forward
    dw_ptr,                         # in/out (v_stop - v_start, H) fp32 contiguous, zero-initialised: rows
                                    # v_start.. of dL/dW (unused without WEIGHT_GRAD)
    db_ptr,                         # out (V,) in the bias dtype (unused without BIAS_GRAD)
    M, V, H, v_start, v_stop,       # this launch covers vocabulary rows [v_start, v_stop)
    HAS_BIAS: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = v_start + tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_ok = cols < v_stop
    db = tl.zeros((BLOCK_V,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < M
        t, active, c, mx, s = _slot_coefficients(t_ptr, stride_t, sw_ptr, stride_sw, g_ptr, stride_g,
                                                 stats_ptr, rows, row_ok, V)
        h = _logit_tile(x_ptr, stride_xm, stride_xh, w_ptr, stride_wv, stride_wh, b_ptr, stride_b,
                        rows, active, cols, col_ok, H, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        grad = _logit_grad_tile(h, cols, col_ok, t, active, c, mx, s)
        if BIAS_GRAD:
            db += tl.sum(grad, axis=0)
        if WEIGHT_GRAD:
            grad_t = tl.trans(grad.to(x_ptr.dtype.element_ty))  # (BLOCK_V, BLOCK_M)
            tl.debug_barrier()  # order the previous tile's accumulator writes before these reads
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                k_ok = ks < H
                # Padding slots read as 0: their gradient is 0 and their (possibly NaN) states must not leak.
                xk = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xh,
                             mask=active[:, None] & k_ok[None, :], other=0.0)
                out = dw_ptr + (cols - v_start)[:, None] * H + ks[None, :]
                keep = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(out, mask=keep, other=0.0)
                tl.store(out, tl.dot(grad_t, xk, acc, input_precision=PRECISION), mask=keep)
    if BIAS_GRAD:
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


_SM_COUNT: dict = {}


def _split_width(v: int, row_blocks: int, block_v: int, device) -> int:
    """Vocabulary entries per forward program (a multiple of ``block_v``): enough splits that the
    grid has about four programs per SM (two splits under the interpreter, so the merge is tested)."""
    tiles = triton.cdiv(v, block_v)
    if rt.interpreting():
        splits = 2
    else:
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        sms = _SM_COUNT[device]
        splits = triton.cdiv(4 * sms, row_blocks)
    per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    return per_split * block_v


def _dw_chunk_rows(block_v: int, device) -> int:
    """Vocabulary rows per dW launch for 16-bit weights: two waves of one program per SM (the kernels
    fill an SM's registers), 16896 rows on an H100, so the fp32 buffer is 52 MB at H = 768; two
    tiles under the interpreter, so that small vocabularies cross chunks."""
    if rt.interpreting():
        return 2 * block_v
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * _SM_COUNT[device] * block_v


def _bias_args(bias, like):
    if bias is None:
        return like.new_empty(0), 0, False
    return bias, bias.stride(0), True


@torch.library.custom_op("twinops::electra_generator_sample", mutates_args=())
def _generator_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    slot_weight: torch.Tensor, noise: torch.Tensor, temperature: float, disallow_correct: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, h = hidden.shape
    v = weight.shape[0]
    if m == 0:
        return (hidden.new_empty(0, dtype=torch.float32), hidden.new_empty(0, dtype=torch.int64),
                hidden.new_empty((0, 2), dtype=torch.float32))
    tiles = _tiles("forward", hidden.dtype)
    row_blocks = triton.cdiv(m, tiles["BLOCK_M"])
    split_v = _split_width(v, row_blocks, tiles["BLOCK_V"], hidden.device)
    splits = triton.cdiv(v, split_v)
    part = torch.empty((splits, m, 4), device=hidden.device, dtype=torch.float32)
    index = torch.empty((splits, m), device=hidden.device, dtype=torch.int64)
    flags = torch.empty((splits, m), device=hidden.device, dtype=torch.int32)
    b, b_stride, has_b = _bias_args(bias, hidden)
    _generator_forward_kernel[(row_blocks, splits)](
        hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
        b, b_stride, target, target.stride(0), noise, noise.stride(0), noise.stride(1),
        part, index, flags, m, v, h, split_v, 1.0 / temperature,
        DISALLOW=disallow_correct, HAS_BIAS=has_b, PRECISION=rt.dot_precision(hidden.dtype), **tiles,
    )
    terms, samples, stats = _combine_splits(part, index, flags, target, slot_weight, v)
    return terms, samples, stats


@_generator_forward.register_fake
def _(hidden, weight, bias, target, slot_weight, noise, temperature, disallow_correct):
    m = hidden.shape[0]
    return (hidden.new_empty(m, dtype=torch.float32), hidden.new_empty(m, dtype=torch.int64),
            hidden.new_empty((m, 2), dtype=torch.float32))


@torch.library.custom_op("twinops::electra_generator_sample_backward", mutates_args=())
def _generator_backward(
    grad_terms: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    target: torch.Tensor, slot_weight: torch.Tensor, stats: torch.Tensor,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dhidden, dL/dweight, dL/dbias); an input whose gradient is not needed gets an empty tensor."""
    m, h = hidden.shape
    v = weight.shape[0]
    b, b_stride, has_b = _bias_args(bias, hidden)
    precision = rt.dot_precision(hidden.dtype)
    common = (hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
              b, b_stride, target, target.stride(0), slot_weight, slot_weight.stride(0), stats)
    d_hidden, d_weight, d_bias = hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    if need_hidden:
        acc = torch.zeros((m, h), device=hidden.device, dtype=torch.float32)
        if m > 0:
            tiles = _tiles("dx", hidden.dtype)
            _generator_dx_kernel[(triton.cdiv(m, tiles["BLOCK_M"]),)](
                grad_terms, grad_terms.stride(0), *common, acc, m, v, h,
                HAS_BIAS=has_b, PRECISION=precision, **tiles)
        d_hidden = acc.to(hidden.dtype)
    if need_weight or need_bias:
        tiles = _tiles("dw", hidden.dtype)
        # fp32 weights accumulate straight into their gradient; 16-bit ones into an fp32 buffer of
        # at most DW_CHUNK_ROWS rows, reused chunk after chunk of the vocabulary and cast into place.
        direct = weight.dtype == torch.float32 or not need_weight
        chunk = v if direct else min(v, _dw_chunk_rows(tiles["BLOCK_V"], hidden.device))
        if need_weight:
            d_weight = torch.zeros((v, h), device=hidden.device, dtype=torch.float32) if direct \
                else torch.empty((v, h), device=hidden.device, dtype=weight.dtype)
        acc = d_weight if direct else torch.empty((chunk, h), device=hidden.device, dtype=torch.float32)
        db = torch.zeros(v, device=hidden.device, dtype=bias.dtype) if need_bias else d_bias
        for v0 in range(0, v, chunk):
            rows = min(chunk, v - v0)
            if not direct:
                acc.zero_()
            if m > 0:
                _generator_dw_kernel[(triton.cdiv(rows, tiles["BLOCK_V"]),)](
                    grad_terms, grad_terms.stride(0), *common, acc, db, m, v, h, v0, v0 + rows,
                    HAS_BIAS=has_b, WEIGHT_GRAD=need_weight, BIAS_GRAD=need_bias, PRECISION=precision,
                    **tiles)
            if not direct:
                d_weight[v0:v0 + rows].copy_(acc[:rows])
        if need_bias:
            d_bias = db
    return d_hidden, d_weight, d_bias


@_generator_backward.register_fake
def _(grad_terms, hidden, weight, bias, target, slot_weight, stats, need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(bias.shape if need_bias else (0,)))


def _generator_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, slot_weight, noise, temperature, disallow_correct = inputs
    ctx.save_for_backward(hidden, weight, bias, target, slot_weight, output[2])


def _generator_autograd(ctx, grad_terms, grad_samples, grad_stats):
    hidden, weight, bias, target, slot_weight, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_bias = bias is not None and need[2]
    if not (need[0] or need[1] or need_bias):
        return None, None, None, None, None, None, None, None
    dh, dw, db = _generator_backward(grad_terms, hidden, weight, bias, target, slot_weight, stats,
                                     need[0], need[1], need_bias)
    return (dh if need[0] else None, dw if need[1] else None, db if need_bias else None,
            None, None, None, None, None)


_generator_forward.register_autograd(_generator_autograd, setup_context=_generator_setup_context)


def _check_generator(hidden, weight, target, slot_weight, noise, bias, temperature, disallow_correct,
                     reduction):
    rt.check_float_tensor(hidden, "hidden", 2, "(M, H)")
    rt.check_float_tensor(weight, "weight", 2, "(V, H)")
    m, h = hidden.shape
    v = weight.shape[0]
    if h < 1:
        raise ValueError(f"hidden must have at least one feature (H >= 1), got shape {tuple(hidden.shape)}")
    if weight.shape[1] != h:
        raise ValueError(f"weight must have shape (V, {h}) to match hidden's H = {h}, got {tuple(weight.shape)}")
    if v < 1:
        raise ValueError(f"weight must have at least one vocabulary row (V >= 1), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        rt.check_float_tensor(bias, "bias", 1, "(V,)")
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must have shape ({v},), one entry per vocabulary row, got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    rt.check_int_tensor(target, "target", (m,), "token ids")
    rt.check_float_tensor(slot_weight, "slot_weight", 1, "(M,)")
    if tuple(slot_weight.shape) != (m,):
        raise ValueError(f"slot_weight must have shape ({m},) to match hidden, got {tuple(slot_weight.shape)}")
    if slot_weight.requires_grad:
        raise ValueError("slot_weight: gradients with respect to slot weights are not supported; "
                         "pass slot_weight.detach()")
    rt.check_float_tensor(noise, "noise", 2, "(M, V)")
    if tuple(noise.shape) != (m, v):
        raise ValueError(f"noise must have shape ({m}, {v}), one draw per slot and token, got {tuple(noise.shape)}")
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    disallow_correct = check_bool(disallow_correct, "disallow_correct")
    rt.check_reduction(reduction)
    rt.check_device(("hidden", hidden), ("weight", weight), ("bias", bias), ("target", target),
                    ("slot_weight", slot_weight), ("noise", noise))
    return temperature, disallow_correct


def electra_generator_sample(hidden, weight, target, slot_weight, noise, bias=None, *, temperature=1.0,
                             disallow_correct=False, reduction="mean"):
    """ELECTRA generator on the GPU: ``(loss, samples)`` without materialising the (M, V) logits.

    Same arguments and semantics as `twinops.reference.classification.electra.electra_generator_sample`.
    The loss has hidden's dtype, the samples are int64. Token ids outside [0, V) and noise outside
    [0, 1) make the slot's loss NaN (bad noise also gives sample -1) instead of raising, since
    checking them would synchronise the device.
    """
    temperature, disallow_correct = _check_generator(hidden, weight, target, slot_weight, noise, bias,
                                                     temperature, disallow_correct, reduction)
    terms, samples, _ = _generator_forward(hidden, weight, bias, target, slot_weight, noise, temperature,
                                           disallow_correct)
    if reduction == "none":
        loss = terms
    elif reduction == "sum":
        loss = terms.sum()
    else:
        loss = terms.sum() / (slot_weight.to(torch.float32).sum() + EPS)
    return loss.to(hidden.dtype), samples


class ElectraGeneratorSample(torch.nn.Module):
    """ELECTRA's generator head: holds the LM-head ``weight`` (V, H) (tie it to the input embedding
    by passing the embedding's weight) and an optional ``bias``; ``forward(hidden, target,
    slot_weight, noise)`` returns ``(loss, samples)`` as `electra_generator_sample`."""

    def __init__(self, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None = None, *, temperature=1.0,
                 disallow_correct=False, reduction="mean"):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.temperature, self.disallow_correct, self.reduction = temperature, disallow_correct, reduction

    def forward(self, hidden, target, slot_weight, noise):
        return electra_generator_sample(hidden, self.weight, target, slot_weight, noise, self.bias,
                                        temperature=self.temperature, disallow_correct=self.disallow_correct,
                                        reduction=self.reduction)


# ------------------------------------------------------------------------------------ discriminator


@triton.jit
def _rtd_forward_kernel(
    z_ptr, stride_zb, stride_zl,    # (B, L) discriminator logits
    y_ptr, stride_yb, stride_yl,    # (B, L) labels, 1 = replaced (bool read as uint8)
    a_ptr, stride_ab, stride_al,    # (B, L) attention mask / token weights
    terms_ptr,                      # out (B, L) fp32 contiguous: a (softplus(z) - y z), 0 where a = 0
    L,
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    ok = cols < L
    z = tl.load(z_ptr + b * stride_zb + cols * stride_zl, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + cols * stride_yl, mask=ok, other=0).to(tl.float32)
    a = tl.load(a_ptr + b * stride_ab + cols * stride_al, mask=ok, other=0).to(tl.float32)
    zs = tl.where(y == 1.0, -z, z)  # softplus(z) - y z = softplus(-z) if y = 1 else softplus(z)
    term = tl.where(a != 0.0, a * (tl.maximum(zs, 0.0) + log1p(tl.exp(-tl.abs(zs)))), 0.0)
    term = tl.where((y == 0.0) | (y == 1.0), term, float("nan"))
    tl.store(terms_ptr + b * L + cols, term, mask=ok)


@triton.jit
def _rtd_backward_kernel(
    g_ptr, stride_gb, stride_gl,    # (B, L) upstream gradient of the terms (strides 0 when broadcast)
    z_ptr, stride_zb, stride_zl,    # (B, L) logits
    y_ptr, stride_yb, stride_yl,    # (B, L) labels
    a_ptr, stride_ab, stride_al,    # (B, L) attention mask
    dz_ptr, stride_db, stride_dl,   # out (B, L) in the logits' dtype
    L,
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    ok = cols < L
    z = tl.load(z_ptr + b * stride_zb + cols * stride_zl, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + cols * stride_yl, mask=ok, other=0).to(tl.float32)
    a = tl.load(a_ptr + b * stride_ab + cols * stride_al, mask=ok, other=0).to(tl.float32)
    g = tl.load(g_ptr + b * stride_gb + cols * stride_gl, mask=ok, other=0.0).to(tl.float32)
    zs = tl.where(y == 1.0, -z, z)
    sigmoid = 1.0 / (1.0 + tl.exp(-zs))  # sigma(z) - y = -sigma(-z) if y = 1 else sigma(z)
    dz = tl.where(a != 0.0, g * a * tl.where(y == 1.0, -sigmoid, sigmoid), 0.0)
    dz = tl.where((y == 0.0) | (y == 1.0), dz, float("nan"))
    tl.store(dz_ptr + b * stride_db + cols * stride_dl, dz.to(dz_ptr.dtype.element_ty), mask=ok)


def _rtd_grid(shape):
    block = 32 if rt.interpreting() else RTD_BLOCK
    return (shape[0], triton.cdiv(shape[1], block)), block


@torch.library.custom_op("twinops::rtd_loss", mutates_args=())
def _rtd_terms(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    terms = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
    if logits.numel() > 0:
        grid, block = _rtd_grid(logits.shape)
        _rtd_forward_kernel[grid](
            logits, logits.stride(0), logits.stride(1), labels, labels.stride(0), labels.stride(1),
            attention_mask, attention_mask.stride(0), attention_mask.stride(1), terms, logits.shape[1],
            BLOCK_L=block)
    return terms


@_rtd_terms.register_fake
def _(logits, labels, attention_mask):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.custom_op("twinops::rtd_loss_backward", mutates_args=())
def _rtd_terms_backward(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    dz = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    if logits.numel() > 0:
        grid, block = _rtd_grid(logits.shape)
        _rtd_backward_kernel[grid](
            grad, grad.stride(0), grad.stride(1), logits, logits.stride(0), logits.stride(1),
            labels, labels.stride(0), labels.stride(1), attention_mask, attention_mask.stride(0),
            attention_mask.stride(1), dz, dz.stride(0), dz.stride(1), logits.shape[1], BLOCK_L=block)
    return dz


@_rtd_terms_backward.register_fake
def _(grad, logits, labels, attention_mask):
    return logits.new_empty(logits.shape)


def _rtd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rtd_autograd(ctx, grad):
    logits, labels, attention_mask = ctx.saved_tensors
    dz = _rtd_terms_backward(grad, logits, labels, attention_mask) if ctx.needs_input_grad[0] else None
    return dz, None, None


_rtd_terms.register_autograd(_rtd_autograd, setup_context=_rtd_setup_context)


def _as_flags(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def rtd_loss(logits, labels, attention_mask, *, reduction="mean"):
    """ELECTRA's replaced-token-detection loss on the GPU (masked BCE, a global token mean).

    Same arguments and semantics as `twinops.reference.classification.electra.rtd_loss`; returns the
    logits' dtype. Labels outside {0, 1} give NaN terms instead of an error (no device sync).
    """
    rt.check_float_tensor(logits, "logits", 2, "(B, L)")
    shape = tuple(logits.shape)
    rt.check_tensor(labels, "labels")
    if labels.dtype != torch.bool and labels.dtype not in rt.INT_DTYPES:
        raise TypeError(f"labels must be a bool or integer tensor of 0/1 flags, got {labels.dtype}")
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels must have shape {shape} to match logits, got {tuple(labels.shape)}")
    rt.check_tensor(attention_mask, "attention_mask")
    if attention_mask.dtype != torch.bool and attention_mask.dtype not in rt.INT_DTYPES + rt.FLOAT_DTYPES:
        raise TypeError(f"attention_mask must be a bool, integer or real tensor, got {attention_mask.dtype}")
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask must have shape {shape} to match logits, got {tuple(attention_mask.shape)}")
    if attention_mask.requires_grad:
        raise ValueError("attention_mask: gradients with respect to the mask are not supported; "
                         "pass attention_mask.detach()")
    rt.check_reduction(reduction)
    rt.check_device(("logits", logits), ("labels", labels), ("attention_mask", attention_mask))
    mask = _as_flags(attention_mask)
    terms = _rtd_terms(logits, _as_flags(labels), mask)
    if reduction == "none":
        out = terms
    elif reduction == "sum":
        out = terms.sum()
    else:
        out = terms.sum() / (mask.to(torch.float32).sum() + EPS)
    return out.to(logits.dtype)


class RTDLoss(torch.nn.Module):
    """``nn.Module`` form of `rtd_loss` (ELECTRA's discriminator loss)."""

    def __init__(self, *, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, labels, attention_mask):
        return rtd_loss(logits, labels, attention_mask, reduction=self.reduction)
