"""Supervised contrastive loss (P58) as flash-attention-shaped Triton kernels: the N x N logits
never exist in memory. See `twinops.reference.metric.supcon_loss` for the definition.

Notation as in the reference: features z (N, D), logits l_ij = z_i . z_j / tau for j != i,
positives P(i) = {j != i : y_j = y_i}, LSE_i = log sum_{j != i} exp(l_ij),
L_i = (tau / tau_b) (LSE_i - mean_{p in P(i)} l_ip), 0 when P(i) is empty.

Forward (`_supcon_forward_kernel`), one program per block of BLOCK_M anchors (rows i):
    for each block of BLOCK_N columns j:
        S = z_I z_J^T / tau                      one (BLOCK_M, BLOCK_N) tile, tl.dot over D in BLOCK_K steps
        m, s <- online log-sum-exp of S over j != i (running row max m, sum s of exp(S - m))
        pos_sum += sum of S over positives;  n_pos += |positives in the tile|   (label masks built in-tile)
    L_i = (tau / tau_b) (m + log s - pos_sum / n_pos)
    saves LSE_i and |P(i)| per row: 8 bytes a row, the whole state the backward needs.

Backward (`_supcon_backward_kernel`). dL/dz = (G + G^T) z with
    G_ij = (g_i / tau_b) (q_ij - [j in P(i)] / |P(i)|),   q_ij = exp(l_ij - LSE_i),
g_i the upstream gradient of L_i. Flash-attention's backward needs a row pass (dQ) and a column
pass (dK) because its score matrix is not symmetric. Here l_ij = l_ji: the tile S_IJ recomputed for
row block I also holds the logits of the column term, so one pass forms H_IJ = G_IJ + (G_JI)^T from
the saved (LSE, |P|) of *both* blocks and accumulates dz_I += H_IJ z_J. Each program owns its rows
of dz (no atomics, deterministic) and the backward costs two tile products per tile instead of
three (recompute + row product + column product of a two-pass design would be four).

The dz accumulator (BLOCK_M x D, fp32) lives in registers when D <= REGISTER_D; wider features
accumulate into an fp32 (N, D) workspace, each program reading and writing only its own rows once
per column tile (the output itself for fp32 inputs).

Extra memory: forward O(N) (loss and two statistics per row); backward O(N) plus, for D > REGISTER_D
and 16-bit inputs, the O(N D) fp32 workspace. Every offset is 64-bit (int64 row and column indices
times the strides), so inputs past 2**31 elements and transposed or strided views are read in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...reference._checks import check_real
from .. import _runtime as rt

__all__ = ["supcon_loss", "SupConLoss"]

HAS_TRITON_BACKWARD = True


@dataclass(frozen=True)
class TileLaunch:
    """Tile sizes and warps of the two kernels. ``register_d``: widest D whose dz accumulator stays in
    registers (wider D uses the fp32 workspace)."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    register_d: int


# GPU: 64 x 64 logit tiles, 64-wide steps over D, 8 warps. Not yet tuned on a GPU (the sweep of
# tests/gpu/sweep_blocks.py does not cover tiled kernels); 128-row forward blocks are the first
# thing to try. The interpreter uses 16-wide tiles so the small test sizes (15/16/17/33 rows,
# 16/17/40 columns) cross tile boundaries and D > 16 takes the workspace path.
GPU_LAUNCH = TileLaunch(block_m=64, block_n=64, block_k=64, warps=8, stages=3, register_d=256)
INTERPRETER_LAUNCH = TileLaunch(block_m=16, block_n=16, block_k=16, warps=1, stages=1, register_d=16)


def _launch() -> TileLaunch:
    return INTERPRETER_LAUNCH if rt.interpreting() else GPU_LAUNCH


