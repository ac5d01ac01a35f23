"""PST sparse linear layer (P10) as Triton kernels, and its cubic sparsity schedule. See
`twinops.reference.layers.pst` for the definitions.

Forward, for x (N, d_in), frozen W (d_out, d_in), trainable U, V, A, B, R, C:
  1. score kernel, one program per (BLOCK_O x BLOCK_I) weight tile: W' = W + beta U V and
     S = |W'| + alpha1 A B + alpha2 (R 1^T + 1 C^T), the rank-r products as fp32 `tl.dot`s over the
     rank padded to 16; writes S in fp32 (the one d_out x d_in temporary the selection needs).
  2. selection: one stable ascending sort of S (torch.sort, a radix sort on the GPU) gives the
     threshold pair (t, p) = (k-th smallest score, its flat index); no host synchronisation.
  3. masked-weight kernel, per weight tile: recomputes W', derives the mask in-tile from S and (t, p)
     (pruned iff S < t, or S == t and flat index <= p: the stable order's lowest-index tie rule) and
     writes M * W' once, in the input dtype.
  4. GEMM kernel (`tl.dot`, fp32 accumulation, bias in the epilogue): y = x (M * W')^T + b.
Backward, for dy (N, d_out):
  * dx = dy (M * W'), the same GEMM kernel on the saved masked weight (only when x needs a gradient);
  * one parameter-gradient kernel per (BLOCK_O x BLOCK_I) tile: G = dy^T x accumulated over N in
    registers, then an epilogue that recomputes W' and the mask, forms dS = W' * G and
    dW' = M * G + sign(W') * dS, and contracts them at once into per-tile partials of
    dU = beta dW' V^T, dV = beta U^T dW', dA = alpha1 dS B^T, dB = alpha1 A^T dS and the row / column
    sums dR, dC. G, dS and dW' (each d_out x d_in) never exist in memory; the partials (one slice per
    tile column or row, O(d_out r d_in / BLOCK_I + d_in r d_out / BLOCK_O)) are summed by the host,
    so the result is deterministic.

Why the masked weight is written once instead of re-derived inside the GEMM's tile loop: the GEMM
visits every weight tile N / BLOCK_M times (64 times at N = 8192), so recomputing W' (two rank-r
products) and reading the fp32 score there costs more than writing M * W' (d_out d_in elements in
the input dtype, 4.7 MB at BERT-base FFN bf16, against 63 MB of activations in and out).

Extra memory: forward S (4 bytes per weight), the sort's values and indices (12 bytes per weight)
while it runs, M * W' (input dtype); saved for the backward: S, M * W', (t, p).

Numerics: the score, W' and the epilogue's rank-r products are exact fp32 whatever the matmul
precision setting (a TF32 score would flip the mask against the reference); the two big GEMMs follow
`torch.get_float32_matmul_precision()`. For 16-bit inputs M * W' is rounded once to the input dtype
before the tensor-core GEMM, as `F.linear` on a 16-bit weight does.

Where the time goes (a model, not yet measured on a GPU): at the benchmark shape (N = 8192,
768 -> 3072, bf16) the three GEMMs (y, dx, G; 39 GFLOP each) and the sort of 2.4M scores are the
same work in the eager baseline (cuBLAS, torch.argsort) and here. What fusing removes is the
baseline's ~10 elementwise passes over d_out x d_in (U V, |.|, A B, broadcasts, mask, products) and,
in the backward, its fp32 G, dS and dW' temporaries with their extra passes: roughly 0.1 ms and
40 MB of traffic per layer against ~0.3 ms of GEMMs. Expect about 1.2-1.5x over torch.compile of the
baseline, bounded by how close the Triton GEMM comes to cuBLAS; a larger gain would need a sparse
GEMM that skips the pruned weights (2:4 or block sparsity), which PST's unstructured mask does not
give.

`cubic_sparsity_schedule` is a scalar function of the step: it has no kernel. It is written in
torch ops (an int, or an integer tensor of steps, on any device) so a training loop under
`torch.compile` can evaluate it without a graph break.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...reference._checks import check_int, check_real
from ...reference.layers.pst import _schedule_hyper  # the reference's checks, shared
from .. import _runtime as rt

__all__ = ["pst_sparse_linear", "PSTSparseLinear", "cubic_sparsity_schedule"]

HAS_TRITON_BACKWARD = True

# Tile sizes: untuned guesses pending a GPU sweep. GEMM tiles (M x N x K) and the weight tiles of
# the score / masked-weight / parameter-gradient kernels (BLOCK_O x BLOCK_I, BLOCK_N tokens a step).
GPU_GEMM = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
GPU_TILE = dict(BLOCK_O=64, BLOCK_I=64)
GPU_GRAD = dict(BLOCK_O=64, BLOCK_I=64, BLOCK_N=64, num_warps=4, num_stages=3)
INTERPRETER_GEMM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
INTERPRETER_TILE = dict(BLOCK_O=16, BLOCK_I=16)
INTERPRETER_GRAD = dict(BLOCK_O=16, BLOCK_I=16, BLOCK_N=16)


def _gemm_blocks() -> dict:
    return dict(INTERPRETER_GEMM if rt.interpreting() else GPU_GEMM)


def _tile_blocks() -> dict:
    return dict(INTERPRETER_TILE if rt.interpreting() else GPU_TILE)


def _grad_blocks() -> dict:
    return dict(INTERPRETER_GRAD if rt.interpreting() else GPU_GRAD)


def _pad_rank(r: int) -> int:
    """Rank padded to a power of two >= 16 (the smallest `tl.dot` inner dimension)."""
    return max(16, triton.next_power_of_2(r))


# ----------------------------------------------------------------------------------------------
# Tile helpers shared by the weight-space kernels. `os` / `is_` are the tile's output rows and input
# columns (int64), `o_ok` / `i_ok` their bounds masks.


@triton.jit
def _low_rank_tile(
    p_ptr, stride_po, stride_pr,  # (d_out, r) left factor (U or A); (o, k) at o*stride_po + k*stride_pr
    q_ptr, stride_qr, stride_qi,  # (r, d_in) right factor (V or B); (k, i) at k*stride_qr + i*stride_qi
    os, is_, o_ok, i_ok, RANK,
    PAD_R: tl.constexpr,
):
    """(P Q)[os, is_] in fp32: the rank padded with zeros to PAD_R, exact fp32 products."""
    ks = tl.arange(0, PAD_R)
    k_ok = ks < RANK
    p = tl.load(p_ptr + os[:, None] * stride_po + ks[None, :] * stride_pr,
                mask=o_ok[:, None] & k_ok[None, :], other=0.0)
    q = tl.load(q_ptr + ks[:, None] * stride_qr + is_[None, :] * stride_qi,
                mask=k_ok[:, None] & i_ok[None, :], other=0.0)
    return tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision="ieee")


@triton.jit
def _w_prime_tile(
    w_ptr, stride_wo, stride_wi,  # (d_out, d_in) frozen weight
    u_ptr, stride_uo, stride_ur,  # (d_out, r_w) U
    v_ptr, stride_vr, stride_vi,  # (r_w, d_in) V
    os, is_, o_ok, i_ok, RANK_W, beta,
    PAD_RW: tl.constexpr,
):
    """W' = W + beta U V on one tile, fp32 (zero outside the matrix)."""
    w = tl.load(w_ptr + os[:, None] * stride_wo + is_[None, :] * stride_wi,
                mask=o_ok[:, None] & i_ok[None, :], other=0.0)
    uv = _low_rank_tile(u_ptr, stride_uo, stride_ur, v_ptr, stride_vr, stride_vi, os, is_, o_ok, i_ok, RANK_W, PAD_RW)
    return w.to(tl.float32) + beta * uv


