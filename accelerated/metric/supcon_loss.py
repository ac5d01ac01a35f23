"""Supervised contrastive loss (P58) as flash-attention-shaped Triton kernels: the N x N logits
never exist in memory. See `twinops.reference.metric.supcon_loss` for the definition.

Notation as in the reference: features z (N, D), logits l_ij = z_i . z_j / tau for j != i,
positives P(i) = {j != i : y_j = y_i}, LSE_i = log sum_{j != i} exp(l_ij),
L_i = (tau / tau_b) (LSE_i - mean_{p in P(i)} l_ip), 0 when P(i) is empty.

Forward (`_supcon_forward_kernel`), one program per block of BLOCK_M anchors (rows i):
    for each block of BLOCK_N columns j:
        S = z_I z_J^T / tau                      one (BLOCK_M, BLOCK_N) tile of tl.dot over D
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
of dz (no atomics, deterministic), and the backward costs two tile products per (I, J) tile:
recompute S, then H z_J. A row pass plus a column pass would cost four, each recomputing S.

Features up to 256 wide (128 in fp32) are resident (flash-attention's Q): a program loads its anchors once and
every column tile once, which then serves both backward dots, and dz_I accumulates in registers.
Wider features are streamed: each logit tile walks D in BLOCK_K steps, and dz_I accumulates in an fp32
(N, D) workspace that each program reads and writes, for its own rows only, once per column tile (the
output itself for fp32 inputs). See `_layout`.

Extra memory: forward O(N) (the loss and two statistics per row); backward O(N), plus the O(N D) fp32
workspace for streamed 16-bit features. Every offset is 64-bit (int64 row and feature indices times
the strides), so inputs past 2**31 elements and transposed or strided views are read in place.
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
    """Tile sizes and warps of one kernel. ``block_k`` is the step over D when the features are not
    resident; ``resident_d`` the widest 16-bit D kept resident, half that for fp32 (see `_layout`)."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    resident_d: int


# GPU: not yet tuned on a GPU (tests/gpu/sweep_blocks.py covers row-wise kernels only). The forward
# keeps 128 anchors per program; the backward 64, since it also holds the (64, D) fp32 accumulator.
# The interpreter uses 16-wide tiles so the small test sizes (15/16/17/33 rows, 16/17/40 columns)
# cross tile boundaries, and D > 16 (D > 8 in fp32) takes the streamed path.
GPU_FORWARD = TileLaunch(block_m=128, block_n=64, block_k=64, warps=8, stages=2, resident_d=256)
GPU_BACKWARD = TileLaunch(block_m=64, block_n=64, block_k=64, warps=8, stages=2, resident_d=256)
INTERPRETER_LAUNCH = TileLaunch(block_m=16, block_n=16, block_k=16, warps=1, stages=1, resident_d=16)


def _layout(features: torch.Tensor, launch: TileLaunch) -> dict:
    """Launch arguments for (N, D) ``features``.

    Resident (D <= ``resident_d``; half that for fp32, whose tiles take twice the registers): a program
    loads its anchors' features once, as flash-attention keeps Q, and each column tile z_J once, which
    then serves every dot that needs it (in the backward both S = z_I z_J^T and H z_J); the
    backward's dz accumulator stays in registers. Streamed (wider D): every logit tile walks D in
    BLOCK_K steps, and the backward accumulates into an fp32 workspace, BLOCK_K columns at a time."""
    d = features.shape[1]
    resident = d * features.element_size() <= 2 * launch.resident_d
    return dict(
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_K=max(16, triton.next_power_of_2(d)) if resident else launch.block_k,
        RESIDENT=resident, num_warps=launch.warps, num_stages=launch.stages,
    )


def _forward_launch(features: torch.Tensor) -> dict:
    return _layout(features, INTERPRETER_LAUNCH if rt.interpreting() else GPU_FORWARD)


def _backward_launch(features: torch.Tensor) -> dict:
    return _layout(features, INTERPRETER_LAUNCH if rt.interpreting() else GPU_BACKWARD)


@triton.jit
def _load_rows(z_ptr, stride_zn, stride_zd, idx, k0, N, D, BLOCK_K: tl.constexpr):
    """Features [k0, k0 + BLOCK_K) of rows ``idx`` (int64) as a (len(idx), BLOCK_K) tile; entries past
    N or D read 0, so they add nothing to any dot product."""
    ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    return tl.load(z_ptr + idx[:, None] * stride_zn + ks[None, :] * stride_zd,
                   mask=(idx[:, None] < N) & (ks[None, :] < D), other=0.0)


