"""PYRA token merging (P20) as Triton kernels. See `twinops.reference.layers.pyra_token_merge` for the
definition and every choice of semantics.

Four launches per forward, two (three with parameter gradients, counting the small host sums) per
backward; nothing of size (T/2) x (T/2) is ever stored.

1. ``_match_kernel``, grid (N, A / BLOCK_A): a program owns BLOCK_A tokens of set A (the even tokens)
   of one image and sweeps set B (the odd tokens) in BLOCK_B tiles. ``tl.dot`` forms the key products
   (C_k walked in BLOCK_K chunks, the B rows' squared norms summed on the way), the tile is divided by
   both norms, and a running (max, argmax) keeps the best partner: a later tile replaces it only when
   strictly larger, and ``tl.argmax`` breaks ties to the left, so ties go to the lowest index. Writes
   node_max (N, A) fp32 and node_idx (N, A) int32. A non-finite key makes its row's node_max NaN.
2. ``_rank_kernel``, grid (N,): the stable descending sort of node_max as a rank count,
   rank_i = #{j : s_j > s_i or (s_j = s_i and j < i)} (A^2 / 2 comparisons per image, in BLOCK_RANK
   tiles; about 10^4 at ViT-B). Ranks below r are the sources; the kernel writes the index maps, all
   int32: ``src_tok`` (N, r) and ``dst_tok`` (N, r) (token indices of each pair, in rank order),
   ``dst_pos`` (N, r) (the output position of each pair's destination), ``out_tok`` (N, T - r) (the input
   token of each output; with a class token the unmerged tokens go in index order, position
   i - #{sources below i}), and a per-image flag for non-finite keys.
3. ``_pair_stats_kernel``, grid (N, r / BLOCK_R): per pair, LayerNorm statistics of P = S + D (two
   passes over C: the mean, then centred moments) and the per-pair gate w2 = 2 sigma(Y . b) - 1, with
   Y . b = rstd sum_c (P - mean) gamma b + sum_c beta b. Writes (3, N, r) fp32: mean, rstd, w2.
4. ``_merge_kernel``, grid (N, C / BLOCK_C): a program owns one channel chunk of one image and holds
   all r pairs of that chunk (R_BLOCK x BLOCK_C): it rebuilds P, Y and the channel gate
   w1_c = 2 sigma(sum_k a_k Y_kc) (a reduction over the pairs, complete in the program), forms
   S' = S (1 + w1 w2), then walks the output tokens in BLOCK_T blocks. The scatter of S' into the
   destinations is a product with the block's one-hot match matrix ``onehot[o, k] = (dst_tok[k] ==
   out_tok[o])`` (fp32, exact "ieee" dot): deterministic, no atomics, and a destination picked by
   several sources gets all of them. Every output is (x m + sum S') / (m + sum m_src) (an unmerged
   token has no match and gets x m / m).

Backward (upstream G on x_out; size_out has none). With Gd = G / size_out and, for pair k,
G_k = Gd[dst_pos_k]: dw1_c = sum_k G S w2, du = dw1 w1 (1 - w1 / 2) (complete per chunk),
dw2_k = sum_c G S w1 and dv = dw2 (1 + w2)(1 - w2) / 2 need all channels, and so do the LayerNorm
backward's two means. ``_bwd_partials_kernel`` (grid (N, C / BLOCK_C)) writes per chunk the partial
sums sum_c G S w1, sum_c Y du, sum_c gamma du Yhat and sum_c gamma b Yhat (per pair) and
sum_c gamma du (per image), (N, chunks, 5, R) fp32. ``_bwd_kernel`` (same grid) adds the chunks' sums
in a fixed order (deterministic), recomputes the chunk, forms dY = a_k du_c + b_c dv_k and
dP = rstd (gamma dY - mean_c(gamma dY) - Yhat mean_c(gamma dY Yhat)), where the means come from the
partial sums, writes the sources' dx = m (G_k (1 + w1 w2) + dP) and every other token's
dx = m (Gd + one-hot @ dP), and per-image partial gradients of b, gamma and beta ((3, N, C) fp32,
added over N on the host; a from the partial sums).

Extra memory: O(N T) indices and statistics, the (N, chunks, 5, R) partial sums and the (3, N, C)
parameter partials. Reads: the forward reads x twice for the 2r pair rows (statistics, merge) and once
for the rest; the backward reads the pair rows twice and G, x, m once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_bool, check_int, check_real
from .. import _runtime as rt

__all__ = ["pyra_token_merge", "PyraTokenMerge"]

HAS_TRITON_BACKWARD = True

NORM_EPS = 1e-12


def _blocks(c: int, ck: int, r: int) -> dict:
    """Tiles: 16 under the interpreter (test shapes cross every boundary), GPU sizes otherwise."""
    r_block = max(16, triton.next_power_of_2(max(r, 1)))
    if rt.interpreting():
        return dict(BLOCK_A=16, BLOCK_B=16, BLOCK_K=16, BLOCK_R=16, BLOCK_C=16, BLOCK_T=16, R_BLOCK=r_block,
                    BLOCK_RANK=16, BLOCK_CS=16, num_warps=1)
    # The merge and backward programs hold R_BLOCK x BLOCK_C fp32 tiles of every pair: narrower chunks
    # and more warps when r is large. The statistics kernel (few programs, two passes over C) takes
    # wide chunks so each pass is a few long loads rather than many short dependent ones.
    block_c = 64 if r_block <= 32 else 32
    return dict(BLOCK_A=64, BLOCK_B=64, BLOCK_K=64, BLOCK_R=16, BLOCK_C=block_c, BLOCK_T=32, R_BLOCK=r_block,
                BLOCK_RANK=64, BLOCK_CS=256, num_warps=4 if r_block <= 32 else 8)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _match_kernel(
    k_ptr, stride_kn, stride_kt, stride_kc,   # (N, T, C_k) keys, (i, t, c) at i*stride_kn + t*stride_kt + c*stride_kc
    max_ptr, idx_ptr,                         # out (N, A) fp32 best score / int32 best B index, contiguous
    T, CK, NA, NB,                            # tokens, key width, |A| = ceil(T/2), |B| = floor(T/2)
    CLASS_TOKEN: tl.constexpr, DISTILL_TOKEN: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    a_ids = tl.program_id(1).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)  # index in A
    a_ok = a_ids < NA
    base = k_ptr + img * stride_kn
    a_rows = base + (2 * a_ids)[:, None] * stride_kt  # A token i is token 2i

    a_sq = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for k0 in range(0, CK, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        ka = tl.load(a_rows + ks[None, :] * stride_kc, mask=a_ok[:, None] & (ks[None, :] < CK), other=0.0)
        ka = ka.to(tl.float32)
        a_sq += tl.sum(ka * ka, axis=1)
    a_norm = tl.maximum(tl.sqrt(a_sq), 1e-12)

    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_A,), dtype=tl.int32)
    bad = tl.zeros((BLOCK_A,), dtype=tl.int32)  # a NaN score was seen (a non-finite key)
    for b0 in range(0, NB, BLOCK_B):
        b_ids = b0 + tl.arange(0, BLOCK_B).to(tl.int64)  # index in B; B token j is token 2j + 1
        b_ok = b_ids < NB
        b_rows = base + (2 * b_ids + 1)[:, None] * stride_kt
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        b_sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for k0 in range(0, CK, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            ka = tl.load(a_rows + ks[None, :] * stride_kc, mask=a_ok[:, None] & (ks[None, :] < CK), other=0.0)
            kb = tl.load(b_rows + ks[None, :] * stride_kc, mask=b_ok[:, None] & (ks[None, :] < CK), other=0.0)
            acc = tl.dot(ka, tl.trans(kb), acc, input_precision=PRECISION)
            kb = kb.to(tl.float32)
            b_sq += tl.sum(kb * kb, axis=1)
        score = acc / a_norm[:, None] / tl.maximum(tl.sqrt(b_sq), 1e-12)[None, :]
        is_nan = (score != score) & b_ok[None, :]
        bad = tl.maximum(bad, tl.max(is_nan.to(tl.int32), axis=1))
        keep = b_ok[None, :] & (score == score)
        if CLASS_TOKEN:
            keep = keep & (a_ids[:, None] != 0)
        if DISTILL_TOKEN:
            keep = keep & (b_ids[None, :] != 0)
        score = tl.where(keep, score, float("-inf"))
        tile_best = tl.max(score, axis=1)
        tile_idx = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32) + b0
        take = tile_best > best  # strictly larger: an earlier (lower) index keeps a tie
        best_idx = tl.where(take, tile_idx, best_idx)
        best = tl.where(take, tile_best, best)
    out = img * NA + a_ids
    tl.store(max_ptr + out, tl.where(bad > 0, float("nan"), best), mask=a_ok)
    tl.store(idx_ptr + out, best_idx, mask=a_ok)


@triton.jit
def _rank_kernel(
    max_ptr, idx_ptr,                         # (N, A) fp32 best score, int32 best B index (from _match_kernel)
    src_ptr, dst_ptr, dst_pos_ptr,            # out (N, R) int32: source token, destination token, its output position
    out_tok_ptr,                              # out (N, T_out) int32: input token of each output position
    bad_ptr,                                  # out (N,) int32: 1 where a score was NaN (non-finite keys)
    NA, NB, R, T_OUT,
    CLASS_TOKEN: tl.constexpr, DISTILL_TOKEN: tl.constexpr, BLOCK_A: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    row = max_ptr + img * NA
    n_unm = NA - R
    # The stable descending sort as a rank count: rank_i = #{j : s_j > s_i, or s_j == s_i and j < i}.
    # NaN ranks as -inf (the image is poisoned anyway) so the ranks stay a permutation.
    thr_key = tl.zeros((), tl.float32)  # (score, index) of rank R - 1: the weakest source
    thr_idx = tl.zeros((), tl.int64)
    any_bad = tl.zeros((), tl.int32)
    for i0 in range(0, NA, BLOCK_A):
        ii = i0 + tl.arange(0, BLOCK_A).to(tl.int64)
        i_ok = ii < NA
        si = tl.load(row + ii, mask=i_ok, other=float("-inf"))
        any_bad = tl.maximum(any_bad, tl.max(((si != si) & i_ok).to(tl.int32), axis=0))
        si = tl.where(si == si, si, float("-inf"))
        rank = tl.zeros((BLOCK_A,), tl.int32)
        for j0 in range(0, NA, BLOCK_A):
            jj = j0 + tl.arange(0, BLOCK_A).to(tl.int64)
            sj = tl.load(row + jj, mask=jj < NA, other=float("-inf"))
            sj = tl.where(sj == sj, sj, float("-inf"))
            before = ((sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (jj[None, :] < ii[:, None]))) \
                & (jj[None, :] < NA)
            rank += tl.sum(before.to(tl.int32), axis=1)
        is_src = i_ok & (rank < R)
        partner = tl.load(idx_ptr + img * NA + ii, mask=i_ok, other=0).to(tl.int64)
        if DISTILL_TOKEN:
            pos = tl.where(partner == 0, 1, n_unm + partner)
        else:
            pos = n_unm + partner
        tl.store(src_ptr + img * R + rank, (2 * ii).to(tl.int32), mask=is_src)
        tl.store(dst_ptr + img * R + rank, (2 * partner + 1).to(tl.int32), mask=is_src)
        tl.store(dst_pos_ptr + img * R + rank, pos.to(tl.int32), mask=is_src)
        last = i_ok & (rank == R - 1)
        thr_key += tl.sum(tl.where(last, si, 0.0), axis=0)
        thr_idx += tl.sum(tl.where(last, ii, 0), axis=0)
        if not CLASS_TOKEN:  # unmerged tokens keep the ranking order
            upos = rank - R
            if DISTILL_TOKEN:
                upos = tl.where(upos == 0, 0, upos + 1)
            tl.store(out_tok_ptr + img * T_OUT + upos, (2 * ii).to(tl.int32), mask=i_ok & (rank >= R))
    if CLASS_TOKEN:
        # Unmerged tokens in index order: position = i - #{sources j < i}; j is a source when (s_j, -j)
        # ranks at or above the weakest source.
        for i0 in range(0, NA, BLOCK_A):
            ii = i0 + tl.arange(0, BLOCK_A).to(tl.int64)
            i_ok = ii < NA
            si = tl.load(row + ii, mask=i_ok, other=float("-inf"))
            si = tl.where(si == si, si, float("-inf"))
            src_i = (si > thr_key) | ((si == thr_key) & (ii <= thr_idx))
            below = tl.zeros((BLOCK_A,), tl.int32)
            for j0 in range(0, NA, BLOCK_A):
                jj = j0 + tl.arange(0, BLOCK_A).to(tl.int64)
                sj = tl.load(row + jj, mask=jj < NA, other=float("-inf"))
                sj = tl.where(sj == sj, sj, float("-inf"))
                src_j = ((sj > thr_key) | ((sj == thr_key) & (jj <= thr_idx))) & (jj < NA)
                below += tl.sum((src_j[None, :] & (jj[None, :] < ii[:, None])).to(tl.int32), axis=1)
            upos = ii - below
            if DISTILL_TOKEN:
                upos = tl.where(upos == 0, 0, upos + 1)
            tl.store(out_tok_ptr + img * T_OUT + upos, (2 * ii).to(tl.int32), mask=i_ok & ~src_i)
    # Set B, in index order after the unmerged tokens (B[0] second with a distillation token).
    for j0 in range(0, NB, BLOCK_A):
        jj = j0 + tl.arange(0, BLOCK_A).to(tl.int64)
        if DISTILL_TOKEN:
            pos = tl.where(jj == 0, 1, n_unm + jj)
        else:
            pos = n_unm + jj
        tl.store(out_tok_ptr + img * T_OUT + pos, (2 * jj + 1).to(tl.int32), mask=jj < NB)
    tl.store(bad_ptr + img, any_bad)


@triton.jit
def _pair_stats_kernel(
    x_ptr, stride_xn, stride_xt, stride_xc,   # (N, T, C) tokens
    m_ptr, stride_mn, stride_mt,              # (N, T) sizes
    src_ptr, dst_ptr,                         # (N, R) int32 token index of each pair's source / destination
    b_ptr, stride_b, g_ptr, stride_g, beta_ptr, stride_beta,  # (C,) PYRA's b, LayerNorm gamma / beta
    stats_ptr,                                # out (3, N, R) fp32: mean, rstd, w2
    N, R, C, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    pairs = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    p_ok = pairs < R
    src = tl.load(src_ptr + img * R + pairs, mask=p_ok, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + img * R + pairs, mask=p_ok, other=0).to(tl.int64)
    m_s = tl.load(m_ptr + img * stride_mn + src * stride_mt, mask=p_ok, other=0.0).to(tl.float32)
    m_d = tl.load(m_ptr + img * stride_mn + dst * stride_mt, mask=p_ok, other=0.0).to(tl.float32)
    s_rows = x_ptr + img * stride_xn + src[:, None] * stride_xt
    d_rows = x_ptr + img * stride_xn + dst[:, None] * stride_xt

    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        msk = p_ok[:, None] & (cs[None, :] < C)
        p = tl.load(s_rows + cs[None, :] * stride_xc, mask=msk, other=0.0).to(tl.float32) * m_s[:, None] \
            + tl.load(d_rows + cs[None, :] * stride_xc, mask=msk, other=0.0).to(tl.float32) * m_d[:, None]
        total += tl.sum(p, axis=1)
    mean = total / C
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    pgb = tl.zeros((BLOCK_R,), dtype=tl.float32)   # sum_c (P - mean) gamma b
    beta_b = tl.zeros((BLOCK_R,), dtype=tl.float32)  # sum_c beta b (the same for every pair)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        c_ok = cs < C
        msk = p_ok[:, None] & c_ok[None, :]
        p = tl.load(s_rows + cs[None, :] * stride_xc, mask=msk, other=0.0).to(tl.float32) * m_s[:, None] \
            + tl.load(d_rows + cs[None, :] * stride_xc, mask=msk, other=0.0).to(tl.float32) * m_d[:, None]
        centred = tl.where(msk, p - mean[:, None], 0.0)
        bb = tl.load(b_ptr + cs * stride_b, mask=c_ok, other=0.0).to(tl.float32)
        gg = tl.load(g_ptr + cs * stride_g, mask=c_ok, other=0.0).to(tl.float32)
        be = tl.load(beta_ptr + cs * stride_beta, mask=c_ok, other=0.0).to(tl.float32)
        sq += tl.sum(centred * centred, axis=1)
        pgb += tl.sum(centred * (gg * bb)[None, :], axis=1)
        beta_b += tl.sum(be * bb, axis=0)
    rstd = 1.0 / tl.sqrt(sq / C + eps)
    w2 = 2.0 * _sigmoid(rstd * pgb + beta_b) - 1.0
    out = img * R + pairs
    tl.store(stats_ptr + out, mean, mask=p_ok)
    tl.store(stats_ptr + N * R + out, rstd, mask=p_ok)
    tl.store(stats_ptr + 2 * N * R + out, w2, mask=p_ok)


@triton.jit
def _pair_chunk(x_ptr, stride_xn, stride_xt, stride_xc, m_ptr, stride_mn, stride_mt, src_ptr, dst_ptr,
                a_ptr, stride_a, g_ptr, stride_g, beta_ptr, stride_beta, stats_ptr,
                img, cs, N, R, C, R_BLOCK: tl.constexpr):
    """Every pair's rows at channels ``cs`` (R_BLOCK x BLOCK_C, fp32): the pair data shared by the merge and
    both backward kernels. Pairs past R and channels past C are 0."""
    pairs = tl.arange(0, R_BLOCK).to(tl.int64)
    p_ok = pairs < R
    c_ok = cs < C
    msk = p_ok[:, None] & c_ok[None, :]
    src = tl.load(src_ptr + img * R + pairs, mask=p_ok, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + img * R + pairs, mask=p_ok, other=0).to(tl.int64)
    m_s = tl.load(m_ptr + img * stride_mn + src * stride_mt, mask=p_ok, other=0.0).to(tl.float32)
    m_d = tl.load(m_ptr + img * stride_mn + dst * stride_mt, mask=p_ok, other=0.0).to(tl.float32)
    s = tl.load(x_ptr + img * stride_xn + src[:, None] * stride_xt + cs[None, :] * stride_xc, mask=msk,
                other=0.0).to(tl.float32) * m_s[:, None]
    d = tl.load(x_ptr + img * stride_xn + dst[:, None] * stride_xt + cs[None, :] * stride_xc, mask=msk,
                other=0.0).to(tl.float32) * m_d[:, None]
    mean = tl.load(stats_ptr + img * R + pairs, mask=p_ok, other=0.0)
    rstd = tl.load(stats_ptr + N * R + img * R + pairs, mask=p_ok, other=0.0)
    w2 = tl.load(stats_ptr + 2 * N * R + img * R + pairs, mask=p_ok, other=0.0)
    gg = tl.load(g_ptr + cs * stride_g, mask=c_ok, other=0.0).to(tl.float32)
    be = tl.load(beta_ptr + cs * stride_beta, mask=c_ok, other=0.0).to(tl.float32)
    aa = tl.load(a_ptr + pairs * stride_a, mask=p_ok, other=0.0).to(tl.float32)
    yhat = tl.where(msk, (s + d - mean[:, None]) * rstd[:, None], 0.0)
    y = tl.where(msk, yhat * gg[None, :] + be[None, :], 0.0)
    w1 = 2.0 * _sigmoid(tl.sum(aa[:, None] * y, axis=0))  # (BLOCK_C,) channel gate: a reduction over pairs
    return pairs, p_ok, src, dst, m_s, s, yhat, y, w1, w2, rstd, gg, aa


@triton.jit
def _merge_kernel(
    x_ptr, stride_xn, stride_xt, stride_xc,   # (N, T, C) tokens
    m_ptr, stride_mn, stride_mt,              # (N, T) sizes
    src_ptr, dst_ptr,                         # (N, R) int32 pair token indices, rank order
    out_tok_ptr,                              # (N, T_out) int32 input token of each output position
    bad_ptr,                                  # (N,) int32: 1 where the image's keys were not finite
    a_ptr, stride_a, g_ptr, stride_g, beta_ptr, stride_beta,  # (R,) a; (C,) LayerNorm gamma / beta
    stats_ptr,                                # (3, N, R) fp32 mean, rstd, w2
    y_ptr, stride_yn, stride_yt, stride_yc,   # out (N, T_out, C) in x's dtype
    ms_ptr,                                   # out (N, T_out) merged sizes, contiguous, in size's dtype
    N, R, C, T_OUT,
    R_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cs = chunk.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = cs < C
    pairs, p_ok, src, dst, m_s, s, yhat, y, w1, w2, rstd, gg, aa = _pair_chunk(
        x_ptr, stride_xn, stride_xt, stride_xc, m_ptr, stride_mn, stride_mt, src_ptr, dst_ptr,
        a_ptr, stride_a, g_ptr, stride_g, beta_ptr, stride_beta, stats_ptr, img, cs, N, R, C, R_BLOCK)
    s_mod = s * (1.0 + w1[None, :] * w2[:, None])
    # A NaN in any pair row makes w1, hence every S' of the image, NaN: flag it once and add zeros, since
    # the one-hot product would otherwise spread 0 * NaN to tokens that receive nothing.
    s_nan = tl.max(tl.max((s_mod != s_mod).to(tl.int32), axis=1), axis=0) > 0
    s_mod = tl.where(s_mod == s_mod, s_mod, 0.0)
    m_bad = tl.where(p_ok & (m_s <= 0.0), 1.0, 0.0)  # a source without a positive size poisons its target
    img_bad = tl.load(bad_ptr + img) > 0

    for t0 in range(0, T_OUT, BLOCK_T):
        outs = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        o_ok = outs < T_OUT
        tok = tl.load(out_tok_ptr + img * T_OUT + outs, mask=o_ok, other=-1).to(tl.int64)
        hit = (dst[None, :] == tok[:, None]) & p_ok[None, :]
        onehot = hit.to(tl.float32)  # (BLOCK_T, R_BLOCK)
        added = tl.dot(onehot, s_mod, input_precision="ieee")  # exact: sums of whole S' rows
        m_tok = tl.load(m_ptr + img * stride_mn + tok * stride_mt, mask=o_ok, other=1.0).to(tl.float32)
        new_m = m_tok + tl.sum(onehot * m_s[None, :], axis=1)
        poison = (m_tok <= 0.0) | (tl.sum(onehot * m_bad[None, :], axis=1) > 0.0) | img_bad
        xv = tl.load(x_ptr + img * stride_xn + tok[:, None] * stride_xt + cs[None, :] * stride_xc,
                     mask=o_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        val = (xv * m_tok[:, None] + added) / new_m[:, None]
        val = tl.where((poison | ((tl.sum(onehot, axis=1) > 0.0) & s_nan))[:, None], float("nan"), val)
        tl.store(y_ptr + img * stride_yn + outs[:, None] * stride_yt + cs[None, :] * stride_yc,
                 val.to(y_ptr.dtype.element_ty), mask=o_ok[:, None] & c_ok[None, :])
        if chunk == 0:
            tl.store(ms_ptr + img * T_OUT + outs, tl.where(poison, float("nan"), new_m).to(ms_ptr.dtype.element_ty),
                     mask=o_ok)


@triton.jit
def _bwd_partials_kernel(
    x_ptr, stride_xn, stride_xt, stride_xc, m_ptr, stride_mn, stride_mt, src_ptr, dst_ptr,
    dst_pos_ptr,                              # (N, R) int32 output position of each pair's destination
    a_ptr, stride_a, b_ptr, stride_b, g_ptr, stride_g, beta_ptr, stride_beta, stats_ptr,
    go_ptr, stride_gn, stride_gt, stride_gc,  # (N, T_out, C) upstream gradient
    ms_ptr,                                   # (N, T_out) merged sizes (forward output)
    part_ptr,                                 # out (N, CHUNKS, 5, R_BLOCK) fp32 partial sums (see module doc)
    N, R, C, T_OUT, CHUNKS,
    R_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    cs = chunk * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = cs < C
    pairs, p_ok, src, dst, m_s, s, yhat, y, w1, w2, rstd, gg, aa = _pair_chunk(
        x_ptr, stride_xn, stride_xt, stride_xc, m_ptr, stride_mn, stride_mt, src_ptr, dst_ptr,
        a_ptr, stride_a, g_ptr, stride_g, beta_ptr, stride_beta, stats_ptr, img, cs, N, R, C, R_BLOCK)
    pos = tl.load(dst_pos_ptr + img * R + pairs, mask=p_ok, other=0).to(tl.int64)
    msk = p_ok[:, None] & c_ok[None, :]
    gk = tl.load(go_ptr + img * stride_gn + pos[:, None] * stride_gt + cs[None, :] * stride_gc, mask=msk,
                 other=0.0).to(tl.float32)
    gk = gk / tl.load(ms_ptr + img * T_OUT + pos, mask=p_ok, other=1.0).to(tl.float32)[:, None]
    gs = gk * s
    dw1 = tl.sum(gs * w2[:, None], axis=0)
    du = dw1 * w1 * (1.0 - 0.5 * w1)
    bb = tl.load(b_ptr + cs * stride_b, mask=c_ok, other=0.0).to(tl.float32)
    base = part_ptr + ((img * CHUNKS + chunk) * 5) * R_BLOCK + pairs
    tl.store(base, tl.sum(gs * w1[None, :], axis=1))                                  # -> dw2_k
    tl.store(base + R_BLOCK, tl.sum(y * du[None, :], axis=1))                          # -> da_k
    tl.store(base + 2 * R_BLOCK, tl.sum(yhat * (gg * du)[None, :], axis=1))             # sum gamma du Yhat
    tl.store(base + 3 * R_BLOCK, tl.sum(yhat * (gg * bb)[None, :], axis=1))             # sum gamma b Yhat
    tl.store(base + 4 * R_BLOCK, tl.zeros((R_BLOCK,), tl.float32) + tl.sum(gg * du, axis=0))  # sum gamma du


@triton.jit
def _bwd_kernel(
    x_ptr, stride_xn, stride_xt, stride_xc, m_ptr, stride_mn, stride_mt, src_ptr, dst_ptr, dst_pos_ptr,
    out_tok_ptr,                              # (N, T_out) int32
    a_ptr, stride_a, b_ptr, stride_b, g_ptr, stride_g, beta_ptr, stride_beta, stats_ptr,
    go_ptr, stride_gn, stride_gt, stride_gc,  # (N, T_out, C) upstream gradient
    ms_ptr,                                   # (N, T_out) merged sizes
    part_ptr,                                 # (N, CHUNKS, 5, R_BLOCK) fp32 partial sums of _bwd_partials_kernel
    dx_ptr, stride_dn, stride_dt, stride_dc,  # out (N, T, C) in x's dtype
    dpar_ptr,                                 # out (3, N, C) fp32 per-image gradients of b, gamma, beta
    N, R, C, T_OUT, CHUNKS,
    R_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, WANT_X: tl.constexpr,
    WANT_PARAMS: tl.constexpr,
):
    img = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = cs < C
    pairs, p_ok, src, dst, m_s, s, yhat, y, w1, w2, rstd, gg, aa = _pair_chunk(
        x_ptr, stride_xn, stride_xt, stride_xc, m_ptr, stride_mn, stride_mt, src_ptr, dst_ptr,
        a_ptr, stride_a, g_ptr, stride_g, beta_ptr, stride_beta, stats_ptr, img, cs, N, R, C, R_BLOCK)
    pos = tl.load(dst_pos_ptr + img * R + pairs, mask=p_ok, other=0).to(tl.int64)
    msk = p_ok[:, None] & c_ok[None, :]
    gk = tl.load(go_ptr + img * stride_gn + pos[:, None] * stride_gt + cs[None, :] * stride_gc, mask=msk,
                 other=0.0).to(tl.float32)
    gk = gk / tl.load(ms_ptr + img * T_OUT + pos, mask=p_ok, other=1.0).to(tl.float32)[:, None]
    dw1 = tl.sum(gk * s * w2[:, None], axis=0)
    du = dw1 * w1 * (1.0 - 0.5 * w1)
    # The channel sums, added over the chunks in a fixed order (deterministic), and sum_c gamma_c b_c.
    dw2 = tl.zeros((R_BLOCK,), tl.float32)
    q1 = tl.zeros((R_BLOCK,), tl.float32)  # sum_c gamma du Yhat_k
    q2 = tl.zeros((R_BLOCK,), tl.float32)  # sum_c gamma b Yhat_k
    q0 = tl.zeros((R_BLOCK,), tl.float32)  # sum_c gamma du (the same for every pair)
    gb = tl.zeros((BLOCK_C,), tl.float32)
    for ch in range(0, CHUNKS):
        part = part_ptr + ((img * CHUNKS + ch) * 5) * R_BLOCK + pairs
        dw2 += tl.load(part)
        q1 += tl.load(part + 2 * R_BLOCK)
        q2 += tl.load(part + 3 * R_BLOCK)
        q0 += tl.load(part + 4 * R_BLOCK)
        cc = ch * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        gb += tl.load(g_ptr + cc * stride_g, mask=cc < C, other=0.0).to(tl.float32) \
            * tl.load(b_ptr + cc * stride_b, mask=cc < C, other=0.0).to(tl.float32)
    gb = tl.sum(gb, axis=0)
    dv = tl.where(p_ok, dw2 * (1.0 + w2) * (1.0 - w2) * 0.5, 0.0)
    bb = tl.load(b_ptr + cs * stride_b, mask=c_ok, other=0.0).to(tl.float32)
    dy = tl.where(msk, aa[:, None] * du[None, :] + bb[None, :] * dv[:, None], 0.0)
    if WANT_PARAMS:
        par = dpar_ptr + img * C + cs
        tl.store(par, tl.sum(y * dv[:, None], axis=0), mask=c_ok)
        tl.store(par + N * C, tl.sum(dy * yhat, axis=0), mask=c_ok)
        tl.store(par + 2 * N * C, tl.sum(dy, axis=0), mask=c_ok)
    if WANT_X:
        mean_dyh = (aa * q0 + dv * gb) / C            # mean_c gamma dY
        mean_dyh_yh = (aa * q1 + dv * q2) / C         # mean_c gamma dY Yhat
        dp = rstd[:, None] * (dy * gg[None, :] - mean_dyh[:, None] - yhat * mean_dyh_yh[:, None])
        dp = tl.where(msk, dp, 0.0)
        dp_nan = tl.max(tl.max((dp != dp).to(tl.int32), axis=1), axis=0) > 0  # uniform over the image, as S'
        ds = gk * (1.0 + w1[None, :] * w2[:, None]) + dp
        tl.store(dx_ptr + img * stride_dn + src[:, None] * stride_dt + cs[None, :] * stride_dc,
                 (ds * m_s[:, None]).to(dx_ptr.dtype.element_ty), mask=msk)
        for t0 in range(0, T_OUT, BLOCK_T):
            outs = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            o_ok = outs < T_OUT
            tok = tl.load(out_tok_ptr + img * T_OUT + outs, mask=o_ok, other=-1).to(tl.int64)
            onehot = ((dst[None, :] == tok[:, None]) & p_ok[None, :]).to(tl.float32)
            added = tl.dot(onehot, tl.where(dp == dp, dp, 0.0), input_precision="ieee")
            added = tl.where(((tl.sum(onehot, axis=1) > 0) & dp_nan)[:, None], float("nan"), added)
            o_msk = o_ok[:, None] & c_ok[None, :]
            go = tl.load(go_ptr + img * stride_gn + outs[:, None] * stride_gt + cs[None, :] * stride_gc,
                         mask=o_msk, other=0.0).to(tl.float32)
            new_m = tl.load(ms_ptr + img * T_OUT + outs, mask=o_ok, other=1.0).to(tl.float32)
            m_tok = tl.load(m_ptr + img * stride_mn + tok * stride_mt, mask=o_ok, other=0.0).to(tl.float32)
            val = m_tok[:, None] * (go / new_m[:, None] + added)
            tl.store(dx_ptr + img * stride_dn + tok[:, None] * stride_dt + cs[None, :] * stride_dc,
                     val.to(dx_ptr.dtype.element_ty), mask=o_msk)


# ------------------------------------------------------------------------------------------------- host side


@torch.library.custom_op("twinops::pyra_token_merge", mutates_args=())
def _pyra_fwd(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              ln_weight: torch.Tensor, ln_bias: torch.Tensor, r: int, class_token: bool, distill_token: bool,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor]:
    n, t, c = x.shape
    ck = metric.shape[2]
    na, nb = (t + 1) // 2, t // 2
    cfg = _blocks(c, ck, r)
    node_max = torch.empty((n, na), device=x.device, dtype=torch.float32)
    node_idx = torch.empty((n, na), device=x.device, dtype=torch.int32)
    _match_kernel[(n, triton.cdiv(na, cfg["BLOCK_A"]))](
        metric, metric.stride(0), metric.stride(1), metric.stride(2), node_max, node_idx, t, ck, na, nb,
        CLASS_TOKEN=class_token, DISTILL_TOKEN=distill_token, BLOCK_A=cfg["BLOCK_A"], BLOCK_B=cfg["BLOCK_B"],
        BLOCK_K=cfg["BLOCK_K"], PRECISION=rt.dot_precision(metric.dtype), num_warps=cfg["num_warps"])
    t_out = t - r
    i32 = dict(device=x.device, dtype=torch.int32)
    src_tok, dst_tok, dst_pos = (torch.empty((n, r), **i32) for _ in range(3))
    out_tok, bad = torch.empty((n, t_out), **i32), torch.empty((n,), **i32)
    _rank_kernel[(n,)](node_max, node_idx, src_tok, dst_tok, dst_pos, out_tok, bad, na, nb, r, t_out,
                       CLASS_TOKEN=class_token, DISTILL_TOKEN=distill_token, BLOCK_A=cfg["BLOCK_RANK"],
                       num_warps=cfg["num_warps"])
    stats = torch.empty((3, n, r), device=x.device, dtype=torch.float32)
    _pair_stats_kernel[(n, triton.cdiv(r, cfg["BLOCK_R"]))](
        x, x.stride(0), x.stride(1), x.stride(2), size, size.stride(0), size.stride(1), src_tok, dst_tok,
        b, b.stride(0), ln_weight, ln_weight.stride(0), ln_bias, ln_bias.stride(0), stats, n, r, c, eps,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_CS"], num_warps=cfg["num_warps"])
    y = torch.empty((n, t_out, c), device=x.device, dtype=x.dtype)
    new_size = torch.empty((n, t_out), device=x.device, dtype=size.dtype)
    _merge_kernel[(n, triton.cdiv(c, cfg["BLOCK_C"]))](
        x, x.stride(0), x.stride(1), x.stride(2), size, size.stride(0), size.stride(1), src_tok, dst_tok,
        out_tok, bad, a, a.stride(0), ln_weight, ln_weight.stride(0), ln_bias, ln_bias.stride(0), stats,
        y, y.stride(0), y.stride(1), y.stride(2), new_size, n, r, c, t_out,
        R_BLOCK=cfg["R_BLOCK"], BLOCK_C=cfg["BLOCK_C"], BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"])
    return y, new_size, src_tok, dst_tok, dst_pos, out_tok, stats


@_pyra_fwd.register_fake
def _(x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps):
    n, t, c = x.shape
    i32 = dict(dtype=torch.int32)
    return (x.new_empty((n, t - r, c)), size.new_empty((n, t - r)), x.new_empty((n, r), **i32),
            x.new_empty((n, r), **i32), x.new_empty((n, r), **i32), x.new_empty((n, t - r), **i32),
            x.new_empty((3, n, r), dtype=torch.float32))


@torch.library.custom_op("twinops::pyra_token_merge_bwd", mutates_args=())
def _pyra_bwd(grad: torch.Tensor, x: torch.Tensor, size: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              ln_weight: torch.Tensor, ln_bias: torch.Tensor, new_size: torch.Tensor, src_tok: torch.Tensor,
              dst_tok: torch.Tensor, dst_pos: torch.Tensor, out_tok: torch.Tensor, stats: torch.Tensor,
              want_x: bool, want_params: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, T, C) in x's dtype, da (R,) fp32, dpar (3, C) fp32: db, d ln_weight, d ln_bias)."""
    n, t, c = x.shape
    r = src_tok.shape[1]
    t_out = t - r
    cfg = _blocks(c, 1, r)
    rb, bc = cfg["R_BLOCK"], cfg["BLOCK_C"]
    chunks = triton.cdiv(c, bc)
    part = torch.empty((n, chunks, 5, rb), device=x.device, dtype=torch.float32)
    common = (x, x.stride(0), x.stride(1), x.stride(2), size, size.stride(0), size.stride(1), src_tok, dst_tok)
    params = (a, a.stride(0), b, b.stride(0), ln_weight, ln_weight.stride(0), ln_bias, ln_bias.stride(0), stats)
    gstr = (grad, grad.stride(0), grad.stride(1), grad.stride(2))
    _bwd_partials_kernel[(n, chunks)](*common, dst_pos, *params, *gstr, new_size, part, n, r, c, t_out, chunks,
                                      R_BLOCK=rb, BLOCK_C=bc, num_warps=cfg["num_warps"])
    dx = torch.empty((n, t, c), device=x.device, dtype=x.dtype) if want_x else x.new_empty((0, 0, 0))
    dpar = torch.empty((3, n, c), device=x.device, dtype=torch.float32) if want_params else \
        x.new_empty((3, 0, 0), dtype=torch.float32)
    dx_arg = dx if want_x else x
    _bwd_kernel[(n, chunks)](*common, dst_pos, out_tok, *params, *gstr, new_size, part,
                             dx_arg, dx_arg.stride(0), dx_arg.stride(1), dx_arg.stride(2), dpar, n, r, c, t_out,
                             chunks,
                             R_BLOCK=rb, BLOCK_C=bc, BLOCK_T=cfg["BLOCK_T"], WANT_X=want_x,
                             WANT_PARAMS=want_params, num_warps=cfg["num_warps"])
    da = part[:, :, 1, :r].sum(dim=(0, 1))
    return dx, da, dpar.sum(dim=1)