@triton.jit
def _pruned_tile(
    s,               # (BLOCK_O, BLOCK_I) fp32 scores of the tile
    flat,            # (BLOCK_O, BLOCK_I) int64 flat (row-major) indices o * d_in + i
    thr_ptr, idx_ptr,  # () fp32 t and () int64 p: the k-th smallest score and its flat index
):
    """True where the stable ascending order prunes: S before (t, p) in (score, flat index) order,
    NaN sorting as the largest score (k = 0 is t = -inf, p = -1: nothing pruned)."""
    t = tl.load(thr_ptr)
    p = tl.load(idx_ptr)
    s_nan = s != s
    t_nan = t != t
    below = tl.where(t_nan, s == s, s < t)   # a NaN threshold: every non-NaN score comes before it
    tied = tl.where(t_nan, s_nan, s == t)
    return below | (tied & (flat <= p))


# ----------------------------------------------------------------------------------------------
# Forward kernels.


@triton.jit
def _score_kernel(
    w_ptr, stride_wo, stride_wi,  # (d_out, d_in) frozen weight
    u_ptr, stride_uo, stride_ur,  # (d_out, r_w) U
    v_ptr, stride_vr, stride_vi,  # (r_w, d_in) V
    a_ptr, stride_ao, stride_ar,  # (d_out, r_m) A
    b_ptr, stride_br, stride_bi,  # (r_m, d_in) B
    r_ptr, stride_r,              # (d_out,) row score R
    c_ptr, stride_c,              # (d_in,) column score C
    s_ptr,                        # out (d_out, d_in) fp32 contiguous: the score S
    D_OUT, D_IN, RANK_W, RANK_M, beta, alpha1, alpha2,
    PAD_RW: tl.constexpr, PAD_RM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    os = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    is_ = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    o_ok, i_ok = os < D_OUT, is_ < D_IN
    w_prime = _w_prime_tile(w_ptr, stride_wo, stride_wi, u_ptr, stride_uo, stride_ur, v_ptr, stride_vr, stride_vi,
                            os, is_, o_ok, i_ok, RANK_W, beta, PAD_RW)
    ab = _low_rank_tile(a_ptr, stride_ao, stride_ar, b_ptr, stride_br, stride_bi, os, is_, o_ok, i_ok, RANK_M, PAD_RM)
    r = tl.load(r_ptr + os * stride_r, mask=o_ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + is_ * stride_c, mask=i_ok, other=0.0).to(tl.float32)
    s = tl.abs(w_prime) + alpha1 * ab + alpha2 * (r[:, None] + c[None, :])
    tl.store(s_ptr + os[:, None] * D_IN + is_[None, :], s, mask=o_ok[:, None] & i_ok[None, :])


@triton.jit
def _masked_weight_kernel(
    w_ptr, stride_wo, stride_wi,  # (d_out, d_in) frozen weight
    u_ptr, stride_uo, stride_ur,  # (d_out, r_w) U
    v_ptr, stride_vr, stride_vi,  # (r_w, d_in) V
    s_ptr,                        # (d_out, d_in) fp32 contiguous score from _score_kernel
    thr_ptr, idx_ptr,             # () fp32 threshold t, () int64 flat index p
    out_ptr,                      # out (d_out, d_in) contiguous, input dtype: M * W'
    D_OUT, D_IN, RANK_W, beta,
    PAD_RW: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    os = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    is_ = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    o_ok, i_ok = os < D_OUT, is_ < D_IN
    inside = o_ok[:, None] & i_ok[None, :]
    w_prime = _w_prime_tile(w_ptr, stride_wo, stride_wi, u_ptr, stride_uo, stride_ur, v_ptr, stride_vr, stride_vi,
                            os, is_, o_ok, i_ok, RANK_W, beta, PAD_RW)
    flat = os[:, None] * D_IN + is_[None, :]
    s = tl.load(s_ptr + flat, mask=inside, other=0.0)
    keep = tl.where(_pruned_tile(s, flat, thr_ptr, idx_ptr), 0.0, 1.0)
    tl.store(out_ptr + flat, (keep * w_prime).to(out_ptr.dtype.element_ty), mask=inside)  # 0 * NaN stays NaN


@triton.jit
def _matmul_kernel(
    a_ptr, stride_am, stride_ak,  # (M, K) left operand
    b_ptr, stride_bk, stride_bn,  # (K, N) right operand (a transposed view is just swapped strides)
    c_ptr, stride_cm, stride_cn,  # out (M, N) in its own dtype
    bias_ptr, stride_bias,        # (N,) added in the epilogue when HAS_BIAS
    M, N, K,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A B (+ bias), fp32 accumulation; programs grouped GROUP_M tile-rows at a time so the
    tiles of B they share stay in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_m
    pid_n = (pid % (GROUP_M * grid_n)) // group_m
    ms = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ns = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok, n_ok = ms < M, ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        a = tl.load(a_ptr + ms[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + ns[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + ms[:, None] * stride_cm + ns[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Backward kernel for the trainable parameters.


@triton.jit
def _param_grad_kernel(
    dy_ptr, stride_dyn, stride_dyo,  # (N, d_out) upstream gradient
    x_ptr, stride_xn, stride_xi,     # (N, d_in) input rows
    w_ptr, stride_wo, stride_wi,     # (d_out, d_in) frozen weight
    u_ptr, stride_uo, stride_ur,     # (d_out, r_w) U
    v_ptr, stride_vr, stride_vi,     # (r_w, d_in) V
    a_ptr, stride_ao, stride_ar,     # (d_out, r_m) A
    b_ptr, stride_br, stride_bi,     # (r_m, d_in) B
    s_ptr, thr_ptr, idx_ptr,         # saved fp32 score (d_out, d_in) contiguous, threshold t, flat index p
    du_ptr,   # out (I_TILES, d_out, r_w) fp32 contiguous: this tile column's share of dU
    dv_ptr,   # out (O_TILES, r_w, d_in) fp32 contiguous: this tile row's share of dV
    da_ptr,   # out (I_TILES, d_out, r_m) fp32 contiguous
    db_ptr,   # out (O_TILES, r_m, d_in) fp32 contiguous
    dr_ptr,   # out (I_TILES, d_out) fp32 contiguous
    dc_ptr,   # out (O_TILES, d_in) fp32 contiguous
    N, D_OUT, D_IN, RANK_W, RANK_M, beta, alpha1, alpha2,
    PRECISION: tl.constexpr, PAD_RW: tl.constexpr, PAD_RM: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_o = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    os = pid_o * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    is_ = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    o_ok, i_ok = os < D_OUT, is_ < D_IN
    inside = o_ok[:, None] & i_ok[None, :]

    # G = dy^T x on this tile, accumulated over the tokens; dy is read as its transpose (o, n).
    g = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = ns < N
        dy_t = tl.load(dy_ptr + ns[None, :] * stride_dyn + os[:, None] * stride_dyo,
                       mask=o_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ns[:, None] * stride_xn + is_[None, :] * stride_xi,
                    mask=n_ok[:, None] & i_ok[None, :], other=0.0)
        g = tl.dot(dy_t, x, g, input_precision=PRECISION)

    # Straight-through epilogue: dS = W' * G, dW' = M * G + sign(W') * dS.
    w_prime = _w_prime_tile(w_ptr, stride_wo, stride_wi, u_ptr, stride_uo, stride_ur, v_ptr, stride_vr, stride_vi,
                            os, is_, o_ok, i_ok, RANK_W, beta, PAD_RW)
    flat = os[:, None] * D_IN + is_[None, :]
    s = tl.load(s_ptr + flat, mask=inside, other=0.0)
    keep = tl.where(_pruned_tile(s, flat, thr_ptr, idx_ptr), 0.0, 1.0)
    d_score = w_prime * g
    sign = tl.where(w_prime > 0, 1.0, tl.where(w_prime < 0, -1.0, 0.0))
    d_wprime = keep * g + sign * d_score
    d_score = tl.where(inside, d_score, 0.0)
    d_wprime = tl.where(inside, d_wprime, 0.0)

    # Contract into the rank-r factors: dU = beta dW' V^T, dV = beta U^T dW' (and A, B with dS).
    kw = tl.arange(0, PAD_RW).to(tl.int64)
    kw_ok = kw < RANK_W
    v_t = tl.load(v_ptr + kw[None, :] * stride_vr + is_[:, None] * stride_vi,   # V^T tile (BLOCK_I, PAD_RW)
                  mask=i_ok[:, None] & kw_ok[None, :], other=0.0)
    u_t = tl.load(u_ptr + os[None, :] * stride_uo + kw[:, None] * stride_ur,    # U^T tile (PAD_RW, BLOCK_O)
                  mask=kw_ok[:, None] & o_ok[None, :], other=0.0)
    du = beta * tl.dot(d_wprime, v_t.to(tl.float32), input_precision="ieee")          # (BLOCK_O, PAD_RW)
    dv = beta * tl.dot(u_t.to(tl.float32), d_wprime, input_precision="ieee")          # (PAD_RW, BLOCK_I)
    tl.store(du_ptr + pid_i * D_OUT * RANK_W + os[:, None] * RANK_W + kw[None, :], du,
             mask=o_ok[:, None] & kw_ok[None, :])
    tl.store(dv_ptr + pid_o * RANK_W * D_IN + kw[:, None] * D_IN + is_[None, :], dv,
             mask=kw_ok[:, None] & i_ok[None, :])

    km = tl.arange(0, PAD_RM).to(tl.int64)
    km_ok = km < RANK_M
    b_t = tl.load(b_ptr + km[None, :] * stride_br + is_[:, None] * stride_bi,   # B^T tile (BLOCK_I, PAD_RM)
                  mask=i_ok[:, None] & km_ok[None, :], other=0.0)
    a_t = tl.load(a_ptr + os[None, :] * stride_ao + km[:, None] * stride_ar,    # A^T tile (PAD_RM, BLOCK_O)
                  mask=km_ok[:, None] & o_ok[None, :], other=0.0)
    da = alpha1 * tl.dot(d_score, b_t.to(tl.float32), input_precision="ieee")         # (BLOCK_O, PAD_RM)
    db = alpha1 * tl.dot(a_t.to(tl.float32), d_score, input_precision="ieee")         # (PAD_RM, BLOCK_I)
    tl.store(da_ptr + pid_i * D_OUT * RANK_M + os[:, None] * RANK_M + km[None, :], da,
             mask=o_ok[:, None] & km_ok[None, :])
    tl.store(db_ptr + pid_o * RANK_M * D_IN + km[:, None] * D_IN + is_[None, :], db,
             mask=km_ok[:, None] & i_ok[None, :])

    tl.store(dr_ptr + pid_i * D_OUT + os, alpha2 * tl.sum(d_score, axis=1), mask=o_ok)
    tl.store(dc_ptr + pid_o * D_IN + is_, alpha2 * tl.sum(d_score, axis=0), mask=i_ok)


# ----------------------------------------------------------------------------------------------
# Host launchers and the custom ops.


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    blocks = _gemm_blocks()
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), out, out.stride(0), out.stride(1),
        bias if bias is not None else out, bias.stride(0) if bias is not None else 0, m, n, k,
        HAS_BIAS=bias is not None, PRECISION=rt.dot_precision(a.dtype), **blocks,
    )


def _prune_count(sparsity: float, numel: int) -> int:
    return int(sparsity * numel)  # the authors' int(numel * sparsity), in float64


def _threshold(score: torch.Tensor, sparsity: float, sparsity_t: torch.Tensor | None):
    """(t, p): the k-th smallest score in the stable order and its flat index (-inf, -1 when k = 0).
    With a tensor sparsity k is computed on the device (no synchronisation)."""
    dev, numel = score.device, score.numel()
    if sparsity_t is None:
        k = _prune_count(sparsity, numel)
        if k == 0:
            return (torch.full((), float("-inf"), device=dev, dtype=torch.float32),
                    torch.full((), -1, device=dev, dtype=torch.int64))
        values, order = torch.sort(score.view(-1), stable=True)
        return values[k - 1].clone(), order[k - 1].clone()
    rho = sparsity_t.to(torch.float64).clamp(0.0, 1.0)
    k = torch.floor(torch.nan_to_num(rho, nan=0.0) * numel).to(torch.int64).view(1)
    values, order = torch.sort(score.view(-1), stable=True)
    pos = (k - 1).clamp(min=0)
    some = k > 0
    thr = torch.where(some, values.gather(0, pos), torch.full_like(values[:1], float("-inf")))
    idx = torch.where(some, order.gather(0, pos), torch.full_like(order[:1], -1))
    return thr.view(()), idx.view(())


@torch.library.custom_op("twinops::pst_sparse_linear", mutates_args=())
def _pst_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, U: torch.Tensor, V: torch.Tensor,
    A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, C: torch.Tensor,
    sparsity: float, sparsity_t: torch.Tensor | None, beta: float, alpha1: float, alpha2: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    d_out, d_in = weight.shape
    dev = x.device
    score = torch.empty((d_out, d_in), device=dev, dtype=torch.float32)
    tiles = _tile_blocks()
    grid = (triton.cdiv(d_out, tiles["BLOCK_O"]), triton.cdiv(d_in, tiles["BLOCK_I"]))
    rw, rm = U.shape[1], A.shape[1]
    _score_kernel[grid](
        weight, weight.stride(0), weight.stride(1), U, U.stride(0), U.stride(1), V, V.stride(0), V.stride(1),
        A, A.stride(0), A.stride(1), B, B.stride(0), B.stride(1), R, R.stride(0), C, C.stride(0), score,
        d_out, d_in, rw, rm, beta, alpha1, alpha2, PAD_RW=_pad_rank(rw), PAD_RM=_pad_rank(rm), **tiles,
    )
    thr, idx = _threshold(score, sparsity, sparsity_t)
    w_eff = torch.empty((d_out, d_in), device=dev, dtype=x.dtype)
    _masked_weight_kernel[grid](
        weight, weight.stride(0), weight.stride(1), U, U.stride(0), U.stride(1), V, V.stride(0), V.stride(1),
        score, thr, idx, w_eff, d_out, d_in, rw, beta, PAD_RW=_pad_rank(rw), **tiles,
    )
    if sparsity_t is not None:  # a tensor sparsity outside [0, 1] (or NaN) cannot raise without a sync: NaN weight
        bad = ~((sparsity_t >= 0) & (sparsity_t <= 1))
        w_eff = torch.where(bad, torch.full_like(w_eff, float("nan")), w_eff)
    y = torch.empty((n, d_out), device=dev, dtype=x.dtype)
    _matmul(x, w_eff.t(), y, bias)
    return y, w_eff, score, thr, idx


@_pst_forward.register_fake
def _(x, weight, bias, U, V, A, B, R, C, sparsity, sparsity_t, beta, alpha1, alpha2):
    d_out, d_in = weight.shape
    return (x.new_empty((x.shape[0], d_out)), x.new_empty((d_out, d_in)),
            x.new_empty((d_out, d_in), dtype=torch.float32), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.int64))


@torch.library.custom_op("twinops::pst_sparse_linear_backward", mutates_args=())
def _pst_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
    A: torch.Tensor, B: torch.Tensor, w_eff: torch.Tensor, score: torch.Tensor, thr: torch.Tensor,
    idx: torch.Tensor, beta: float, alpha1: float, alpha2: float, need_x: bool, need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d_in = x.shape
    d_out = weight.shape[0]
    rw, rm = U.shape[1], A.shape[1]
    dev, dt = x.device, x.dtype
    dx = torch.empty((n, d_in) if need_x else (0,), device=dev, dtype=dt)
    if need_x:
        _matmul(grad, w_eff, dx)
    if not need_params:
        return (dx,) + tuple(torch.empty((0,), device=dev, dtype=dt) for _ in range(6))
    blocks = _grad_blocks()
    o_tiles, i_tiles = triton.cdiv(d_out, blocks["BLOCK_O"]), triton.cdiv(d_in, blocks["BLOCK_I"])
    f32 = dict(device=dev, dtype=torch.float32)
    du, dv = torch.empty((i_tiles, d_out, rw), **f32), torch.empty((o_tiles, rw, d_in), **f32)
    da, db = torch.empty((i_tiles, d_out, rm), **f32), torch.empty((o_tiles, rm, d_in), **f32)
    dr, dc = torch.empty((i_tiles, d_out), **f32), torch.empty((o_tiles, d_in), **f32)
    _param_grad_kernel[(o_tiles, i_tiles)](
        grad, grad.stride(0), grad.stride(1), x, x.stride(0), x.stride(1), weight, weight.stride(0), weight.stride(1),
        U, U.stride(0), U.stride(1), V, V.stride(0), V.stride(1), A, A.stride(0), A.stride(1),
        B, B.stride(0), B.stride(1), score, thr, idx, du, dv, da, db, dr, dc,
        n, d_out, d_in, rw, rm, beta, alpha1, alpha2,
        PRECISION=rt.dot_precision(dt), PAD_RW=_pad_rank(rw), PAD_RM=_pad_rank(rm), **blocks,
    )
    return (dx, du.sum(0).to(dt), dv.sum(0).to(dt), da.sum(0).to(dt), db.sum(0).to(dt),
            dr.sum(0).to(dt), dc.sum(0).to(dt))


@_pst_backward.register_fake
def _(grad, x, weight, U, V, A, B, w_eff, score, thr, idx, beta, alpha1, alpha2, need_x, need_params):
    d_out, d_in = weight.shape
    if not need_params:
        return (x.new_empty(x.shape if need_x else (0,)),) + tuple(x.new_empty((0,)) for _ in range(6))
    return (x.new_empty(x.shape if need_x else (0,)), U.new_empty(U.shape), V.new_empty(V.shape),
            A.new_empty(A.shape), B.new_empty(B.shape), x.new_empty((d_out,)), x.new_empty((d_in,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, U, V, A, B, R, C, sparsity, sparsity_t, beta, alpha1, alpha2 = inputs
    _, w_eff, score, thr, idx = output
    ctx.save_for_backward(x, weight, U, V, A, B, w_eff, score, thr, idx)
    ctx.hyper = (beta, alpha1, alpha2)


def _backward(ctx, grad, *_unused):
    x, weight, U, V, A, B, w_eff, score, thr, idx = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_x = needs[0]
    need_params = any(needs[i] for i in (3, 4, 5, 6, 7, 8))
    if not (need_x or need_params):
        return (None,) * 14
    dx, du, dv, da, db, dr, dc = _pst_backward(grad, x, weight, U, V, A, B, w_eff, score, thr, idx, *ctx.hyper,
                                               need_x, need_params)

    def pick(flag, t):
        return t if flag else None

    return (pick(need_x, dx), None, None, pick(needs[3], du), pick(needs[4], dv), pick(needs[5], da),
            pick(needs[6], db), pick(needs[7], dr), pick(needs[8], dc), None, None, None, None, None)


_pst_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API.


def _check_factor_pair(first, second, name1, name2, d_out, d_in, dtype):
    for t, name, shape in ((first, name1, "(d_out, r)"), (second, name2, "(r, d_in)")):
        rt.check_float_tensor(t, name, 2, shape)
        if t.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of x ({dtype}), got {t.dtype}")
    if first.shape[0] != d_out:
        raise ValueError(f"{name1} must have shape (d_out, r) with d_out = {d_out}, got {tuple(first.shape)}")
    if second.shape[1] != d_in:
        raise ValueError(f"{name2} must have shape (r, d_in) with d_in = {d_in}, got {tuple(second.shape)}")
    if first.shape[1] != second.shape[0]:
        raise ValueError(f"{name1} has rank {first.shape[1]} but {name2} has rank {second.shape[0]}: "
                         f"{name1} (d_out, r) and {name2} (r, d_in) must share r")
    r = first.shape[1]
    if not 1 <= r <= min(d_out, d_in):
        raise ValueError(f"rank of {name1}/{name2} must be in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}], "
                         f"got {r}")


def _check_vector(t, name, n, what, dtype):
    rt.check_float_tensor(t, name, 1, f"({what},)")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of x ({dtype}), got {t.dtype}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) ({what},), got {tuple(t.shape)}")


def pst_sparse_linear(x, weight, bias, U, V, A, B, R, C, *, sparsity, beta=1.0, alpha1=1.0, alpha2=1.0):
    """y = x (M * W')^T + b with W' = W + beta U V and M pruning the ``sparsity`` share of the
    smallest PST scores S = |W'| + alpha1 A B + alpha2 (R 1^T + 1 C^T).

    Same arguments and semantics as `twinops.reference.layers.pst.pst_sparse_linear`; returns x's
    dtype. ``weight`` and ``bias`` are frozen (a ``ValueError`` if they require grad); x, U, V, A, B,
    R and C get the straight-through gradients.

    ``sparsity`` may also be a 0-d floating tensor (read in float64; pass float64 for the float's
    exact k): k is then computed on the device, so a schedule that changes it every step neither
    synchronises nor recompiles under ``torch.compile``. Such a tensor is not range-checked on the
    host; a value outside [0, 1] or NaN makes the output NaN.
    """
    rt.check_float_tensor(weight, "weight", 2, "(d_out, d_in)")
    d_out, d_in = weight.shape
    if d_out < 1 or d_in < 1:
        raise ValueError(f"weight must have d_out >= 1 and d_in >= 1, got shape {tuple(weight.shape)}")
    rt.check_tensor(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have shape (..., d_in), got a scalar")
    rt.check_float_tensor(x, "x", x.ndim, "(..., d_in)")
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have shape (..., d_in) with d_in = {d_in} (weight's columns), got {tuple(x.shape)}")
    dtype = x.dtype
    if weight.dtype != dtype:
        raise TypeError(f"weight must have the dtype of x ({dtype}), got {weight.dtype}")
    if bias is not None:
        _check_vector(bias, "bias", d_out, "d_out", dtype)
    _check_factor_pair(U, V, "U", "V", d_out, d_in, dtype)
    _check_factor_pair(A, B, "A", "B", d_out, d_in, dtype)
    _check_vector(R, "R", d_out, "d_out", dtype)
    _check_vector(C, "C", d_in, "d_in", dtype)
    sparsity_t = None
    if isinstance(sparsity, torch.Tensor):
        if sparsity.ndim != 0 or not sparsity.is_floating_point():
            raise ValueError(f"sparsity must be a real number or a 0-d floating tensor, got a {sparsity.dtype} "
                             f"tensor of shape {tuple(sparsity.shape)}")
        if sparsity.requires_grad:
            raise ValueError("sparsity is not differentiable; pass sparsity.detach()")
        sparsity_t, sparsity = sparsity.to(device=x.device), 0.0
    else:
        sparsity = check_real(sparsity, "sparsity", low=0.0, high=1.0)
    beta = check_real(beta, "beta")
    alpha1 = check_real(alpha1, "alpha1")
    alpha2 = check_real(alpha2, "alpha2")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} is frozen in PST (only U, V, A, B, R, C are trained); pass {name}.detach()")
    rt.check_device(("x", x), ("weight", weight), ("bias", bias), ("U", U), ("V", V), ("A", A), ("B", B),
                    ("R", R), ("C", C))
    rows = x.reshape(-1, d_in)
    y = _pst_forward(rows, weight, bias, U, V, A, B, R, C, sparsity, sparsity_t, beta, alpha1, alpha2)[0]
    return y.reshape(tuple(x.shape[:-1]) + (d_out,))


class PSTSparseLinear(torch.nn.Module):
    """Drop-in ``nn.Linear`` replacement trained with PST: a frozen ``weight`` (d_out, d_in) and
    ``bias``, trainable U (N(0, 1)), V (0), A (N(0, 1)), B (0), R (0), C (0). ``sparsity`` is a
    0-d float64 buffer the training loop sets each step with `set_sparsity` (e.g. from
    `cubic_sparsity_schedule`), so a compiled model does not recompile as it changes; the module
    behaves the same in train and eval mode. `masked_weight()` gives the weight to export."""

    def __init__(self, in_features, out_features, bias=True, *, rank_weight=8, rank_mask=8, beta=1.0, alpha1=1.0,
                 alpha2=1.0, sparsity=0.0, device=None, dtype=None):
        super().__init__()
        in_features, out_features = check_int(in_features, "in_features"), check_int(out_features, "out_features")
        rank_weight, rank_mask = check_int(rank_weight, "rank_weight"), check_int(rank_mask, "rank_mask")
        for name, r in (("rank_weight", rank_weight), ("rank_mask", rank_mask)):
            if not 1 <= r <= min(in_features, out_features):
                raise ValueError(f"{name} must be in [1, min(in_features, out_features)] = "
                                 f"[1, {min(in_features, out_features)}], got {r}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.beta = check_real(beta, "beta")
        self.alpha1, self.alpha2 = check_real(alpha1, "alpha1"), check_real(alpha2, "alpha2")
        sparsity = check_real(sparsity, "sparsity", low=0.0, high=1.0)
        self.register_buffer("sparsity", torch.tensor(sparsity, dtype=torch.float64, device=device))
        ref = torch.nn.Linear(in_features, out_features, bias=bias, **kw)  # nn.Linear's initialisation
        self.weight = torch.nn.Parameter(ref.weight.detach(), requires_grad=False)
        self.bias = torch.nn.Parameter(ref.bias.detach(), requires_grad=False) if bias else None
        self.U = torch.nn.Parameter(torch.randn(out_features, rank_weight, **kw))
        self.V = torch.nn.Parameter(torch.zeros(rank_weight, in_features, **kw))
        self.A = torch.nn.Parameter(torch.randn(out_features, rank_mask, **kw))
        self.B = torch.nn.Parameter(torch.zeros(rank_mask, in_features, **kw))
        self.R = torch.nn.Parameter(torch.zeros(out_features, **kw))
        self.C = torch.nn.Parameter(torch.zeros(in_features, **kw))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs) -> "PSTSparseLinear":
        """Wrap a trained ``nn.Linear``: its weight and bias become the frozen ones."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def set_sparsity(self, value) -> None:
        """Set the share of weights to prune, in [0, 1] (a float, or a 0-d tensor on the device)."""
        if isinstance(value, torch.Tensor):
            self.sparsity.copy_(value)
        else:
            self.sparsity.fill_(check_real(value, "sparsity", low=0.0, high=1.0))

    def forward(self, x):
        return pst_sparse_linear(x, self.weight, self.bias, self.U, self.V, self.A, self.B, self.R, self.C,
                                 sparsity=self.sparsity, beta=self.beta, alpha1=self.alpha1, alpha2=self.alpha2)

    @torch.no_grad()
    def masked_weight(self) -> torch.Tensor:
        """M * W' (d_out, d_in) at the current sparsity: the dense weight to deploy."""
        eye = torch.eye(self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        return pst_sparse_linear(eye, self.weight, None, self.U, self.V, self.A, self.B, self.R, self.C,
                                 sparsity=self.sparsity, beta=self.beta, alpha1=self.alpha1,
                                 alpha2=self.alpha2).t().contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank_weight={self.U.shape[1]}, rank_mask={self.A.shape[1]}, beta={self.beta}, "
                f"alpha1={self.alpha1}, alpha2={self.alpha2}")


def cubic_sparsity_schedule(step, total_steps, *, initial_sparsity=0.0, final_sparsity=0.9, initial_warmup=0.1,
                            final_warmup=0.3, frequency=1):
    """PST's cubic sparsity schedule at ``step`` of ``total_steps``. A Python int gives a float; an
    integer tensor gives a float32 tensor of the same shape (torch ops, no kernel: see the module
    docstring). Same arguments and semantics as `twinops.reference.layers.pst.cubic_sparsity_schedule`."""
    total, rho_i, rho_f, w_i, w_f, freq = _schedule_hyper(total_steps, initial_sparsity, final_sparsity,
                                                         initial_warmup, final_warmup, frequency)
    start, end, span = w_i * total, total - w_f * total, total - (w_f + w_i) * total
    if isinstance(step, torch.Tensor):
        if step.dtype not in rt.INT_DTYPES:
            raise TypeError(f"step must be an int or an integer tensor, got {step.dtype}")
        s = step.to(torch.float64)
        progress = s - start if freq == 1 else torch.floor((s - start) / freq) * freq
        cubic = rho_f + (rho_i - rho_f) * (1.0 - progress / span) ** 3
        out = torch.where(s <= start, rho_i, torch.where(s > end, rho_f, cubic))
        return out.to(torch.float32)
    s = check_int(step, "step")
    if s <= start:
        return rho_i
    if s > end:
        return rho_f
    progress = s - start if freq == 1 else math.floor((s - start) / freq) * freq
    return rho_f + (rho_i - rho_f) * (1.0 - progress / span) ** 3


cubic_sparsity_schedule.pure_torch = True  # no kernel, so CPU tensors are fine without the interpreter
