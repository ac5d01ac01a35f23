"""iSogCLR (P19) as flash-attention-shaped Triton kernels: the B x B similarity is never stored.
See `twinops.reference.metric.isogclr_loss` for the definition.

Both sides of the loss have the same shape once written from the anchor's point of view. For anchors
``q`` (the image rows X for the image side, the text rows Y for the text side), the other view ``k``,
``S~ = q k^T`` (S for images, S^T for texts) and the anchor's positive ``d_a = q_a . k_a``:

    h_an = S~_an - d_a (0 on the diagonal),   hhat_an = h_an / tau_a,   m_a = max(0, max_n hhat_an),
    E_a = sum_{n != a} exp(hhat_an - m_a),     F_a = sum_{n != a} exp(hhat_an - m_a) h_an,

so one kernel, ``_isogclr_stats_kernel``, runs twice: (X, Y, state_image) and (Y, X, state_text).
A program owns BLOCK_M anchors and sweeps the other view in BLOCK_N tiles: ``tl.dot`` gives the
tile, the anchor's temperature is applied in-tile, and (m, E, F) are updated online exactly like
flash-attention's running (max, sum, output): a tile that raises the max rescales E and F by
exp(old - new). The positive's own term (hhat_aa = 0) seeds m with 0 and is added back at the end.
Then, in log space relative to m (the stored running max b may lie far above this batch's values,
where exp(hhat - b') would underflow in fp32 but not in the float64 definition):

    b' = max(b, m),   log(s' e^(b'-m)) = logaddexp(log((1-gamma) s) + b - m, log(gamma (E + e^-m) / (B-1))),
    r_a = e^m / ((s' + eps) e^b')   so that   w_an = exp(hhat_an - m_a) r_a,
    loss_a = F_a r_a / (B - 1),   delta_a = log s' + b' + rho - loss_a / tau_a,

and the temperature update of the reference. Each side saves 5 floats per anchor for the backward:
d, 1/tau, m, r and W = E r = sum_{n != a} w_an.

Backward. With per-anchor upstream gradients gq (this side) and gk (the other side),
``dL/dS~_an = (gq_a w_an + gk_n w~_an) / (B - 1)`` off the diagonal, where ``w~_an`` is the other
side's weight anchored at n, ``exp((S~_an - d_n) / tau~_n - m~_n) r~_n``; on the diagonal
``-(gq_a W_a + gk_a W~_a) / (B - 1)``. So

    dq_a = [ sum_{n != a} (gq_a w_an + gk_n w~_an) k_n  -  (gq_a W_a + gk_a W~_a) k_a ] / (B - 1),

``_isogclr_grad_kernel``, run as (X; Y) for d image_features and (Y; X) for d text_features: the
row pass and the column pass of flash-attention's dQ / dK kernels. Each recomputes the tiles from the
saved statistics, forms P = gq w + gk w~ in-tile (diagonal masked) and accumulates ``P @ k`` in fp32.
P is rounded to the features' dtype for the dot (as flash-attention does with P @ V); for fp16 the
rounding error is added back with a second dot, because fp16 checks are strict on the CPU lane and
the benchmarks run bf16. Features up to 256 wide stay resident (loaded once per program; the k tile
serves both dots); wider ones are walked in BLOCK_K chunks and the output is split into BLOCK_DO-wide
chunks over a second grid axis, each chunk recomputing the tiles (see `_launch`).

Extra memory: 2 x (B, 4) new states, 2 x (B,) per-anchor losses and 2 x (5, B) statistics, all fp32,
plus the (B, D) gradients; no B x B intermediate. FLOPs: forward 2 sides x 2 B^2 D; backward
2 sides x (2 B^2 D per output chunk + 2 B^2 D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference.metric.isogclr_loss import STATE_FIELDS, _check_hyper
from .. import _runtime as rt

__all__ = ["isogclr_loss", "isogclr_init_state", "ISogCLRLoss", "STATE_FIELDS"]

HAS_TRITON_BACKWARD = True

_STATS = 5  # per-anchor floats saved by the forward: d, 1/tau, m, r, W (see the docstring)


def _launch(b: int, d: int) -> dict:
    """Tile sizes and whether the anchors' features stay resident.

    ``RESIDENT`` (D fits one BLOCK_K chunk): a program loads its anchors' features once and keeps them
    in registers for the whole sweep, as flash-attention keeps Q; in the backward the other view's
    tile then serves both the similarity and ``P @ k``. Otherwise D is walked in BLOCK_K chunks for
    every tile, and the backward splits the output features into BLOCK_DO-wide chunks (a second grid
    axis; each chunk recomputes the tiles). Under the interpreter: 16 x 16 tiles and 32-wide chunks,
    so the ci shapes cross tile boundaries and D = 40 takes the chunked path."""
    if rt.interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_DO=32, RESIDENT=d <= 32, num_warps=1,
                    num_stages=1)
    if d <= 256:
        width = max(16, triton.next_power_of_2(d))
        return dict(BLOCK_M=128 if width <= 128 else 64, BLOCK_N=64, BLOCK_K=width, BLOCK_DO=width,
                    RESIDENT=True, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_DO=256, RESIDENT=False, num_warps=8, num_stages=2)


@triton.jit
def _load_rows(ptr, stride_b, stride_d, idx, B, D, BLOCK_K: tl.constexpr):
    """Rows ``idx`` of a (B, D) array, features [0, BLOCK_K) (the whole row when D <= BLOCK_K);
    out-of-range entries read 0."""
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    return tl.load(ptr + idx[:, None] * stride_b + ks[None, :] * stride_d,
                   mask=(idx[:, None] < B) & (ks[None, :] < D), other=0.0)


@triton.jit
def _finite_or_nan(x):
    return tl.where(tl.abs(x) < float("inf"), x, float("nan"))


@triton.jit
def _similarity_tile(q_ptr, stride_qb, stride_qd, k_ptr, stride_kb, stride_kd, rows, cols, B, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tile ``q[rows] @ k[cols]^T`` (BLOCK_M x BLOCK_N), D walked in BLOCK_K chunks. Out-of-range
    rows/columns read 0. A non-finite entry becomes NaN (as in the reference)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qb + ks[None, :] * stride_qd,
                    mask=(rows[:, None] < B) & (ks[None, :] < D), other=0.0)
        k = tl.load(k_ptr + cols[:, None] * stride_kb + ks[None, :] * stride_kd,
                    mask=(cols[:, None] < B) & (ks[None, :] < D), other=0.0)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
    return _finite_or_nan(acc)


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)), -inf when both are -inf."""
    mx = tl.maximum(a, b)
    shift = tl.where(mx == float("-inf"), 0.0, mx)
    return shift + tl.log(tl.exp(a - shift) + tl.exp(b - shift))