@triton.jit
def _streamed_logit_tile(
    z_ptr, stride_zn, stride_zd, rows, cols, N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """The fp32 (BLOCK_M, BLOCK_N) tile z_rows . z_cols^T, D walked in BLOCK_K steps (the caller
    multiplies by 1/tau)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = _load_rows(z_ptr, stride_zn, stride_zd, rows, k0, N, D, BLOCK_K)
        b = _load_rows(z_ptr, stride_zn, stride_zd, cols, k0, N, D, BLOCK_K)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RESIDENT: tl.constexpr,       # D <= BLOCK_K: the anchors' features are loaded once
    PRECISION: tl.constexpr,      # tl.dot input precision (fp32 features: "ieee" or "tf32")
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    y_rows = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=0)
    if RESIDENT:
        z_rows = _load_rows(z_ptr, stride_zn, stride_zd, rows, 0, N, D, BLOCK_K)  # (BLOCK_M, D), kept

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of l_ij over j != i
    s = tl.zeros((BLOCK_M,), tl.float32)                # running sum of exp(l_ij - m)
    pos_sum = tl.zeros((BLOCK_M,), tl.float32)          # sum of l_ip over positives
    n_pos = tl.zeros((BLOCK_M,), tl.float32)            # |P(i)|
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        y_cols = tl.load(y_ptr + cols * stride_y, mask=cols < N, other=0)
        if RESIDENT:
            z_cols = _load_rows(z_ptr, stride_zn, stride_zd, cols, 0, N, D, BLOCK_K)
            logits = tl.dot(z_rows, tl.trans(z_cols), input_precision=PRECISION) * inv_tau
        else:
            logits = _streamed_logit_tile(z_ptr, stride_zn, stride_zd, rows, cols, N, D,
                                          BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * inv_tau
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
    dz_ptr, stride_dn, stride_dd,    # out (N, D): the gradient (resident) or a zeroed fp32 workspace (streamed)
    N, D, inv_tau, inv_tau_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RESIDENT: tl.constexpr,          # D <= BLOCK_K: z_I loaded once, dz_I accumulated in registers
    PRECISION: tl.constexpr,         # tl.dot precision of the logit tile (as in the forward)
    H_DTYPE: tl.constexpr,           # dtype H is rounded to for H z_J (bf16 for bf16 features, else fp32)
    H_PRECISION: tl.constexpr,       # tl.dot precision of H z_J
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    y_rows = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=0)
    lse_i, inv_pos_i, coef_i, has_pos_i = _gradient_coefficients(grad_ptr, stride_g, stats_ptr, rows, N, inv_tau_b)
    if RESIDENT:
        z_rows = _load_rows(z_ptr, stride_zn, stride_zd, rows, 0, N, D, BLOCK_K)  # (BLOCK_M, D), kept
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)                     # dz_I

    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        y_cols = tl.load(y_ptr + cols * stride_y, mask=cols < N, other=0)
        lse_j, inv_pos_j, coef_j, has_pos_j = _gradient_coefficients(grad_ptr, stride_g, stats_ptr, cols, N, inv_tau_b)
        if RESIDENT:
            z_cols = _load_rows(z_ptr, stride_zn, stride_zd, cols, 0, N, D, BLOCK_K)  # serves both dots
            logits = tl.dot(z_rows, tl.trans(z_cols), input_precision=PRECISION) * inv_tau
        else:
            logits = _streamed_logit_tile(z_ptr, stride_zn, stride_zd, rows, cols, N, D,
                                          BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * inv_tau
        others, positive = _pair_masks(rows, cols, y_rows, y_cols, N)

        # H_ij = G_ij + G_ji. Both use l_ij (= l_ji): G_ij normalises with anchor i's LSE and |P(i)|,
        # G_ji with anchor j's. `where`, not a product with 0, drops anchors without positives, whose
        # LSE may be -inf (N = 1).
        g_row = coef_i[:, None] * (tl.exp(logits - lse_i[:, None]) - tl.where(positive, inv_pos_i[:, None], 0.0))
        g_col = coef_j[None, :] * (tl.exp(logits - lse_j[None, :]) - tl.where(positive, inv_pos_j[None, :], 0.0))
        h = tl.where(has_pos_i[:, None], g_row, 0.0) + tl.where(has_pos_j[None, :], g_col, 0.0)
        h = tl.where(others, h, 0.0).to(H_DTYPE)

        if RESIDENT:
            acc = tl.dot(h, z_cols.to(H_DTYPE), acc, input_precision=H_PRECISION)
        else:
            # dz_I[:, k0:k0+BLOCK_K] += H z_J[:, k0:k0+BLOCK_K], read-modify-write of this program's
            # own rows of the workspace (no other program touches them).
            for k0 in range(0, D, BLOCK_K):
                z_cols = _load_rows(z_ptr, stride_zn, stride_zd, cols, k0, N, D, BLOCK_K)
                ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                out = dz_ptr + rows[:, None] * stride_dn + ks[None, :] * stride_dd
                out_mask = row_ok[:, None] & (ks[None, :] < D)
                part = tl.load(out, mask=out_mask, other=0.0)
                part = tl.dot(h, z_cols.to(H_DTYPE), part, input_precision=H_PRECISION)
                tl.store(out, part, mask=out_mask)
            tl.debug_barrier()  # the block's writes are visible to its next read-modify-write

    if RESIDENT:
        ks = tl.arange(0, BLOCK_K).to(tl.int64)
        out = dz_ptr + rows[:, None] * stride_dn + ks[None, :] * stride_dd
        tl.store(out, acc.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (ks[None, :] < D))


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
    launch = _forward_launch(features)
    _supcon_forward_kernel[(triton.cdiv(n, launch["BLOCK_M"]),)](
        features, features.stride(0), features.stride(1), labels, labels.stride(0), loss, stats,
        n, d, 1.0 / temperature, temperature / base_temperature,
        PRECISION=rt.dot_precision(features.dtype), **launch,
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
    launch = _backward_launch(features)
    if launch["RESIDENT"]:
        grad = torch.empty((n, d), device=features.device, dtype=features.dtype)
    else:
        grad = torch.zeros((n, d), device=features.device, dtype=torch.float32)  # the workspace
    _supcon_backward_kernel[(triton.cdiv(n, launch["BLOCK_M"]),)](
        grad_loss, grad_loss.stride(0), features, features.stride(0), features.stride(1),
        labels, labels.stride(0), stats, grad, grad.stride(0), grad.stride(1),
        n, d, 1.0 / temperature, 1.0 / base_temperature,
        PRECISION=rt.dot_precision(features.dtype), **_second_product(features.dtype), **launch,
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