@triton.jit
def _logit_tile(
    z_ptr, stride_zn, stride_zd,  # (N, D) features
    rows, cols,                   # int64 row indices i (BLOCK_M,) and column indices j (BLOCK_N,)
    N, D, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """The fp32 (BLOCK_M, BLOCK_N) tile z_rows . z_cols^T / tau, reduced over D in BLOCK_K steps.
    Rows or columns past N, and features past D, load as 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_d = ks < D
        a = tl.load(z_ptr + rows[:, None] * stride_zn + ks[None, :] * stride_zd,
                    mask=(rows[:, None] < N) & in_d[None, :], other=0.0)          # (BLOCK_M, BLOCK_K)
        b = tl.load(z_ptr + ks[:, None] * stride_zd + cols[None, :] * stride_zn,
                    mask=in_d[:, None] & (cols[None, :] < N), other=0.0)          # (BLOCK_K, BLOCK_N) = z_cols^T
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc * inv_tau


@triton.jit
def _pair_masks(rows, cols, y_rows, y_cols, N):
    """``others``: the pair (i, j) exists and j != i (self-exclusion); ``positive``: also y_j = y_i."""
    others = (rows[:, None] < N) & (cols[None, :] < N) & (rows[:, None] != cols[None, :])
    return others, others & (y_rows[:, None] == y_cols[None, :])


@triton.jit
def _supcon_forward_kernel(
    z_ptr, stride_zn, stride_zd,  # (N, D) features; element (i, d) at i * stride_zn + d * stride_zd
    y_ptr, stride_y,              # (N,) integer labels
    loss_ptr,                     # out (N,) fp32: L_i (0 for anchors without positives)
    stats_ptr,                    # out (N, 2) fp32 contiguous: LSE_i and |P(i)|, for the backward
    N, D, inv_tau, loss_scale,    # loss_scale = tau / tau_b
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    y_rows = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=0)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of l_ij over j != i
    s = tl.zeros((BLOCK_M,), tl.float32)                # running sum of exp(l_ij - m)
    pos_sum = tl.zeros((BLOCK_M,), tl.float32)          # sum of l_ip over positives
    n_pos = tl.zeros((BLOCK_M,), tl.float32)            # |P(i)|
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        y_cols = tl.load(y_ptr + cols * stride_y, mask=cols < N, other=0)
        logits = _logit_tile(z_ptr, stride_zn, stride_zd, rows, cols, N, D, inv_tau,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        others, positive = _pair_masks(rows, cols, y_rows, y_cols, N)

        # Online log-sum-exp. A row that has seen only -inf keeps m = -inf and s = 0 (shift 0 avoids
        # -inf - -inf); NaN or +inf logits make s NaN, as in the reference.
        logits_others = tl.where(others, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits_others, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(logits_others - shift[:, None]), axis=1)
        m = m_new

        pos_sum += tl.sum(tl.where(positive, logits, 0.0), axis=1)
        n_pos += tl.sum(positive.to(tl.float32), axis=1)

    lse = m + tl.log(s)  # -inf for N = 1 (no other anchor); that row has no positive either
    loss = tl.where(n_pos > 0, loss_scale * (lse - pos_sum / tl.maximum(n_pos, 1.0)), 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(stats_ptr + rows * 2, lse, mask=row_ok)
    tl.store(stats_ptr + rows * 2 + 1, n_pos, mask=row_ok)


@triton.jit
def _gradient_coefficients(grad_ptr, stride_g, stats_ptr, idx, N, inv_tau_b):
    """Per anchor: LSE, 1 / |P|, g / tau_b and whether it has positives (its own loss then sends
    gradient; otherwise L_i = 0 is a constant and its row of G is exactly 0)."""
    ok = idx < N
    lse = tl.load(stats_ptr + idx * 2, mask=ok, other=0.0)
    n_pos = tl.load(stats_ptr + idx * 2 + 1, mask=ok, other=0.0)
    g = tl.load(grad_ptr + idx * stride_g, mask=ok, other=0.0).to(tl.float32)
    return lse, 1.0 / tl.maximum(n_pos, 1.0), g * inv_tau_b, n_pos > 0


@triton.jit
def _supcon_backward_kernel(
    grad_ptr, stride_g,              # (N,) upstream gradient g_i of L_i (stride 0 when broadcast from a mean or sum)
    z_ptr, stride_zn, stride_zd,     # (N, D) features, as in the forward
    y_ptr, stride_y,                 # (N,) labels
    stats_ptr,                       # (N, 2) fp32 from the forward: LSE_i, |P(i)|
    dz_ptr, stride_dn, stride_dd,    # out (N, D): the gradient (registers path) or a zeroed fp32 workspace
    N, D, inv_tau, inv_tau_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_IN_REGISTERS: tl.constexpr,  # D <= BLOCK_D: the whole (BLOCK_M, D) accumulator fits in registers
    PRECISION: tl.constexpr,         # tl.dot precision of the logit tile (as in the forward)
    H_DTYPE: tl.constexpr,           # dtype H is rounded to for H z_J (bf16 for bf16 features, else fp32)
    H_PRECISION: tl.constexpr,       # tl.dot precision of H z_J
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    y_rows = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=0)
    lse_i, inv_pos_i, coef_i, has_pos_i = _gradient_coefficients(grad_ptr, stride_g, stats_ptr, rows, N, inv_tau_b)

    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # dz_I, used when ACC_IN_REGISTERS
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        y_cols = tl.load(y_ptr + cols * stride_y, mask=col_ok, other=0)
        lse_j, inv_pos_j, coef_j, has_pos_j = _gradient_coefficients(grad_ptr, stride_g, stats_ptr, cols, N, inv_tau_b)
        logits = _logit_tile(z_ptr, stride_zn, stride_zd, rows, cols, N, D, inv_tau,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        others, positive = _pair_masks(rows, cols, y_rows, y_cols, N)

        # H_ij = G_ij + G_ji. Both use l_ij (= l_ji): G_ij normalises with anchor i's LSE and |P(i)|,
        # G_ji with anchor j's. `where`, not a product with 0, drops anchors without positives, whose
        # statistics may be -inf (N = 1) or NaN.
        g_row = coef_i[:, None] * (tl.exp(logits - lse_i[:, None]) - tl.where(positive, inv_pos_i[:, None], 0.0))
        g_col = coef_j[None, :] * (tl.exp(logits - lse_j[None, :]) - tl.where(positive, inv_pos_j[None, :], 0.0))
        h = tl.where(has_pos_i[:, None], g_row, 0.0) + tl.where(has_pos_j[None, :], g_col, 0.0)
        h = tl.where(others, h, 0.0).to(H_DTYPE)

        if ACC_IN_REGISTERS:
            z_cols = tl.load(z_ptr + cols[:, None] * stride_zn + dims[None, :] * stride_zd,
                             mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
            acc = tl.dot(h, z_cols.to(H_DTYPE), acc, input_precision=H_PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + dims
                in_d = ds < D
                z_cols = tl.load(z_ptr + cols[:, None] * stride_zn + ds[None, :] * stride_zd,
                                 mask=col_ok[:, None] & in_d[None, :], other=0.0)
                out = dz_ptr + rows[:, None] * stride_dn + ds[None, :] * stride_dd
                out_mask = row_ok[:, None] & in_d[None, :]
                part = tl.load(out, mask=out_mask, other=0.0)
                part = tl.dot(h, z_cols.to(H_DTYPE), part, input_precision=H_PRECISION)
                tl.store(out, part, mask=out_mask)
            tl.debug_barrier()  # this block's workspace writes are visible to its next read-modify-write

    if ACC_IN_REGISTERS:
        out = dz_ptr + rows[:, None] * stride_dn + dims[None, :] * stride_dd
        tl.store(out, acc.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims[None, :] < D))


# ---------------------------------------------------------------------------------------------- host


def _second_product(dtype: torch.dtype) -> dict:
    """How H z_J is multiplied. bf16 features: H rounded to bf16 (fp32's exponent range), as
    flash-attention rounds P. fp16 features: H's entries (down to g/N times a probability ~1/N) fall
    below fp16's normal range at large N, so H stays fp32 and the product runs in TF32 (fp16 features
    are exact in TF32). fp32 features: fp32 at the user's matmul precision."""
    if dtype == torch.bfloat16:
        return {"H_DTYPE": tl.bfloat16, "H_PRECISION": "ieee"}
    if dtype == torch.float16:
        return {"H_DTYPE": tl.float32, "H_PRECISION": "tf32"}
    return {"H_DTYPE": tl.float32, "H_PRECISION": rt.dot_precision(torch.float32)}


@torch.library.custom_op("twinops::supcon_loss_rows", mutates_args=())
def _supcon_rows(
    features: torch.Tensor, labels: torch.Tensor, temperature: float, base_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = features.shape
    loss = torch.empty(n, device=features.device, dtype=torch.float32)
    stats = torch.empty((n, 2), device=features.device, dtype=torch.float32)
    cfg = _launch()
    _supcon_forward_kernel[(triton.cdiv(n, cfg.block_m),)](
        features, features.stride(0), features.stride(1), labels, labels.stride(0), loss, stats,
        n, d, 1.0 / temperature, temperature / base_temperature,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        PRECISION=rt.dot_precision(features.dtype), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return loss, stats


@_supcon_rows.register_fake
def _(features, labels, temperature, base_temperature):
    n = features.shape[0]
    return features.new_empty(n, dtype=torch.float32), features.new_empty((n, 2), dtype=torch.float32)


@torch.library.custom_op("twinops::supcon_loss_rows_backward", mutates_args=())
def _supcon_rows_backward(
    grad_loss: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
    temperature: float, base_temperature: float,
) -> torch.Tensor:
    n, d = features.shape
    cfg = _launch()
    in_registers = d <= cfg.register_d
    if in_registers:
        grad = torch.empty((n, d), device=features.device, dtype=features.dtype)
        block_d = max(16, triton.next_power_of_2(d))
    else:
        grad = torch.zeros((n, d), device=features.device, dtype=torch.float32)  # the workspace
        block_d = cfg.register_d
    _supcon_backward_kernel[(triton.cdiv(n, cfg.block_m),)](
        grad_loss, grad_loss.stride(0), features, features.stride(0), features.stride(1),
        labels, labels.stride(0), stats, grad, grad.stride(0), grad.stride(1),
        n, d, 1.0 / temperature, 1.0 / base_temperature,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=block_d,
        ACC_IN_REGISTERS=in_registers, PRECISION=rt.dot_precision(features.dtype),
        **_second_product(features.dtype), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return grad.to(features.dtype)


@_supcon_rows_backward.register_fake
def _(grad_loss, features, labels, stats, temperature, base_temperature):
    return features.new_empty(features.shape)


def _setup_context(ctx, inputs, output):
    features, labels, temperature, base_temperature = inputs
    ctx.save_for_backward(features, labels, output[1])
    ctx.temperature, ctx.base_temperature = temperature, base_temperature


def _backward(ctx, grad_loss, grad_stats):
    features, labels, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _supcon_rows_backward(grad_loss, features, labels, stats, ctx.temperature, ctx.base_temperature)
    return grad, None, None, None


_supcon_rows.register_autograd(_backward, setup_context=_setup_context)


def supcon_loss(features, labels, *, temperature=0.07, base_temperature=0.07, reduction="mean"):
    """Supervised contrastive loss of Khosla et al. over the (N, D) anchors ``features``, on the GPU.

    Same arguments and semantics as `twinops.reference.metric.supcon_loss`; returns the input dtype.
    Memory beyond the inputs and the gradient is O(N): the N x N logits are never stored.
    """
    rt.check_float_tensor(features, "features", 2, "(N, D)")
    n, d = features.shape
    if n < 1:
        raise ValueError(f"features must hold at least one row (N >= 1), got shape {tuple(features.shape)}")
    if d < 1:
        raise ValueError(f"features must have at least one column (D >= 1), got shape {tuple(features.shape)}")
    rt.check_int_tensor(labels, "labels", (n,))
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    base_temperature = check_real(base_temperature, "base_temperature", low=0.0, low_open=True)
    rt.check_reduction(reduction)
    rt.check_device(("features", features), ("labels", labels))
    loss, _ = _supcon_rows(features, labels, temperature, base_temperature)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.mean()
    return loss.to(features.dtype)


class SupConLoss(torch.nn.Module):
    """``nn.Module`` form of `supcon_loss`: ``SupConLoss()(features, labels)``."""

    def __init__(self, *, temperature=0.07, base_temperature=0.07, reduction="mean"):
        super().__init__()
        self.temperature, self.base_temperature, self.reduction = temperature, base_temperature, reduction

    def forward(self, features, labels):
        return supcon_loss(features, labels, temperature=self.temperature,
                           base_temperature=self.base_temperature, reduction=self.reduction)