@triton.jit
def _isogclr_stats_kernel(
    q_ptr, stride_qb, stride_qd,        # (B, D) anchors of this side; element (a, c) at a*stride_qb + c*stride_qd
    k_ptr, stride_kb, stride_kd,        # (B, D) the other view, same convention
    state_ptr, stride_sb, stride_sf,    # (B, 4) anchors' state (tau, s, b, u), any float dtype, any strides
    new_state_ptr,                      # out (B, 4) fp32 contiguous: (tau_new, s', b', u'); NaN if invalid
    loss_ptr,                           # out (B,) fp32: loss_a; NaN if the anchor's state is invalid
    stats_ptr,                          # out (5, B) fp32 contiguous: d, 1/tau, m, r, W (for the backward)
    B, D, gamma, rho, eta, beta_u, grad_clip, tau_min, tau_max, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < B

    # The positives d_a = q_a . k_a, in fp32.
    if RESIDENT:
        q_rows = _load_rows(q_ptr, stride_qb, stride_qd, rows, B, D, BLOCK_K)  # kept for the whole sweep
        k_rows = _load_rows(k_ptr, stride_kb, stride_kd, rows, B, D, BLOCK_K)
        diag = tl.sum(q_rows.to(tl.float32) * k_rows.to(tl.float32), axis=1)
    else:
        diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            m2 = row_ok[:, None] & (ks[None, :] < D)
            q = tl.load(q_ptr + rows[:, None] * stride_qb + ks[None, :] * stride_qd, mask=m2, other=0.0)
            k = tl.load(k_ptr + rows[:, None] * stride_kb + ks[None, :] * stride_kd, mask=m2, other=0.0)
            diag += tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)
    diag = _finite_or_nan(diag)

    tau = tl.load(state_ptr + rows * stride_sb, mask=row_ok, other=1.0).to(tl.float32)
    s = tl.load(state_ptr + rows * stride_sb + stride_sf, mask=row_ok, other=0.0).to(tl.float32)
    b = tl.load(state_ptr + rows * stride_sb + 2 * stride_sf, mask=row_ok, other=0.0).to(tl.float32)
    u = tl.load(state_ptr + rows * stride_sb + 3 * stride_sf, mask=row_ok, other=0.0).to(tl.float32)
    valid = (tau > 0.0) & (tau < float("inf")) & (s >= 0.0) & (s < float("inf")) \
        & (tl.abs(b) < float("inf")) & (tl.abs(u) < float("inf"))
    inv_tau = tl.where(valid, 1.0 / tau, 0.0)

    run_max = tl.zeros((BLOCK_M,), dtype=tl.float32)  # max_n hhat_an so far, seeded by the positive's 0
    sum_e = tl.zeros((BLOCK_M,), dtype=tl.float32)     # E_a, relative to run_max
    sum_eh = tl.zeros((BLOCK_M,), dtype=tl.float32)    # F_a, relative to run_max
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        if RESIDENT:
            k_cols = _load_rows(k_ptr, stride_kb, stride_kd, cols, B, D, BLOCK_K)
            sim = _finite_or_nan(tl.dot(q_rows, tl.trans(k_cols), input_precision=PRECISION))
        else:
            sim = _similarity_tile(q_ptr, stride_qb, stride_qd, k_ptr, stride_kb, stride_kd, rows, cols, B, D,
                                   BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        off = (cols[None, :] < B) & (cols[None, :] != rows[:, None])
        h = sim - diag[:, None]
        h_hat = h * inv_tau[:, None]
        new_max = tl.maximum(run_max, tl.max(tl.where(off, h_hat, float("-inf")), axis=1))
        e = tl.where(off, tl.exp(h_hat - new_max[:, None]), 0.0)
        rescale = tl.exp(run_max - new_max)
        sum_e = sum_e * rescale + tl.sum(e, axis=1)
        sum_eh = sum_eh * rescale + tl.sum(e * h, axis=1)
        run_max = new_max

    # NaN similarities make E NaN (the max may skip them): mark the whole anchor NaN then.
    bad = (~valid) | (sum_e != sum_e) | (diag != diag)
    # Log space from here, relative to run_max = max_n hhat_an (m): the stored b may lie far above this
    # batch's values, and exp(hhat - b') would then underflow in fp32 where the float64 definition does
    # not. With b' = max(b, m):  s' e^(b' - m) = (1 - gamma) s e^(b - m) + gamma (E + e^-m) / (B - 1).
    b_new = tl.maximum(b, run_max)
    log_new = tl.log(gamma * (sum_e + tl.exp(-run_max)) / (B - 1))
    log_old = tl.log((1.0 - gamma) * s) + (b - run_max)
    log_s_m = _logaddexp(log_old, log_new)                                  # log s' + b' - m
    log_den_m = _logaddexp(log_s_m, tl.log(eps + 0.0 * s) + (b_new - run_max))  # log (s' + eps) + b' - m
    to_weight = tl.exp(-log_den_m)   # w_an = exp(hhat_an - m) * to_weight; at most (B - 1) / gamma
    loss = sum_eh * to_weight / (B - 1)
    delta = log_s_m + run_max + rho - loss * inv_tau  # log s' + b' + rho - sum_n w_an hhat_an / (B - 1)
    u_new = (1.0 - beta_u) * u + beta_u * tl.minimum(tl.maximum(delta, -grad_clip), grad_clip)
    tau_new = tl.minimum(tl.maximum(tau - eta * u_new, tau_min), tau_max)

    nan = float("nan")
    tl.store(loss_ptr + rows, tl.where(bad, nan, loss), mask=row_ok)
    out = new_state_ptr + rows * 4
    tl.store(out, tl.where(bad, nan, tau_new), mask=row_ok)
    tl.store(out + 1, tl.where(bad, nan, tl.exp(log_s_m + (run_max - b_new))), mask=row_ok)
    tl.store(out + 2, tl.where(bad, nan, b_new), mask=row_ok)
    tl.store(out + 3, tl.where(bad, nan, u_new), mask=row_ok)
    tl.store(stats_ptr + rows, diag, mask=row_ok)
    tl.store(stats_ptr + B + rows, tl.where(bad, nan, inv_tau), mask=row_ok)
    tl.store(stats_ptr + 2 * B + rows, run_max, mask=row_ok)
    tl.store(stats_ptr + 3 * B + rows, to_weight, mask=row_ok)
    tl.store(stats_ptr + 4 * B + rows, sum_e * to_weight, mask=row_ok)


@triton.jit
def _isogclr_grad_kernel(
    q_ptr, stride_qb, stride_qd,        # (B, D) anchors of this side (the input being differentiated)
    k_ptr, stride_kb, stride_kd,        # (B, D) the other view
    q_stats_ptr, k_stats_ptr,           # (5, B) fp32 statistics of this side and of the other side
    gq_ptr, stride_gq,                  # (B,) upstream gradient of this side's per-anchor losses
    gk_ptr, stride_gk,                  # (B,) upstream gradient of the other side's per-anchor losses
    dq_ptr, stride_dqb, stride_dqd,     # out (B, D) in the features' dtype
    g_norm_ptr,                         # (1,) fp32: max |upstream gradient| over both sides (see below)
    B, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    RESIDENT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)  # which BLOCK_DO-wide slice of the D output features
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < B
    outs = chunk * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    out_ok = outs < D

    d_a = tl.load(q_stats_ptr + rows, mask=row_ok, other=0.0)
    inv_tau_a = tl.load(q_stats_ptr + B + rows, mask=row_ok, other=0.0)
    m_a = tl.load(q_stats_ptr + 2 * B + rows, mask=row_ok, other=0.0)
    # P is formed as (gq w + gk w~) / (g_norm sqrt(B - 1)): a typical weight is ~1 and the largest
    # possible one (B - 1) / gamma, so the 16-bit copy of P then holds typical entries near
    # 1/sqrt(B) and the extreme ones near sqrt(B - 1) / gamma, both inside fp16's normal range,
    # whatever the scale of the upstream gradient (a mean gives 1/B; AMP multiplies it by 2**16).
    g_norm = tl.load(g_norm_ptr)
    g_norm = tl.where(g_norm > 0.0, g_norm, 1.0)
    p_scale = 1.0 / (g_norm * tl.sqrt((B - 1) * 1.0))
    g_a = tl.load(gq_ptr + rows * stride_gq, mask=row_ok, other=0.0).to(tl.float32) * p_scale
    r_a = tl.load(q_stats_ptr + 3 * B + rows, mask=row_ok, other=0.0) * g_a
    gk_a = tl.load(gk_ptr + rows * stride_gk, mask=row_ok, other=0.0).to(tl.float32) * p_scale

    if RESIDENT:  # one output chunk (BLOCK_DO == BLOCK_K >= D): the k tile serves both dots
        q_rows = _load_rows(q_ptr, stride_qb, stride_qd, rows, B, D, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < B
        if RESIDENT:
            k_out = _load_rows(k_ptr, stride_kb, stride_kd, cols, B, D, BLOCK_K)
            sim = _finite_or_nan(tl.dot(q_rows, tl.trans(k_out), input_precision=PRECISION))
        else:
            sim = _similarity_tile(q_ptr, stride_qb, stride_qd, k_ptr, stride_kb, stride_kd, rows, cols, B, D,
                                   BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            k_out = tl.load(k_ptr + cols[:, None] * stride_kb + outs[None, :] * stride_kd,
                            mask=col_ok[:, None] & out_ok[None, :], other=0.0)
        d_n = tl.load(k_stats_ptr + cols, mask=col_ok, other=0.0)
        inv_tau_n = tl.load(k_stats_ptr + B + cols, mask=col_ok, other=0.0)
        m_n = tl.load(k_stats_ptr + 2 * B + cols, mask=col_ok, other=0.0)
        r_n = tl.load(k_stats_ptr + 3 * B + cols, mask=col_ok, other=0.0) \
            * tl.load(gk_ptr + cols * stride_gk, mask=col_ok, other=0.0).to(tl.float32) * p_scale
        w_q = tl.exp((sim - d_a[:, None]) * inv_tau_a[:, None] - m_a[:, None]) * r_a[:, None]  # gq_a w_an
        w_k = tl.exp((sim - d_n[None, :]) * inv_tau_n[None, :] - m_n[None, :]) * r_n[None, :]  # gk_n w~_an
        off = col_ok[None, :] & (cols[None, :] != rows[:, None])
        p = tl.where(off, w_q + w_k, 0.0)
        p_hi = p.to(k_out.dtype)
        acc = tl.dot(p_hi, k_out, acc, input_precision=PRECISION)
        if SPLIT_P:  # fp16: add the rounding error of P back, so the weights keep ~fp32 accuracy
            acc = tl.dot((p - p_hi.to(tl.float32)).to(k_out.dtype), k_out, acc, input_precision=PRECISION)

    # The diagonal: S~_aa appears in every h_an of anchor a and in h~_na of the other side's anchor a.
    w_sum = g_a * tl.load(q_stats_ptr + 4 * B + rows, mask=row_ok, other=0.0) \
        + gk_a * tl.load(k_stats_ptr + 4 * B + rows, mask=row_ok, other=0.0)
    k_a = tl.load(k_ptr + rows[:, None] * stride_kb + outs[None, :] * stride_kd,
                  mask=row_ok[:, None] & out_ok[None, :], other=0.0).to(tl.float32)
    acc = (acc - w_sum[:, None] * k_a) / (p_scale * (B - 1))
    tl.store(dq_ptr + rows[:, None] * stride_dqb + outs[None, :] * stride_dqd,
             acc.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


def _stats_side(q, k, state, hyper):
    bsz, dim = q.shape
    new_state = torch.empty((bsz, 4), device=q.device, dtype=torch.float32)
    loss = torch.empty(bsz, device=q.device, dtype=torch.float32)
    stats = torch.empty((_STATS, bsz), device=q.device, dtype=torch.float32)
    cfg = _launch(bsz, dim)
    cfg.pop("BLOCK_DO")
    _isogclr_stats_kernel[(triton.cdiv(bsz, cfg["BLOCK_M"]),)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), state, state.stride(0), state.stride(1),
        new_state, loss, stats, bsz, dim, hyper["gamma"], hyper["rho"], hyper["eta"], hyper["beta_u"],
        hyper["grad_clip"], hyper["tau_min"], hyper["tau_max"], hyper["eps"],
        PRECISION=rt.dot_precision(q.dtype), **cfg,
    )
    return loss, new_state, stats


@torch.library.custom_op("twinops::isogclr_loss_fwd", mutates_args=())
def _isogclr_fwd(
    image_features: torch.Tensor, text_features: torch.Tensor, state_image: torch.Tensor, state_text: torch.Tensor,
    gamma: float, rho: float, eta: float, beta_u: float, grad_clip: float, tau_min: float, tau_max: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    hyper = dict(gamma=gamma, rho=rho, eta=eta, beta_u=beta_u, grad_clip=grad_clip, tau_min=tau_min,
                 tau_max=tau_max, eps=eps)
    loss_i, new_i, stats_i = _stats_side(image_features, text_features, state_image, hyper)
    loss_t, new_t, stats_t = _stats_side(text_features, image_features, state_text, hyper)
    return loss_i, loss_t, new_i, new_t, stats_i, stats_t


@_isogclr_fwd.register_fake
def _(image_features, text_features, state_image, state_text, gamma, rho, eta, beta_u, grad_clip, tau_min,
      tau_max, eps):
    bsz = image_features.shape[0]
    vec = image_features.new_empty(bsz, dtype=torch.float32)
    st = image_features.new_empty((bsz, 4), dtype=torch.float32)
    stats = image_features.new_empty((_STATS, bsz), dtype=torch.float32)
    return vec, torch.empty_like(vec), st, torch.empty_like(st), stats, torch.empty_like(stats)


@torch.library.custom_op("twinops::isogclr_loss_bwd", mutates_args=())
def _isogclr_bwd(
    grad_q: torch.Tensor, grad_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_stats: torch.Tensor,
    k_stats: torch.Tensor,
) -> torch.Tensor:
    """d loss / d q for per-anchor upstream gradients ``grad_q`` (q's side) and ``grad_k`` (k's side)."""
    bsz, dim = q.shape
    dq = torch.empty((bsz, dim), device=q.device, dtype=q.dtype)
    # On the device, no synchronisation: the largest upstream gradient, to scale P (see the kernel).
    g_norm = torch.maximum(grad_q.abs().amax(), grad_k.abs().amax()).float().reshape(1)
    cfg = _launch(bsz, dim)
    grid = (triton.cdiv(bsz, cfg["BLOCK_M"]), triton.cdiv(dim, cfg["BLOCK_DO"]))
    _isogclr_grad_kernel[grid](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), q_stats, k_stats,
        grad_q, grad_q.stride(0), grad_k, grad_k.stride(0), dq, dq.stride(0), dq.stride(1), g_norm, bsz, dim,
        PRECISION=rt.dot_precision(q.dtype), SPLIT_P=q.dtype == torch.float16, **cfg,
    )
    return dq


@_isogclr_bwd.register_fake
def _(grad_q, grad_k, q, k, q_stats, k_stats):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    image_features, text_features = inputs[0], inputs[1]
    ctx.save_for_backward(image_features, text_features, output[4], output[5])
    ctx.mark_non_differentiable(*output[2:])  # new states and statistics carry no gradient


def _backward(ctx, grad_loss_i, grad_loss_t, grad_new_i, grad_new_t, grad_stats_i, grad_stats_t):
    x, y, stats_i, stats_t = ctx.saved_tensors
    bsz = x.shape[0]
    zero = x.new_zeros((), dtype=torch.float32).expand(bsz)  # an unused side's upstream gradient
    gi = grad_loss_i if grad_loss_i is not None else zero
    gt = grad_loss_t if grad_loss_t is not None else zero
    dx = _isogclr_bwd(gi, gt, x, y, stats_i, stats_t) if ctx.needs_input_grad[0] else None
    dy = _isogclr_bwd(gt, gi, y, x, stats_t, stats_i) if ctx.needs_input_grad[1] else None
    return dx, dy, None, None, None, None, None, None, None, None, None, None


_isogclr_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_state(state, name: str, bsz: int) -> torch.Tensor:
    rt.check_tensor(state, name)
    if not state.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {state.dtype}")
    if tuple(state.shape) != (bsz, 4):
        raise ValueError(f"{name} must have shape ({bsz}, 4), one (tau, s, b, u) row per pair, "
                         f"got {tuple(state.shape)}")
    return state


def isogclr_loss(image_features, text_features, state_image, state_text, *, gamma=0.8, rho=8.0, eta=1e-3,
                 beta_u=0.9, grad_clip=5.0, tau_min=5e-3, tau_max=1.0, eps=1e-10):
    """iSogCLR loss of P19 on the GPU; returns ``(loss, new_state_image, new_state_text)``.

    Same arguments and semantics as `twinops.reference.metric.isogclr_loss`. ``loss`` has the
    features' dtype; the new states are float32 (B, 4) tensors ``(tau, s, b, u)``, detached: the
    caller stores them (``state_I[ids] = new_state_image``); the given states are only read (any
    floating dtype, any strides). Gradients reach the features only (the algorithm's surrogate
    gradient: the weights are constants); none reaches the states. State values are checked on the
    device rather than raising (that would synchronise it): a sample whose temperature is not finite
    and > 0, whose ``s`` is not finite and >= 0, or whose ``b`` or ``u`` is not finite gets a NaN new
    state and makes the loss NaN.
    """
    x = rt.check_float_tensor(image_features, "image_features", 2, "(B, D)")
    y = rt.check_float_tensor(text_features, "text_features", 2, "(B, D)")
    if x.shape[0] < 2:
        raise ValueError(f"image_features must hold a batch of at least 2 pairs (B >= 2), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"image_features must have at least one feature (D >= 1), got shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"text_features must have the shape of image_features {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"text_features must have the dtype of image_features ({x.dtype}), got {y.dtype}")
    _check_state(state_image, "state_image", x.shape[0])
    _check_state(state_text, "state_text", x.shape[0])
    rt.check_device(("image_features", x), ("text_features", y), ("state_image", state_image),
                    ("state_text", state_text))
    hp = _check_hyper(gamma=gamma, rho=rho, eta=eta, beta_u=beta_u, grad_clip=grad_clip, tau_min=tau_min,
                      tau_max=tau_max, eps=eps)
    loss_i, loss_t, new_i, new_t, _, _ = _isogclr_fwd(
        x, y, state_image.detach(), state_text.detach(), hp["gamma"], hp["rho"], hp["eta"], hp["beta_u"],
        hp["grad_clip"], hp["tau_min"], hp["tau_max"], hp["eps"])
    loss = (loss_i.sum() + loss_t.sum()) / x.shape[0]
    return loss.to(x.dtype), new_i.detach(), new_t.detach()


def isogclr_init_state(n: int, *, tau_init: float = 0.01, device=None) -> torch.Tensor:
    """The float32 (n, 4) state of ``n`` never-seen samples: ``(tau_init, 0, 0, 0)`` per row."""
    state = torch.zeros((int(n), 4), device=device, dtype=torch.float32)
    state[:, 0] = tau_init
    return state


class ISogCLRLoss(torch.nn.Module):
    """``nn.Module`` form of `isogclr_loss` that keeps the per-sample state of a training set.

    The buffers ``state_image`` and ``state_text`` are (num_samples, 4) float32 tables
    ``(tau, s, b, u)``, initialised to ``(tau_init, 0, 0, 0)``. ``forward(image_features,
    text_features, image_ids, text_ids)`` gathers the batch's rows by dataset index, calls the
    functional `isogclr_loss`, and — in training mode only — writes the returned rows back with
    ``index_copy_`` (ids must be unique within a batch). That write is the only side effect; it is
    exactly ``state[ids] = new_state``, which users of the functional form do themselves. ``eta`` is
    an attribute, so a schedule sets ``module.eta`` before each step.
    """

    def __init__(self, num_samples: int, *, tau_init=0.01, gamma=0.8, rho=8.0, eta=1e-3, beta_u=0.9,
                 grad_clip=5.0, tau_min=5e-3, tau_max=1.0, eps=1e-10):
        super().__init__()
        self.hyper = dict(gamma=gamma, rho=rho, eta=eta, beta_u=beta_u, grad_clip=grad_clip, tau_min=tau_min,
                          tau_max=tau_max, eps=eps)
        _check_hyper(**self.hyper)
        self.register_buffer("state_image", isogclr_init_state(num_samples, tau_init=tau_init))
        self.register_buffer("state_text", isogclr_init_state(num_samples, tau_init=tau_init))

    @property
    def eta(self) -> float:
        return self.hyper["eta"]

    @eta.setter
    def eta(self, value: float) -> None:
        self.hyper["eta"] = value

    def forward(self, image_features, text_features, image_ids, text_ids):
        loss, new_i, new_t = isogclr_loss(image_features, text_features, self.state_image[image_ids],
                                          self.state_text[text_ids], **self.hyper)
        if self.training:
            with torch.no_grad():
                self.state_image.index_copy_(0, image_ids, new_i)
                self.state_text.index_copy_(0, text_ids, new_t)
        return loss