@_pyra_bwd.register_fake
def _(grad, x, size, a, b, ln_weight, ln_bias, new_size, src_tok, dst_tok, dst_pos, out_tok, stats,
      want_x, want_params):
    n, t, c = x.shape
    r = src_tok.shape[1]
    dx = x.new_empty((n, t, c)) if want_x else x.new_empty((0, 0, 0))
    return dx, x.new_empty((r,), dtype=torch.float32), x.new_empty((3, c), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, size, metric, a, b, ln_weight, ln_bias = inputs[:7]
    ctx.save_for_backward(x, size, a, b, ln_weight, ln_bias, *output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad, *unused):
    x, size, a, b, ln_weight, ln_bias, new_size, src_tok, dst_tok, dst_pos, out_tok, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_x, want_params = bool(need[0]), bool(need[3] or need[4] or need[5] or need[6])
    if not (want_x or want_params):
        return (None,) * 11
    dx, da, dpar = _pyra_bwd(grad, x, size, a, b, ln_weight, ln_bias, new_size, src_tok, dst_tok, dst_pos,
                             out_tok, stats, want_x, want_params)
    return (dx if want_x else None, None, None,
            da.to(a.dtype) if need[3] else None, dpar[0].to(b.dtype) if need[4] else None,
            dpar[1].to(ln_weight.dtype) if need[5] else None, dpar[2].to(ln_bias.dtype) if need[6] else None,
            None, None, None, None)


_pyra_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Identity(torch.autograd.Function):
    """r = 0 (ToMe's ``do_nothing``): x unchanged; the parameters get zero gradients."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in params]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + tuple(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.shapes)


def _check_param(p, name: str, n: int, what: str) -> torch.Tensor:
    rt.check_tensor(p, name)
    if p.dtype not in rt.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {p.dtype}")
    if tuple(p.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) {what}, got {tuple(p.shape)}")
    return p


def pyra_token_merge(x, size, metric, a, b, ln_weight, ln_bias, *, r, class_token=False, distill_token=False,
                     eps=1e-5):
    """PYRA token merging (P20) on the GPU; returns ``(x_out, size_out)``.

    Same arguments and semantics as `twinops.reference.layers.pyra_token_merge`: ``x`` (N, T, C),
    ``size`` (N, T), ``metric`` (N, T, C_k), ``a`` (r,), ``b``, ``ln_weight``, ``ln_bias`` (C,). ``x_out``
    has x's dtype, ``size_out`` size's dtype (it carries no gradient). Gradients reach x, a, b,
    ln_weight and ln_bias. Value checks happen on the device instead of raising: a token whose size
    is not > 0 (or a source merged into it with such a size) comes out NaN, and so does every output
    of an image whose keys are not finite.
    """
    x = rt.check_float_tensor(x, "x", 3, "(N, T, C)")
    n, t, c = x.shape
    if c < 1:
        raise ValueError(f"x must have at least one channel (C >= 1), got shape {tuple(x.shape)}")
    size = rt.check_float_tensor(size, "size", 2, "(N, T)")
    if tuple(size.shape) != (n, t):
        raise ValueError(f"size must have shape ({n}, {t}) to match x, got {tuple(size.shape)}")
    metric = rt.check_float_tensor(metric, "metric", 3, "(N, T, C_k)")
    if tuple(metric.shape[:2]) != (n, t) or metric.shape[2] < 1:
        raise ValueError(f"metric must have shape ({n}, {t}, C_k) with C_k >= 1, got {tuple(metric.shape)}")
    r = check_int(r, "r")
    class_token = check_bool(class_token, "class_token")
    distill_token = check_bool(distill_token, "distill_token")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    limit = (t - int(class_token) - int(distill_token)) // 2
    if r < 0 or r > limit:
        raise ValueError(f"r must lie in [0, {limit}] = [0, (T - protected tokens) // 2] for T = {t}, got {r}")
    _check_param(a, "a", r, f"one weight per merged pair (r = {r})")
    for name, p in (("b", b), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check_param(p, name, c, "to match x's channels")
    rt.check_device(("x", x), ("size", size), ("metric", metric), ("a", a), ("b", b), ("ln_weight", ln_weight),
                    ("ln_bias", ln_bias))
    if r == 0:
        return _Identity.apply(x, a, b, ln_weight, ln_bias), size.clone()
    out = _pyra_fwd(x, size, metric, a, b, ln_weight, ln_bias, r, class_token, distill_token, eps)
    return out[0], out[1]


class PyraTokenMerge(torch.nn.Module):
    """Drop-in PYRA merge step for one ViT block: ``forward(x, metric, size=None) -> (x_out, size_out)``.

    Holds PYRA's parameters: ``a`` (r,) initialised U(-1, 1) (kaiming-uniform on the authors' (r, 1)
    shape), ``b`` (C,) initialised 0 (so a fresh module is exactly ToMe's size-weighted merge), and the
    LayerNorm's ``ln_weight`` = 1, ``ln_bias`` = 0. ``size=None`` means every token has size 1. The
    layer has no train/eval difference.
    """

    def __init__(self, dim: int, r: int, *, class_token: bool = True, distill_token: bool = False,
                 eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        dim, r = check_int(dim, "dim"), check_int(r, "r")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.dim, self.r, self.class_token, self.distill_token, self.eps = dim, r, class_token, distill_token, eps
        kw = dict(device=device, dtype=dtype)
        self.a = torch.nn.Parameter(torch.empty(r, **kw))
        self.b = torch.nn.Parameter(torch.empty(dim, **kw))
        self.ln_weight = torch.nn.Parameter(torch.empty(dim, **kw))
        self.ln_bias = torch.nn.Parameter(torch.empty(dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.a.uniform_(-1.0, 1.0)
            self.b.zero_()
            self.ln_weight.fill_(1.0)
            self.ln_bias.zero_()

    def forward(self, x, metric, size=None):
        if size is None:
            size = x.new_ones(x.shape[:2])
        return pyra_token_merge(x, size, metric, self.a, self.b, self.ln_weight, self.ln_bias, r=self.r,
                                class_token=self.class_token, distill_token=self.distill_token, eps=self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, r={self.r}, class_token={self.class_token}, distill_token={self.distill_token}"
