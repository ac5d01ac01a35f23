"""Quality-weighted dual LoRA linear (P2, PETALface) as fused Triton kernels. See
`twinops.reference.layers.dual_lora_linear` for the definition.

Forward, one program per (BLOCK_M rows, BLOCK_N output features) tile:
    the K loop over d_in accumulates the frozen product x Wᵀ *and* the two rank-r projections
    u_i = x A_iᵀ (BLOCK_M x R_i, R_i = r_i padded to 16) from the same loaded x tile; the epilogue
    adds bias + c1 ⊙ M1 ⊙ (u1 B1ᵀ) + c2 ⊙ M2 ⊙ (u2 B2ᵀ) (c1 = s(1 - α), c2 = sα per row) in
    registers, so the two (N, d_out) adapter outputs are never written. Programs of the first
    column tile also store u1, u2 (fp32, (N, r_i)) for the backward.
Backward, with G the upstream gradient and G̃_i = G ⊙ M_i:
    1. rank pass, one program per row tile, loop over d_out: q_i = c_i (G̃_i B_i) (N, r_i) fp32,
       and dα = s (p2·u2 - p1·u1) per row (p_i = G̃_i B_i);
    2. dx = G W + q1 A1 + q2 A2: tiles (rows, d_in features), K loop over d_out, rank epilogue;
    3. dA_i = q_iᵀ x and 4. dB_i = G̃_iᵀ (c_i u_i): the N reduction is split over SPLIT programs
       writing fp32 partial sums (SPLIT, ·, ·), added on the host (deterministic, no atomics).
Extra memory: u and q, 2 (r1 + r2) N fp32; the partial sums SPLIT (r1 + r2)(d_in + d_out) fp32.
The frozen weight and bias get no gradient (they are rejected when they require one).

Is it worth fusing? An estimate (no recorded GPU run yet): at N = 8192, 768 -> 768, r = 16, bf16,
the frozen GEMM is 9.7 GFLOP (~15-20 us on an H100) and every (N, d_out) tensor is 12.6 MB (~4 us
at 3.3 TB/s). torch.compile of the eager form (default mode) keeps cuBLAS for the base GEMM and the
two rank -> d_out products and fuses the elementwise tail, so it writes and re-reads three (N, d_out)
tensors beyond y (~75 MB, ~25 us); the fused forward moves x, W, y and the masks only. The ceiling
is therefore about 2x forward, reached only if these untuned Triton tiles match cuBLAS on the GEMM;
the backward's dx GEMM plus two extra reads of G leaves less room. If the recorded benchmark falls
short of 1.5x, the GEMM rate is the limit and fusing further (the rank passes into the GEMMs) would
not change it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt

__all__ = ["dual_lora_linear", "DualLoRALinear"]

HAS_TRITON_BACKWARD = True

# Untuned guesses pending a GPU sweep, sized so that the pipelined tiles (masks and rank-64 factors
# included, fp32 at two stages) stay within an H100's shared memory. "gemm": forward and dx (BLOCK_N
# is dx's reduction chunk); "skinny": the rank pass, dA and dB, which stream G, the masks and u.
# The interpreter uses 16-wide tiles so small shapes cross them.
GPU_TILES = {
    "gemm": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8),
    "skinny": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4),
}
INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
GPU_SPLIT = 64  # most programs sharing one N reduction (dA, dB)
# Widest rank the kernels hold in registers / shared memory: at 256 the forward's pipelined
# (x, W, A1ᵀ, A2ᵀ) tiles need 384 KB of shared memory on sm_90 (ahead-of-time compile), 128 fits.
MAX_RANK = 128


def _precisions(dtype: torch.dtype) -> dict:
    """``PRECISION`` for products of input-dtype tiles (PyTorch's fp32 matmul setting) and
    ``RANK_PRECISION`` for the rank-r products of fp32 intermediates (u, q, masked G): exact for
    16-bit inputs, whose rounding TF32 would otherwise exceed; the fp32 setting for fp32 inputs."""
    p = rt.dot_precision(dtype)
    return dict(PRECISION=p, RANK_PRECISION=p if dtype == torch.float32 else "ieee")


def _tiles(kind: str, dtype: torch.dtype) -> dict:
    if rt.interpreting():
        return dict(INTERPRETER_TILES)
    stages = 3 if kind == "gemm" and dtype != torch.float32 else 2
    return dict(GPU_TILES[kind], num_stages=stages)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


@triton.jit
def _forward_kernel(
    x_ptr, stride_xn, stride_xk,      # (N, d_in) input rows
    w_ptr, stride_wo, stride_wk,      # (d_out, d_in) frozen weight, nn.Linear layout
    bias_ptr, stride_b,               # (d_out,) frozen bias (unused without HAS_BIAS)
    a1_ptr, stride_a1r, stride_a1k,   # (r1, d_in) first LoRA down factor
    b1_ptr, stride_b1o, stride_b1r,   # (d_out, r1) first LoRA up factor
    a2_ptr, stride_a2r, stride_a2k,   # (r2, d_in)
    b2_ptr, stride_b2o, stride_b2r,   # (d_out, r2)
    alpha_ptr, stride_al,             # (N,) per-row quality weight
    m1_ptr, stride_m1n, stride_m1o,   # (N, d_out) dropout mask of branch 1 (unused without HAS_MASK1)
    m2_ptr, stride_m2n, stride_m2o,   # (N, d_out) dropout mask of branch 2 (unused without HAS_MASK2)
    y_ptr, stride_yn, stride_yo,      # out (N, d_out), x's dtype
    u1_ptr, u2_ptr,                   # out (N, r1), (N, r2) fp32 contiguous: x A_iᵀ, written by column tile 0
    N, D_IN, D_OUT, R1, R2, scale,
    HAS_BIAS: tl.constexpr, HAS_MASK1: tl.constexpr, HAS_MASK2: tl.constexpr,
    PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr, RB1: tl.constexpr, RB2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    r1 = tl.arange(0, RB1).to(tl.int64)
    r2 = tl.arange(0, RB2).to(tl.int64)
    row_ok, col_ok = rows < N, cols < D_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    u1 = tl.zeros((BLOCK_M, RB1), tl.float32)
    u2 = tl.zeros((BLOCK_M, RB2), tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < D_IN
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wo + ks[:, None] * stride_wk,  # (BLOCK_K, BLOCK_N) = Wᵀ tile
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
        a1t = tl.load(a1_ptr + r1[None, :] * stride_a1r + ks[:, None] * stride_a1k,  # (BLOCK_K, RB1) = A1ᵀ tile
                      mask=k_ok[:, None] & (r1 < R1)[None, :], other=0.0)
        u1 = tl.dot(x, a1t, u1, input_precision=PRECISION)
        a2t = tl.load(a2_ptr + r2[None, :] * stride_a2r + ks[:, None] * stride_a2k,
                      mask=k_ok[:, None] & (r2 < R2)[None, :], other=0.0)
        u2 = tl.dot(x, a2t, u2, input_precision=PRECISION)
    # Padded rank columns are 0 for finite x; force them so that inf in x cannot leak NaN through them.
    u1 = tl.where((r1 < R1)[None, :], u1, 0.0)
    u2 = tl.where((r2 < R2)[None, :], u2, 0.0)
    alpha = tl.load(alpha_ptr + rows * stride_al, mask=row_ok, other=0.0).to(tl.float32)
    b1t = tl.load(b1_ptr + cols[None, :] * stride_b1o + r1[:, None] * stride_b1r,  # (RB1, BLOCK_N) = B1ᵀ tile
                  mask=(r1 < R1)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    b2t = tl.load(b2_ptr + cols[None, :] * stride_b2o + r2[:, None] * stride_b2r,
                  mask=(r2 < R2)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    out_mask = row_ok[:, None] & col_ok[None, :]
    lora1 = tl.dot(u1, b1t, input_precision=RANK_PRECISION)
    lora2 = tl.dot(u2, b2t, input_precision=RANK_PRECISION)
    if HAS_MASK1:
        lora1 *= tl.load(m1_ptr + rows[:, None] * stride_m1n + cols[None, :] * stride_m1o,
                         mask=out_mask, other=0.0).to(tl.float32)
    if HAS_MASK2:
        lora2 *= tl.load(m2_ptr + rows[:, None] * stride_m2n + cols[None, :] * stride_m2o,
                         mask=out_mask, other=0.0).to(tl.float32)
    acc += (scale * (1.0 - alpha))[:, None] * lora1 + (scale * alpha)[:, None] * lora2
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty),
             mask=out_mask)
    if pid_n == 0:
        tl.store(u1_ptr + rows[:, None] * R1 + r1[None, :], u1, mask=row_ok[:, None] & (r1 < R1)[None, :])
        tl.store(u2_ptr + rows[:, None] * R2 + r2[None, :], u2, mask=row_ok[:, None] & (r2 < R2)[None, :])


@triton.jit
def _rank_grad_kernel(
    g_ptr, stride_gn, stride_go,      # (N, d_out) upstream gradient G
    b1_ptr, stride_b1o, stride_b1r,   # (d_out, r1)
    b2_ptr, stride_b2o, stride_b2r,   # (d_out, r2)
    alpha_ptr, stride_al,             # (N,)
    m1_ptr, stride_m1n, stride_m1o,   # (N, d_out) masks (unused without HAS_MASK*)
    m2_ptr, stride_m2n, stride_m2o,
    u1_ptr, u2_ptr,                   # (N, r1), (N, r2) fp32 contiguous from the forward
    q1_ptr, q2_ptr,                   # out (N, r1), (N, r2) fp32 contiguous: c_i (G̃_i B_i)
    dalpha_ptr,                       # out (N,) alpha's dtype (unused without ALPHA_GRAD)
    N, D_OUT, R1, R2, scale,
    HAS_MASK1: tl.constexpr, HAS_MASK2: tl.constexpr, ALPHA_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr, RB1: tl.constexpr, RB2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    r1 = tl.arange(0, RB1).to(tl.int64)
    r2 = tl.arange(0, RB2).to(tl.int64)
    row_ok = rows < N
    p1 = tl.zeros((BLOCK_M, RB1), tl.float32)
    p2 = tl.zeros((BLOCK_M, RB2), tl.float32)
    for o0 in range(0, D_OUT, BLOCK_N):
        cols = o0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < D_OUT
        tile = row_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_go, mask=tile, other=0.0).to(tl.float32)
        g1 = g
        if HAS_MASK1:
            g1 = g * tl.load(m1_ptr + rows[:, None] * stride_m1n + cols[None, :] * stride_m1o, mask=tile,
                             other=0.0).to(tl.float32)
        g2 = g
        if HAS_MASK2:
            g2 = g * tl.load(m2_ptr + rows[:, None] * stride_m2n + cols[None, :] * stride_m2o, mask=tile,
                             other=0.0).to(tl.float32)
        b1 = tl.load(b1_ptr + cols[:, None] * stride_b1o + r1[None, :] * stride_b1r,
                     mask=col_ok[:, None] & (r1 < R1)[None, :], other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + cols[:, None] * stride_b2o + r2[None, :] * stride_b2r,
                     mask=col_ok[:, None] & (r2 < R2)[None, :], other=0.0).to(tl.float32)
        p1 = tl.dot(g1, b1, p1, input_precision=RANK_PRECISION)
        p2 = tl.dot(g2, b2, p2, input_precision=RANK_PRECISION)
    alpha = tl.load(alpha_ptr + rows * stride_al, mask=row_ok, other=0.0).to(tl.float32)
    keep1 = row_ok[:, None] & (r1 < R1)[None, :]
    keep2 = row_ok[:, None] & (r2 < R2)[None, :]
    tl.store(q1_ptr + rows[:, None] * R1 + r1[None, :], (scale * (1.0 - alpha))[:, None] * p1, mask=keep1)
    tl.store(q2_ptr + rows[:, None] * R2 + r2[None, :], (scale * alpha)[:, None] * p2, mask=keep2)
    if ALPHA_GRAD:
        u1 = tl.load(u1_ptr + rows[:, None] * R1 + r1[None, :], mask=keep1, other=0.0)
        u2 = tl.load(u2_ptr + rows[:, None] * R2 + r2[None, :], mask=keep2, other=0.0)
        d_alpha = scale * (tl.sum(p2 * u2, axis=1) - tl.sum(p1 * u1, axis=1))
        tl.store(dalpha_ptr + rows, d_alpha.to(dalpha_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _dx_kernel(
    g_ptr, stride_gn, stride_go,      # (N, d_out) upstream gradient
    w_ptr, stride_wo, stride_wk,      # (d_out, d_in) frozen weight
    a1_ptr, stride_a1r, stride_a1k,   # (r1, d_in)
    a2_ptr, stride_a2r, stride_a2k,   # (r2, d_in)
    q1_ptr, q2_ptr,                   # (N, r1), (N, r2) fp32 contiguous from the rank pass
    dx_ptr, stride_dn, stride_dk,     # out (N, d_in), x's dtype
    N, D_IN, D_OUT, R1, R2,
    PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr, RB1: tl.constexpr, RB2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    r1 = tl.arange(0, RB1).to(tl.int64)
    r2 = tl.arange(0, RB2).to(tl.int64)
    row_ok, k_ok = rows < N, ks < D_IN
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for o0 in range(0, D_OUT, BLOCK_N):
        cols = o0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < D_OUT
        g = tl.load(g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_go,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wo + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    q1 = tl.load(q1_ptr + rows[:, None] * R1 + r1[None, :], mask=row_ok[:, None] & (r1 < R1)[None, :], other=0.0)
    q2 = tl.load(q2_ptr + rows[:, None] * R2 + r2[None, :], mask=row_ok[:, None] & (r2 < R2)[None, :], other=0.0)
    a1 = tl.load(a1_ptr + r1[:, None] * stride_a1r + ks[None, :] * stride_a1k,
                 mask=(r1 < R1)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    a2 = tl.load(a2_ptr + r2[:, None] * stride_a2r + ks[None, :] * stride_a2k,
                 mask=(r2 < R2)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.dot(q1, a1, acc, input_precision=RANK_PRECISION)
    acc = tl.dot(q2, a2, acc, input_precision=RANK_PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dn + ks[None, :] * stride_dk, acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _da_kernel(
    x_ptr, stride_xn, stride_xk,      # (N, d_in) input rows
    q1_ptr, q2_ptr,                   # (N, r1), (N, r2) fp32 contiguous from the rank pass
    da1_ptr, da2_ptr,                 # out (SPLIT, r1, d_in), (SPLIT, r2, d_in) fp32 contiguous partial sums
    N, D_IN, R1, R2, ROWS_PER_SPLIT,
    PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr, RB1: tl.constexpr, RB2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA_i[:, k-tile] = sum over this split's rows of q_iᵀ x."""
    ks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    r1 = tl.arange(0, RB1).to(tl.int64)
    r2 = tl.arange(0, RB2).to(tl.int64)
    k_ok = ks < D_IN
    acc1 = tl.zeros((RB1, BLOCK_K), tl.float32)
    acc2 = tl.zeros((RB2, BLOCK_K), tl.float32)
    start = split * ROWS_PER_SPLIT
    for n0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
        rows = start + n0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = (rows < N) & (n0 + tl.arange(0, BLOCK_M) < ROWS_PER_SPLIT)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        q1t = tl.load(q1_ptr + rows[None, :] * R1 + r1[:, None], mask=(r1 < R1)[:, None] & row_ok[None, :], other=0.0)
        q2t = tl.load(q2_ptr + rows[None, :] * R2 + r2[:, None], mask=(r2 < R2)[:, None] & row_ok[None, :], other=0.0)
        acc1 = tl.dot(q1t, x, acc1, input_precision=RANK_PRECISION)
        acc2 = tl.dot(q2t, x, acc2, input_precision=RANK_PRECISION)
    tl.store(da1_ptr + split * R1 * D_IN + r1[:, None] * D_IN + ks[None, :], acc1,
             mask=(r1 < R1)[:, None] & k_ok[None, :])
    tl.store(da2_ptr + split * R2 * D_IN + r2[:, None] * D_IN + ks[None, :], acc2,
             mask=(r2 < R2)[:, None] & k_ok[None, :])


@triton.jit
def _db_kernel(
    g_ptr, stride_gn, stride_go,      # (N, d_out) upstream gradient
    m1_ptr, stride_m1n, stride_m1o,   # (N, d_out) masks (unused without HAS_MASK*)
    m2_ptr, stride_m2n, stride_m2o,
    alpha_ptr, stride_al,             # (N,)
    u1_ptr, u2_ptr,                   # (N, r1), (N, r2) fp32 contiguous from the forward
    db1_ptr, db2_ptr,                 # out (SPLIT, d_out, r1), (SPLIT, d_out, r2) fp32 contiguous partial sums
    N, D_OUT, R1, R2, ROWS_PER_SPLIT, scale,
    HAS_MASK1: tl.constexpr, HAS_MASK2: tl.constexpr,
    PRECISION: tl.constexpr, RANK_PRECISION: tl.constexpr, RB1: tl.constexpr, RB2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dB_i[o-tile, :] = sum over this split's rows of G̃_iᵀ (c_i u_i)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    r1 = tl.arange(0, RB1).to(tl.int64)
    r2 = tl.arange(0, RB2).to(tl.int64)
    col_ok = cols < D_OUT
    acc1 = tl.zeros((BLOCK_N, RB1), tl.float32)
    acc2 = tl.zeros((BLOCK_N, RB2), tl.float32)
    start = split * ROWS_PER_SPLIT
    for n0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
        rows = start + n0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = (rows < N) & (n0 + tl.arange(0, BLOCK_M) < ROWS_PER_SPLIT)
        tile = col_ok[:, None] & row_ok[None, :]
        gt = tl.load(g_ptr + rows[None, :] * stride_gn + cols[:, None] * stride_go,  # (BLOCK_N, BLOCK_M) = Gᵀ tile
                     mask=tile, other=0.0).to(tl.float32)
        g1, g2 = gt, gt
        if HAS_MASK1:
            g1 = gt * tl.load(m1_ptr + rows[None, :] * stride_m1n + cols[:, None] * stride_m1o, mask=tile,
                              other=0.0).to(tl.float32)
        if HAS_MASK2:
            g2 = gt * tl.load(m2_ptr + rows[None, :] * stride_m2n + cols[:, None] * stride_m2o, mask=tile,
                              other=0.0).to(tl.float32)
        alpha = tl.load(alpha_ptr + rows * stride_al, mask=row_ok, other=0.0).to(tl.float32)
        u1 = tl.load(u1_ptr + rows[:, None] * R1 + r1[None, :], mask=row_ok[:, None] & (r1 < R1)[None, :], other=0.0)
        u2 = tl.load(u2_ptr + rows[:, None] * R2 + r2[None, :], mask=row_ok[:, None] & (r2 < R2)[None, :], other=0.0)
        acc1 = tl.dot(g1, (scale * (1.0 - alpha))[:, None] * u1, acc1, input_precision=RANK_PRECISION)
        acc2 = tl.dot(g2, (scale * alpha)[:, None] * u2, acc2, input_precision=RANK_PRECISION)
    tl.store(db1_ptr + split * D_OUT * R1 + cols[:, None] * R1 + r1[None, :], acc1,
             mask=col_ok[:, None] & (r1 < R1)[None, :])
    tl.store(db2_ptr + split * D_OUT * R2 + cols[:, None] * R2 + r2[None, :], acc2,
             mask=col_ok[:, None] & (r2 < R2)[None, :])


def _strides2(t: torch.Tensor | None, like: torch.Tensor):
    """(tensor, stride 0, stride 1) for an optional 2-D tensor; a dummy pointer when absent."""
    if t is None:
        return like, 0, 0
    return t, t.stride(0), t.stride(1)


@torch.library.custom_op("twinops::dual_lora_linear", mutates_args=())
def _dual_lora_linear(
    x: torch.Tensor, weight: torch.Tensor, lora_a1: torch.Tensor, lora_b1: torch.Tensor, lora_a2: torch.Tensor,
    lora_b2: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, mask1: torch.Tensor | None,
    mask2: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d_in = x.shape
    d_out, r1, r2 = weight.shape[0], lora_a1.shape[0], lora_a2.shape[0]
    y = torch.empty((n, d_out), device=x.device, dtype=x.dtype)
    u1 = torch.empty((n, r1), device=x.device, dtype=torch.float32)
    u2 = torch.empty((n, r2), device=x.device, dtype=torch.float32)
    if n == 0:
        return y, u1, u2
    t = _tiles("gemm", x.dtype)
    grid = (triton.cdiv(n, t["BLOCK_M"]), triton.cdiv(d_out, t["BLOCK_N"]))
    _forward_kernel[grid](
        x, x.stride(0), x.stride(1), weight, weight.stride(0), weight.stride(1),
        bias if bias is not None else x, bias.stride(0) if bias is not None else 0,
        lora_a1, lora_a1.stride(0), lora_a1.stride(1), lora_b1, lora_b1.stride(0), lora_b1.stride(1),
        lora_a2, lora_a2.stride(0), lora_a2.stride(1), lora_b2, lora_b2.stride(0), lora_b2.stride(1),
        alpha, alpha.stride(0), *_strides2(mask1, x), *_strides2(mask2, x),
        y, y.stride(0), y.stride(1), u1, u2, n, d_in, d_out, r1, r2, scale,
        HAS_BIAS=bias is not None, HAS_MASK1=mask1 is not None, HAS_MASK2=mask2 is not None,
        **_precisions(x.dtype), RB1=_rank_block(r1), RB2=_rank_block(r2), **t,
    )
    return y, u1, u2


@_dual_lora_linear.register_fake
def _(x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias, mask1, mask2, scale):
    n = x.shape[0]
    return (x.new_empty((n, weight.shape[0])), x.new_empty((n, lora_a1.shape[0]), dtype=torch.float32),
            x.new_empty((n, lora_a2.shape[0]), dtype=torch.float32))


def _split(n: int, block_m: int) -> tuple[int, int]:
    """(programs sharing the N reduction, rows each): one block of rows each under the interpreter
    (so the partial sums are exercised), at most GPU_SPLIT on the GPU."""
    blocks = max(1, triton.cdiv(n, block_m))
    split = blocks if rt.interpreting() else min(blocks, GPU_SPLIT)
    rows = triton.cdiv(blocks, split) * block_m
    return triton.cdiv(n, rows), rows


@torch.library.custom_op("twinops::dual_lora_linear_backward", mutates_args=())
def _dual_lora_linear_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a1: torch.Tensor, lora_b1: torch.Tensor,
    lora_a2: torch.Tensor, lora_b2: torch.Tensor, alpha: torch.Tensor, mask1: torch.Tensor | None,
    mask2: torch.Tensor | None, u1: torch.Tensor, u2: torch.Tensor, scale: float, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, lora_a1, lora_b1, lora_a2, lora_b2, alpha); an empty (0,) tensor where
    ``needs`` is False."""
    need_x, need_a1, need_b1, need_a2, need_b2, need_alpha = needs
    n, d_in = x.shape
    d_out, r1, r2 = weight.shape[0], lora_a1.shape[0], lora_a2.shape[0]
    dev = x.device
    empty = lambda: x.new_empty((0,))  # noqa: E731  (a fresh one per output: outputs may not alias)
    t, sk = _tiles("gemm", x.dtype), _tiles("skinny", x.dtype)
    launch = {k: v for k, v in sk.items() if k.startswith("num_")}
    prec, rb1, rb2 = _precisions(x.dtype), _rank_block(r1), _rank_block(r2)
    masks = (*_strides2(mask1, x), *_strides2(mask2, x))
    flags = dict(HAS_MASK1=mask1 is not None, HAS_MASK2=mask2 is not None)
    dx = torch.empty((n, d_in), device=dev, dtype=x.dtype) if need_x else empty()
    dalpha = torch.empty((n,), device=dev, dtype=alpha.dtype) if need_alpha else empty()
    q1 = torch.empty((n, r1), device=dev, dtype=torch.float32)
    q2 = torch.empty((n, r2), device=dev, dtype=torch.float32)
    if n > 0 and (need_x or need_a1 or need_a2 or need_alpha):
        _rank_grad_kernel[(triton.cdiv(n, sk["BLOCK_M"]),)](
            grad, grad.stride(0), grad.stride(1), lora_b1, lora_b1.stride(0), lora_b1.stride(1),
            lora_b2, lora_b2.stride(0), lora_b2.stride(1), alpha, alpha.stride(0), *masks, u1, u2, q1, q2,
            dalpha if need_alpha else q1, n, d_out, r1, r2, scale, ALPHA_GRAD=need_alpha, **prec,
            RB1=rb1, RB2=rb2, BLOCK_M=sk["BLOCK_M"], BLOCK_N=sk["BLOCK_N"], **flags, **launch,
        )
    if n > 0 and need_x:
        grid = (triton.cdiv(n, t["BLOCK_M"]), triton.cdiv(d_in, t["BLOCK_K"]))
        _dx_kernel[grid](
            grad, grad.stride(0), grad.stride(1), weight, weight.stride(0), weight.stride(1),
            lora_a1, lora_a1.stride(0), lora_a1.stride(1), lora_a2, lora_a2.stride(0), lora_a2.stride(1),
            q1, q2, dx, dx.stride(0), dx.stride(1), n, d_in, d_out, r1, r2,
            **prec, RB1=rb1, RB2=rb2, **t,
        )
    da1, da2, db1, db2 = empty(), empty(), empty(), empty()
    split, rows_per = _split(n, sk["BLOCK_M"])
    if need_a1 or need_a2:
        p1 = torch.zeros((split, r1, d_in), device=dev, dtype=torch.float32)
        p2 = torch.zeros((split, r2, d_in), device=dev, dtype=torch.float32)
        if n > 0:
            _da_kernel[(triton.cdiv(d_in, sk["BLOCK_K"]), split)](
                x, x.stride(0), x.stride(1), q1, q2, p1, p2, n, d_in, r1, r2, rows_per,
                **prec, RB1=rb1, RB2=rb2, BLOCK_M=sk["BLOCK_M"], BLOCK_K=sk["BLOCK_K"], **launch,
            )
        da1 = p1.sum(0).to(lora_a1.dtype) if need_a1 else empty()
        da2 = p2.sum(0).to(lora_a2.dtype) if need_a2 else empty()
    if need_b1 or need_b2:
        p1 = torch.zeros((split, d_out, r1), device=dev, dtype=torch.float32)
        p2 = torch.zeros((split, d_out, r2), device=dev, dtype=torch.float32)
        if n > 0:
            _db_kernel[(triton.cdiv(d_out, sk["BLOCK_N"]), split)](
                grad, grad.stride(0), grad.stride(1), *masks, alpha, alpha.stride(0), u1, u2, p1, p2,
                n, d_out, r1, r2, rows_per, scale, **prec, RB1=rb1, RB2=rb2,
                BLOCK_M=sk["BLOCK_M"], BLOCK_N=sk["BLOCK_N"], **flags, **launch,
            )
        db1 = p1.sum(0).to(lora_b1.dtype) if need_b1 else empty()
        db2 = p2.sum(0).to(lora_b2.dtype) if need_b2 else empty()
    return dx, da1, db1, da2, db2, dalpha


@_dual_lora_linear_backward.register_fake
def _(grad, x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, mask1, mask2, u1, u2, scale, needs):
    shapes = (x, lora_a1, lora_b1, lora_a2, lora_b2, alpha)
    return tuple(t.new_empty(t.shape) if need else x.new_empty((0,)) for t, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias, mask1, mask2, scale = inputs
    ctx.save_for_backward(x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, mask1, mask2, output[1], output[2])
    ctx.scale = scale


def _backward(ctx, grad, grad_u1, grad_u2):
    x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, mask1, mask2, u1, u2 = ctx.saved_tensors
    want = ctx.needs_input_grad
    needs = [want[0], want[2], want[3], want[4], want[5], want[6]]
    none = (None,) * 11
    if not any(needs):
        return none
    dx, da1, db1, da2, db2, dalpha = _dual_lora_linear_backward(
        grad, x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, mask1, mask2, u1, u2, ctx.scale, needs)
    pick = lambda t, need: t if need else None  # noqa: E731
    return (pick(dx, needs[0]), None, pick(da1, needs[1]), pick(db1, needs[2]), pick(da2, needs[3]),
            pick(db2, needs[4]), pick(dalpha, needs[5]), None, None, None, None)


_dual_lora_linear.register_autograd(_backward, setup_context=_setup_context)


def _check_shape(t: torch.Tensor, name: str, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(t.shape)}")


def dual_lora_linear(x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias=None,
                     dropout_mask1=None, dropout_mask2=None, *, scale=1.0):
    """Frozen ``x @ weight.T + bias`` plus two LoRA branches mixed per row by (1 - alpha) and alpha.

    Same arguments and semantics as `twinops.reference.layers.dual_lora_linear`; returns x's dtype.
    Gradients reach ``x``, the four LoRA factors and ``alpha``; ``weight`` and ``bias`` are frozen
    and must not require grad. Ranks above ``MAX_RANK`` (128) are a ``ValueError`` here. The factors, weight and bias must have x's dtype; ``alpha`` and the
    masks may be any float dtype.
    """
    rt.check_float_tensor(x, "x", 2, "(N, d_in)")
    n, d_in = x.shape
    rt.check_float_tensor(weight, "weight", 2, "(d_out, d_in)")
    d_out = weight.shape[0]
    _check_shape(weight, "weight", (d_out, d_in), "(d_out, d_in)")
    for a_name, b_name, a, b in (("lora_a1", "lora_b1", lora_a1, lora_b1), ("lora_a2", "lora_b2", lora_a2, lora_b2)):
        rt.check_float_tensor(a, a_name, 2, "(r, d_in)")
        r = a.shape[0]
        if r < 1:
            raise ValueError(f"{a_name} must have rank r >= 1 rows, got shape {tuple(a.shape)}")
        if r > min(d_in, d_out):
            raise ValueError(f"{a_name} has rank r = {r}, larger than the dimensions of weight "
                             f"(d_out, d_in) = {(d_out, d_in)}: the rank must be <= min(d_in, d_out)")
        _check_shape(a, a_name, (r, d_in), "(r, d_in)")
        if r > MAX_RANK:
            raise ValueError(f"{a_name} has rank r = {r}: the fused kernels support ranks up to {MAX_RANK} "
                             "(use the reference or the eager form beyond that)")
        rt.check_float_tensor(b, b_name, 2, "(d_out, r)")
        _check_shape(b, b_name, (d_out, r), "(d_out, r)")
    rt.check_float_tensor(alpha, "alpha", 1, "(N,)")
    _check_shape(alpha, "alpha", (n,), "(N,)")
    if bias is not None:
        rt.check_float_tensor(bias, "bias", 1, "(d_out,)")
        _check_shape(bias, "bias", (d_out,), "(d_out,)")
    for name, m in (("dropout_mask1", dropout_mask1), ("dropout_mask2", dropout_mask2)):
        if m is not None:
            rt.check_float_tensor(m, name, 2, "(N, d_out)")
            _check_shape(m, name, (n, d_out), "(N, d_out)")
    scale = check_real(scale, "scale")
    for name, t in (("weight", weight), ("lora_a1", lora_a1), ("lora_b1", lora_b1), ("lora_a2", lora_a2),
                    ("lora_b2", lora_b2), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} is the frozen layer's and gets no gradient; pass {name}.detach() "
                             "(or set requires_grad=False)")
    rt.check_device(("x", x), ("weight", weight), ("lora_a1", lora_a1), ("lora_b1", lora_b1),
                    ("lora_a2", lora_a2), ("lora_b2", lora_b2), ("alpha", alpha), ("bias", bias),
                    ("dropout_mask1", dropout_mask1), ("dropout_mask2", dropout_mask2))
    if dropout_mask1 is not None:
        dropout_mask1 = dropout_mask1.detach()
    if dropout_mask2 is not None:
        dropout_mask2 = dropout_mask2.detach()
    return _dual_lora_linear(x, weight, lora_a1, lora_b1, lora_a2, lora_b2, alpha, bias,
                             dropout_mask1, dropout_mask2, scale)[0]


class DualLoRALinear(torch.nn.Module):
    """``nn.Module`` form of `dual_lora_linear` (the authors' ``LoRALinearTwo``).

    ``weight`` (out_features, in_features) and ``bias`` are frozen parameters
    (``requires_grad=False``, `torch.nn.Linear` layout, so a pretrained linear's state loads
    directly; see `from_linear`); ``lora_a1``/``lora_a2`` (r, in) start N(0, (1/r)^2) and
    ``lora_b1``/``lora_b2`` (out, r) start at 0, so the layer starts equal to the frozen one.
    ``forward(x, alpha)``: x (..., in_features); alpha of shape x.shape[:k] for some k (aligned from
    the left: (B,) for x of shape (B, T, in) gives one value per image, repeated over its tokens).
    In training mode with ``dropout`` p > 0 independent inverted
    dropout masks are drawn for the two branches (default p = 0.1, as the authors); in evaluation
    mode there is none.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, *, scale: float = 1.0, bias: bool = True,
                 dropout: float = 0.1, device=None, dtype=None):
        super().__init__()
        if not 1 <= r <= min(in_features, out_features):
            raise ValueError(f"r must lie in [1, min(in_features, out_features)] = "
                             f"[1, {min(in_features, out_features)}], "
                             f"got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        kw = dict(device=device, dtype=dtype)
        base = torch.nn.Linear(in_features, out_features, bias=bias, **kw)
        self.weight = torch.nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = torch.nn.Parameter(base.bias.detach(), requires_grad=False) if bias else None
        self.lora_a1 = torch.nn.Parameter(torch.randn(r, in_features, **kw) / r)
        self.lora_b1 = torch.nn.Parameter(torch.zeros(out_features, r, **kw))
        self.lora_a2 = torch.nn.Parameter(torch.randn(r, in_features, **kw) / r)
        self.lora_b2 = torch.nn.Parameter(torch.zeros(out_features, r, **kw))
        self.r, self.scale, self.dropout = r, float(scale), float(dropout)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, r: int = 8, **kwargs) -> "DualLoRALinear":
        """Wrap a pretrained linear layer: its weight and bias are copied and frozen."""
        layer = cls(linear.in_features, linear.out_features, r, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x, alpha):
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        a = torch.as_tensor(alpha, device=x.device)
        if a.dim() > len(lead):
            raise ValueError(f"alpha must broadcast to x.shape[:-1] = {tuple(lead)}, got shape {tuple(a.shape)}")
        a = a.reshape(tuple(a.shape) + (1,) * (len(lead) - a.dim())).expand(lead).reshape(-1)
        masks = [None, None]
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            shape = (rows.shape[0], self.weight.shape[0])
            masks = [torch.bernoulli(torch.full(shape, keep, device=x.device)).to(x.dtype) / keep for _ in range(2)]
        y = dual_lora_linear(rows, self.weight, self.lora_a1, self.lora_b1, self.lora_a2, self.lora_b2,
                             a.to(x.dtype) if not a.is_floating_point() else a, self.bias, *masks, scale=self.scale)
        return y.reshape(*lead, self.weight.shape[0])

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, r={self.r}, "
                f"scale={self.scale}, dropout={self.dropout}, bias={self.bias is not None}")
