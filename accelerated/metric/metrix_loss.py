"""Metrix (P22) as Triton kernels: the contrastive loss over all clean pairs in tiles, and the mixed
triples in one pass each, without a B x B or M x M matrix. See
`twinops.reference.metric.metrix_loss` for the definition.

Notation: e_r the input rows, n_r = |e_r|, ê_r = e_r / max(n_r, eps), d(u, v) = |û - v̂|.

Forward (three kernels):
  1. `_row_norm_kernel`: n_r for every row (B floats, reused by the other kernels).
  2. `_clean_forward_kernel`, one program per (BLOCK_I x BLOCK_J) tile of the pair matrix: the tile of
     distances d_ij = |ê_i - ê_j| from direct differences over D chunks (exact 0 for duplicate rows,
     which a dot-product form |ê_i|² + |ê_j|² - 2 ê_i·ê_j would turn into ~1e-4 and count as a loss),
     hinges under the label masks, and the tile's sums and non-zero counts (one row of partials).
  3. `_mixed_forward_kernel`, one program per BLOCK_T triples (a, i, j): gather the rows, z = lam e_i +
     (1 - lam) e_j, |z| in a first pass over D, d = |ê_a - ẑ| in a second, both hinges, and the
     block's sums and non-zero counts.
  The host adds the partials: loss = S+/C+ + S-/C- + w (Sm+/Cm+ + Sm-/Cm-) (S/max(C, 1)).

Backward (d loss / d distance is a constant per set, 1/C, times the hinge's slope):
  4. `_clean_backward_kernel`, one program per BLOCK_I rows and split of the column tiles (splits
     only so that a small batch fills the GPU): recomputes the distance tiles and adds
     G_i += 2 sum_j c_ij (ê_i - ê_j) / d_ij (each unordered pair appears twice, as (i, j) and (j, i))
     into an fp32 (B, D) buffer with atomics (differences taken directly: no cancellation at small d).
  5. `_normalize_backward_kernel`, per row, in place: G_i -> (G_i - ê_i (ê_i·G_i)) / n_i.
  6. `_mixed_backward_kernel`, one program per BLOCK_T triples: recomputes z, d and ê_a·ẑ, forms
     v = c (ê_a - ẑ) / d, pushes v through the anchor's normalisation and -v through the mixed
     vector's (the projections come from the dot products at hand), and adds them into rows a,
     i (times lam) and j (times 1 - lam) with fp32 atomics; a block whose triples share their anchor
     (or mix_a row), as the authors' sorted triples do, adds its summed row once.
  Atomics make the gradient's last bits vary from run to run.
Extra memory: B norms, O(B²/(BLOCK_I BLOCK_J) + M/BLOCK_T) partial sums, and one fp32 (B, D)
gradient buffer in the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_choice, check_real
from .. import _runtime as rt

__all__ = ["metrix_loss", "metrix_triples", "MetrixLoss", "MODES"]

HAS_TRITON_BACKWARD = True

EPS = 1e-12  # floor on the norm, as F.normalize
MODES = ("pos_neg", "anc_neg")


def _blocks() -> dict:
    """Tile sizes: 16-wide under the interpreter so small test shapes cross tile boundaries. On the GPU
    a clean tile holds BLOCK_I x BLOCK_J x BLOCK_D differences (64 registers a thread at 4 warps), a
    triple block BLOCK_T x BLOCK_DT elements of each gathered row (not yet tuned on a GPU)."""
    if rt.interpreting():  # two column splits in the clean backward, so the split is tested too
        return dict(BLOCK_I=16, BLOCK_J=16, BLOCK_D=16, BLOCK_T=32, BLOCK_DT=16, BLOCK_R=16, warps=1,
                    programs=lambda device: 2)
    return dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=8, BLOCK_T=32, BLOCK_DT=128, BLOCK_R=32, warps=4,
                programs=_programs_to_fill)


def _programs_to_fill(device) -> int:
    """Programs the clean backward aims for: two per streaming multiprocessor."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _hinge(x):
    return tl.where(x < 0.0, 0.0, x)  # max(x, 0) that keeps NaN


@triton.jit
def _row_norm_kernel(
    x_ptr, stride_b, stride_d,  # (B, D) embeddings; element (r, k) at r*stride_b + k*stride_d
    norm_ptr,                   # out (B,) fp32: n_r = |e_r|
    B, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < B
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_b + cols[None, :] * stride_d,
                    mask=row_mask[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(norm_ptr + rows, tl.sqrt_rn(acc), mask=row_mask)


@triton.jit
def _load_rows(x_ptr, stride_b, stride_d, rows, row_mask, cols, D):
    """e for ``rows`` at columns ``cols`` in fp32; 0 outside the masks."""
    return tl.load(x_ptr + rows[:, None] * stride_b + cols[None, :] * stride_d,
                   mask=row_mask[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_unit_rows(x_ptr, stride_b, stride_d, rows, denom, row_mask, cols, D):
    """ê = e / max(n, eps) for ``rows`` (the denominators in ``denom``) at columns ``cols``. Correctly
    rounded division and square roots (``div_rn``, ``sqrt_rn``; the defaults are approximate on the
    GPU), as the reference's, keep parallel rows exactly equal after normalisation (with D = 1 every
    row is exactly +-1), so their distance is exactly 0 and is not counted."""
    return tl.math.div_rn(_load_rows(x_ptr, stride_b, stride_d, rows, row_mask, cols, D), denom[:, None])


@triton.jit
def _tile_distance(x_ptr, stride_b, stride_d, rows_i, den_i, mask_i, rows_j, den_j, mask_j, D,
                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (BLOCK_I, BLOCK_J) tile d_ij = |ê_i - ê_j| from direct differences, D in chunks."""
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        xi = _load_unit_rows(x_ptr, stride_b, stride_d, rows_i, den_i, mask_i, cols, D)
        xj = _load_unit_rows(x_ptr, stride_b, stride_d, rows_j, den_j, mask_j, cols, D)
        diff = xi[:, None, :] - xj[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    return tl.sqrt_rn(acc)


@triton.jit
def _tile_losses(labels_ptr, stride_label, rows_i, mask_i, rows_j, mask_j, dist, pos_margin, neg_margin):
    """Hinge losses of the tile's positive and negative pairs; exactly 0 for every other entry."""
    yi = tl.load(labels_ptr + rows_i * stride_label, mask=mask_i, other=0)
    yj = tl.load(labels_ptr + rows_j * stride_label, mask=mask_j, other=0)
    valid = mask_i[:, None] & mask_j[None, :]
    same = yi[:, None] == yj[None, :]
    pos = valid & same & (rows_i[:, None] != rows_j[None, :])
    neg = valid & (yi[:, None] != yj[None, :])
    pos_loss = tl.where(pos, _hinge(dist - pos_margin), 0.0)
    neg_loss = tl.where(neg, _hinge(neg_margin - dist), 0.0)
    return pos_loss, neg_loss


@triton.jit
def _clean_forward_kernel(
    x_ptr, stride_b, stride_d,  # (B, D) embeddings
    labels_ptr, stride_label,   # (B,) integer labels
    norm_ptr,                   # (B,) fp32 row norms from _row_norm_kernel
    sums_ptr,                   # out (tiles, 2) fp32 contiguous: sum of positive / negative losses
    counts_ptr,                 # out (tiles, 2) int32 contiguous: their non-zero counts
    B, D, pos_margin, neg_margin, eps,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_i = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    rows_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    rows_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    mask_i, mask_j = rows_i < B, rows_j < B
    den_i = tl.maximum(tl.load(norm_ptr + rows_i, mask=mask_i, other=1.0), eps)
    den_j = tl.maximum(tl.load(norm_ptr + rows_j, mask=mask_j, other=1.0), eps)
    dist = _tile_distance(x_ptr, stride_b, stride_d, rows_i, den_i, mask_i, rows_j, den_j, mask_j, D,
                          BLOCK_I, BLOCK_J, BLOCK_D)
    pos_loss, neg_loss = _tile_losses(labels_ptr, stride_label, rows_i, mask_i, rows_j, mask_j, dist,
                                      pos_margin, neg_margin)
    tile = pid_i * tl.num_programs(1) + pid_j
    tl.store(sums_ptr + tile * 2, tl.sum(tl.sum(pos_loss, axis=1), axis=0))
    tl.store(sums_ptr + tile * 2 + 1, tl.sum(tl.sum(neg_loss, axis=1), axis=0))
    tl.store(counts_ptr + tile * 2, tl.sum(tl.sum((pos_loss != 0.0).to(tl.int32), axis=1), axis=0))
    tl.store(counts_ptr + tile * 2 + 1, tl.sum(tl.sum((neg_loss != 0.0).to(tl.int32), axis=1), axis=0))


@triton.jit
def _load_triples(anchors_ptr, stride_a, mix_a_ptr, stride_ma, mix_b_ptr, stride_mb, t, t_mask, B):
    """Row indices of the triples ``t``; ``ok`` is False where any is out of [0, B) (those read row 0)."""
    a = tl.load(anchors_ptr + t * stride_a, mask=t_mask, other=0).to(tl.int64)
    i = tl.load(mix_a_ptr + t * stride_ma, mask=t_mask, other=0).to(tl.int64)
    j = tl.load(mix_b_ptr + t * stride_mb, mask=t_mask, other=0).to(tl.int64)
    ok = t_mask & (a >= 0) & (a < B) & (i >= 0) & (i < B) & (j >= 0) & (j < B)
    return tl.where(ok, a, 0), tl.where(ok, i, 0), tl.where(ok, j, 0), ok


@triton.jit
def _mixed_rows(x_ptr, stride_b, stride_d, i, j, t_mask, cols, D, lam):
    """z = lam e_i + (1 - lam) e_j at columns ``cols``, the same operations in every pass."""
    xi = _load_rows(x_ptr, stride_b, stride_d, i, t_mask, cols, D)
    xj = _load_rows(x_ptr, stride_b, stride_d, j, t_mask, cols, D)
    return lam * xi + (1.0 - lam) * xj


@triton.jit
def _triple_geometry(x_ptr, stride_b, stride_d, a, den_a, i, j, t_mask, D, lam, eps, BLOCK_D: tl.constexpr):
    """|z|, d = |ê_a - ẑ| and ê_a·ẑ for the mixed vectors z = lam e_i + (1 - lam) e_j."""
    z_sq = tl.zeros(a.shape, dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        z = _mixed_rows(x_ptr, stride_b, stride_d, i, j, t_mask, cols, D, lam)
        z_sq += tl.sum(z * z, axis=1)
    z_norm = tl.sqrt_rn(z_sq)
    den_z = tl.maximum(z_norm, eps)
    d_sq = tl.zeros(a.shape, dtype=tl.float32)
    dot = tl.zeros(a.shape, dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        ea = _load_unit_rows(x_ptr, stride_b, stride_d, a, den_a, t_mask, cols, D)
        zhat = tl.math.div_rn(_mixed_rows(x_ptr, stride_b, stride_d, i, j, t_mask, cols, D, lam), den_z[:, None])
        diff = ea - zhat
        d_sq += tl.sum(diff * diff, axis=1)
        dot += tl.sum(ea * zhat, axis=1)
    return z_norm, den_z, tl.sqrt_rn(d_sq), dot


@triton.jit
def _mixed_forward_kernel(
    x_ptr, stride_b, stride_d,  # (B, D) embeddings
    anchors_ptr, stride_a,      # (M,) anchor rows
    mix_a_ptr, stride_ma,       # (M,) rows mixed with weight lam
    mix_b_ptr, stride_mb,       # (M,) rows mixed with weight 1 - lam
    norm_ptr,                   # (B,) fp32 row norms
    sums_ptr,                   # out (blocks, 2) fp32 contiguous: sum of mixed positive / negative losses
    counts_ptr,                 # out (blocks, 2) int32 contiguous: their non-zero counts
    B, D, M, lam, pos_margin, neg_margin, eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = t < M
    a, i, j, ok = _load_triples(anchors_ptr, stride_a, mix_a_ptr, stride_ma, mix_b_ptr, stride_mb, t, t_mask, B)
    den_a = tl.maximum(tl.load(norm_ptr + a, mask=t_mask, other=1.0), eps)
    _, _, dist, _ = _triple_geometry(x_ptr, stride_b, stride_d, a, den_a, i, j, t_mask, D, lam, eps, BLOCK_D)
    # An out-of-range index poisons the loss with NaN (raising would need a device synchronisation).
    pos_loss = tl.where(t_mask, tl.where(ok, lam * _hinge(dist - pos_margin), float("nan")), 0.0)
    neg_loss = tl.where(t_mask, tl.where(ok, (1.0 - lam) * _hinge(neg_margin - dist), float("nan")), 0.0)
    tl.store(sums_ptr + pid * 2, tl.sum(pos_loss, axis=0))
    tl.store(sums_ptr + pid * 2 + 1, tl.sum(neg_loss, axis=0))
    tl.store(counts_ptr + pid * 2, tl.sum((pos_loss != 0.0).to(tl.int32), axis=0))
    tl.store(counts_ptr + pid * 2 + 1, tl.sum((neg_loss != 0.0).to(tl.int32), axis=0))


@triton.jit
def _set_coefficients(grad_ptr, counts_ptr, k, scale):
    """grad * scale / max(count_k, 1): d loss / d entry for every counted entry of set k."""
    g = tl.load(grad_ptr).to(tl.float32)
    count = tl.maximum(tl.load(counts_ptr + k), 1).to(tl.float32)
    return g * scale / count


@triton.jit
def _clean_backward_kernel(
    grad_ptr,                   # () upstream gradient of the loss
    x_ptr, stride_b, stride_d,  # (B, D) embeddings
    labels_ptr, stride_label,   # (B,) labels
    norm_ptr,                   # (B,) fp32 row norms
    counts_ptr,                 # (4,) int64 non-zero counts: clean +, clean -, mixed +, mixed -
    out_ptr,                    # (B, D) fp32 contiguous, zero-filled: d loss / d ê, added into atomically
    B, D, pos_margin, neg_margin, eps,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (I, s) owns the rows of block I and the column tiles s, s + S, s + 2S, ... (S programs
    # along axis 1 split the columns so that small batches still fill the GPU).
    rows_i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    mask_i = rows_i < B
    den_i = tl.maximum(tl.load(norm_ptr + rows_i, mask=mask_i, other=1.0), eps)
    coef_pos = _set_coefficients(grad_ptr, counts_ptr, 0, 1.0)
    coef_neg = _set_coefficients(grad_ptr, counts_ptr, 1, 1.0)
    for start_j in range(split * BLOCK_J, B, n_split * BLOCK_J):
        rows_j = start_j + tl.arange(0, BLOCK_J).to(tl.int64)
        mask_j = rows_j < B
        den_j = tl.maximum(tl.load(norm_ptr + rows_j, mask=mask_j, other=1.0), eps)
        dist = _tile_distance(x_ptr, stride_b, stride_d, rows_i, den_i, mask_i, rows_j, den_j, mask_j, D,
                              BLOCK_I, BLOCK_J, BLOCK_D)
        pos_loss, neg_loss = _tile_losses(labels_ptr, stride_label, rows_i, mask_i, rows_j, mask_j, dist,
                                          pos_margin, neg_margin)
        # c_ij = d loss / d d_ij; pair (i, j) and (j, i) both move ê_i, hence the 2. No gradient at d = 0.
        c = tl.where(pos_loss != 0.0, coef_pos, 0.0) - tl.where(neg_loss != 0.0, coef_neg, 0.0)
        q = tl.where((c != 0.0) & (dist != 0.0), 2.0 * c / tl.where(dist == 0.0, 1.0, dist), 0.0)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
            xi = _load_unit_rows(x_ptr, stride_b, stride_d, rows_i, den_i, mask_i, cols, D)
            xj = _load_unit_rows(x_ptr, stride_b, stride_d, rows_j, den_j, mask_j, cols, D)
            term = tl.where(q[:, :, None] != 0.0, q[:, :, None] * (xi[:, None, :] - xj[None, :, :]), 0.0)
            tl.atomic_add(out_ptr + rows_i[:, None] * D + cols[None, :], tl.sum(term, axis=1),
                          mask=mask_i[:, None] & (cols < D)[None, :])


@triton.jit
def _normalize_backward_kernel(
    x_ptr, stride_b, stride_d,  # (B, D) embeddings
    norm_ptr,                   # (B,) fp32 row norms
    out_ptr,                    # (B, D) fp32 contiguous: d loss / d ê in, d loss / d e out (in place)
    B, D, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """G -> (G - ê (ê·G)) / n, or G / eps for rows with n <= eps: the backward of ê = e / max(n, eps)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < B
    norm = tl.load(norm_ptr + rows, mask=row_mask, other=1.0)
    den = tl.maximum(norm, eps)
    out_rows = out_ptr + rows[:, None] * D
    proj = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        m = row_mask[:, None] & (cols < D)[None, :]
        xhat = _load_unit_rows(x_ptr, stride_b, stride_d, rows, den, row_mask, cols, D)
        proj += tl.sum(xhat * tl.load(out_rows + cols[None, :], mask=m, other=0.0), axis=1)
    proj = tl.where(norm > eps, proj, 0.0)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        m = row_mask[:, None] & (cols < D)[None, :]
        xhat = _load_unit_rows(x_ptr, stride_b, stride_d, rows, den, row_mask, cols, D)
        g = tl.load(out_rows + cols[None, :], mask=m, other=0.0)
        tl.store(out_rows + cols[None, :], (g - xhat * proj[:, None]) / den[:, None], mask=m)


@triton.jit
def _mixed_backward_kernel(
    grad_ptr,                   # () upstream gradient of the loss
    x_ptr, stride_b, stride_d,  # (B, D) embeddings
    anchors_ptr, stride_a, mix_a_ptr, stride_ma, mix_b_ptr, stride_mb,  # (M,) triples
    norm_ptr,                   # (B,) fp32 row norms
    counts_ptr,                 # (4,) int64 non-zero counts
    out_ptr,                    # (B, D) fp32 contiguous gradient buffer, added into atomically
    B, D, M, lam, mix_weight, pos_margin, neg_margin, eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = t < M
    a, i, j, ok = _load_triples(anchors_ptr, stride_a, mix_a_ptr, stride_ma, mix_b_ptr, stride_mb, t, t_mask, B)
    norm_a = tl.load(norm_ptr + a, mask=t_mask, other=1.0)
    den_a = tl.maximum(norm_a, eps)
    z_norm, den_z, dist, dot = _triple_geometry(x_ptr, stride_b, stride_d, a, den_a, i, j, t_mask, D, lam, eps,
                                                BLOCK_D)
    coef_pos = _set_coefficients(grad_ptr, counts_ptr, 2, mix_weight * lam)
    coef_neg = _set_coefficients(grad_ptr, counts_ptr, 3, mix_weight * (1.0 - lam))
    pos_loss = lam * _hinge(dist - pos_margin)
    neg_loss = (1.0 - lam) * _hinge(neg_margin - dist)
    c = tl.where(pos_loss != 0.0, coef_pos, 0.0) - tl.where(neg_loss != 0.0, coef_neg, 0.0)
    q = tl.where((c != 0.0) & (dist != 0.0), c / tl.where(dist == 0.0, 1.0, dist), 0.0)
    q = tl.where(ok, q, 0.0)
    # v = q (ê_a - ẑ) is d loss / d ê_a and -v is d loss / d ẑ. Their projections on ê_a and ẑ, for the
    # normalisations' backward, come from the dot products already at hand.
    a_sq = (norm_a / den_a) * (norm_a / den_a)  # |ê_a|², 1 unless n_a <= eps
    z_sq = (z_norm / den_z) * (z_norm / den_z)
    proj_a = tl.where(norm_a > eps, q * (a_sq - dot), 0.0)
    proj_z = tl.where(z_norm > eps, q * (dot - z_sq), 0.0)
    live = q != 0.0
    # The authors' triples come sorted by anchor, so a block usually shares one anchor (and one mix_a
    # row): then the block adds its summed row once instead of BLOCK_T times into the same addresses.
    one_a = tl.min(tl.where(live, a, B), axis=0) == tl.max(tl.where(live, a, -1), axis=0)
    one_i = tl.min(tl.where(live, i, B), axis=0) == tl.max(tl.where(live, i, -1), axis=0)
    row_a = tl.max(tl.where(live, a, -1), axis=0)
    row_i = tl.max(tl.where(live, i, -1), axis=0)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        col_mask = cols < D
        m = live[:, None] & col_mask[None, :]
        ea = _load_unit_rows(x_ptr, stride_b, stride_d, a, den_a, live, cols, D)
        zhat = tl.math.div_rn(_mixed_rows(x_ptr, stride_b, stride_d, i, j, live, cols, D, lam), den_z[:, None])
        v = q[:, None] * (ea - zhat)
        grad_a = tl.where(m, (v - ea * proj_a[:, None]) / den_a[:, None], 0.0)
        grad_z = tl.where(m, (zhat * proj_z[:, None] - v) / den_z[:, None], 0.0)
        if one_a:
            tl.atomic_add(out_ptr + row_a * D + cols, tl.sum(grad_a, axis=0), mask=col_mask)
        else:
            tl.atomic_add(out_ptr + a[:, None] * D + cols[None, :], grad_a, mask=m)
        if one_i:
            tl.atomic_add(out_ptr + row_i * D + cols, lam * tl.sum(grad_z, axis=0), mask=col_mask)
        else:
            tl.atomic_add(out_ptr + i[:, None] * D + cols[None, :], lam * grad_z, mask=m)
        tl.atomic_add(out_ptr + j[:, None] * D + cols[None, :], (1.0 - lam) * grad_z, mask=m)


def _cdiv(a, b):
    return max(1, triton.cdiv(a, b))


@torch.library.custom_op("twinops::metrix_loss", mutates_args=())
def _metrix_forward(
    embeddings: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, mix_a: torch.Tensor,
    mix_b: torch.Tensor, lam: float, mix_weight: float, pos_margin: float, neg_margin: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, d = embeddings.shape
    m = anchors.shape[0]
    cfg = _blocks()
    dev = embeddings.device
    norms = torch.empty(b, device=dev, dtype=torch.float32)
    grid_i, grid_j, grid_t = _cdiv(b, cfg["BLOCK_I"]), _cdiv(b, cfg["BLOCK_J"]), _cdiv(m, cfg["BLOCK_T"])
    clean_sums = torch.zeros((grid_i * grid_j, 2), device=dev, dtype=torch.float32)
    clean_counts = torch.zeros((grid_i * grid_j, 2), device=dev, dtype=torch.int32)
    mixed_sums = torch.zeros((grid_t, 2), device=dev, dtype=torch.float32)
    mixed_counts = torch.zeros((grid_t, 2), device=dev, dtype=torch.int32)
    x, sb, sd = embeddings, embeddings.stride(0), embeddings.stride(1)
    if b > 0:
        _row_norm_kernel[(_cdiv(b, cfg["BLOCK_R"]),)](x, sb, sd, norms, b, d, BLOCK_R=cfg["BLOCK_R"],
                                                      BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["warps"])
        _clean_forward_kernel[(grid_i, grid_j)](
            x, sb, sd, labels, labels.stride(0), norms, clean_sums, clean_counts, b, d, pos_margin, neg_margin,
            EPS, BLOCK_I=cfg["BLOCK_I"], BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["warps"],
        )
    if m > 0:
        _mixed_forward_kernel[(grid_t,)](
            x, sb, sd, anchors, anchors.stride(0), mix_a, mix_a.stride(0), mix_b, mix_b.stride(0), norms,
            mixed_sums, mixed_counts, b, d, m, lam, pos_margin, neg_margin, EPS,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_DT"], num_warps=cfg["warps"],
        )
    sums = torch.cat([clean_sums.sum(0), mixed_sums.sum(0)])
    counts = torch.cat([clean_counts.sum(0, dtype=torch.int64), mixed_counts.sum(0, dtype=torch.int64)])
    averages = sums / counts.clamp(min=1)
    loss = averages[0] + averages[1] + mix_weight * (averages[2] + averages[3])
    return loss, counts, norms


@_metrix_forward.register_fake
def _(embeddings, labels, anchors, mix_a, mix_b, lam, mix_weight, pos_margin, neg_margin):
    return (embeddings.new_empty((), dtype=torch.float32), embeddings.new_empty((4,), dtype=torch.int64),
            embeddings.new_empty((embeddings.shape[0],), dtype=torch.float32))


@torch.library.custom_op("twinops::metrix_loss_backward", mutates_args=())
def _metrix_backward(
    grad: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
    mix_a: torch.Tensor, mix_b: torch.Tensor, counts: torch.Tensor, norms: torch.Tensor, lam: float,
    mix_weight: float, pos_margin: float, neg_margin: float,
) -> torch.Tensor:
    b, d = embeddings.shape
    m = anchors.shape[0]
    cfg = _blocks()
    out = torch.zeros((b, d), device=embeddings.device, dtype=torch.float32)
    grad = grad.to(torch.float32).contiguous()
    x, sb, sd = embeddings, embeddings.stride(0), embeddings.stride(1)
    if b > 0:
        grid_i, tiles_j = _cdiv(b, cfg["BLOCK_I"]), _cdiv(b, cfg["BLOCK_J"])
        splits = min(tiles_j, max(1, -(-cfg["programs"](embeddings.device) // grid_i)))
        _clean_backward_kernel[(grid_i, splits)](
            grad, x, sb, sd, labels, labels.stride(0), norms, counts, out, b, d, pos_margin, neg_margin, EPS,
            BLOCK_I=cfg["BLOCK_I"], BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["warps"],
        )
        _normalize_backward_kernel[(_cdiv(b, cfg["BLOCK_R"]),)](
            x, sb, sd, norms, out, b, d, EPS, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["warps"],
        )
    if m > 0 and mix_weight != 0.0:
        _mixed_backward_kernel[(_cdiv(m, cfg["BLOCK_T"]),)](
            grad, x, sb, sd, anchors, anchors.stride(0), mix_a, mix_a.stride(0), mix_b, mix_b.stride(0), norms,
            counts, out, b, d, m, lam, mix_weight, pos_margin, neg_margin, EPS,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_DT"], num_warps=cfg["warps"],
        )
    return out if embeddings.dtype == torch.float32 else out.to(embeddings.dtype)


@_metrix_backward.register_fake
def _(grad, embeddings, labels, anchors, mix_a, mix_b, counts, norms, lam, mix_weight, pos_margin, neg_margin):
    return embeddings.new_empty(embeddings.shape)


def _setup_context(ctx, inputs, output):
    embeddings, labels, anchors, mix_a, mix_b, lam, mix_weight, pos_margin, neg_margin = inputs
    ctx.save_for_backward(embeddings, labels, anchors, mix_a, mix_b, output[1], output[2])
    ctx.hyper = (lam, mix_weight, pos_margin, neg_margin)


def _backward(ctx, grad_loss, grad_counts, grad_norms):
    embeddings, labels, anchors, mix_a, mix_b, counts, norms = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _metrix_backward(grad_loss, embeddings, labels, anchors, mix_a, mix_b, counts, norms, *ctx.hyper)
    return grad, None, None, None, None, None, None, None, None


_metrix_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(embeddings, labels, anchors, mix_a, mix_b):
    rt.check_float_tensor(embeddings, "embeddings", 2, "(B, D)")
    if embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must have at least one column (D >= 1), got shape {tuple(embeddings.shape)}")
    rt.check_int_tensor(labels, "labels", (embeddings.shape[0],))
    rt.check_tensor(anchors, "anchors")
    if anchors.ndim != 1:
        raise ValueError(f"anchors must have shape (M,), got {anchors.ndim} dimensions {tuple(anchors.shape)}")
    for name, t in (("anchors", anchors), ("mix_a", mix_a), ("mix_b", mix_b)):
        rt.check_int_tensor(t, name, tuple(anchors.shape), "row indices")
    rt.check_device(("embeddings", embeddings), ("labels", labels), ("anchors", anchors), ("mix_a", mix_a),
                    ("mix_b", mix_b))


def metrix_loss(embeddings, labels, anchors, mix_a, mix_b, *, lam, mix_weight=0.4, pos_margin=0.0,
                neg_margin=0.5):
    """Metrix loss of P22 on the GPU: contrastive loss on all clean pairs plus ``mix_weight`` times
    the contrastive loss of each anchor against ``lam * e[mix_a] + (1 - lam) * e[mix_b]``.

    Same arguments and semantics as `twinops.reference.metric.metrix_loss`; returns a scalar in the
    embeddings' dtype. An index outside [0, B) gives a NaN loss instead of an error, since checking
    it would synchronise the device. Build the authors' triples with `metrix_triples`.
    """
    _check_inputs(embeddings, labels, anchors, mix_a, mix_b)
    lam = check_real(lam, "lam", low=0.0, high=1.0)
    mix_weight = check_real(mix_weight, "mix_weight", low=0.0)
    pos_margin = check_real(pos_margin, "pos_margin", low=0.0)
    neg_margin = check_real(neg_margin, "neg_margin", low=0.0)
    loss, _, _ = _metrix_forward(embeddings, labels, anchors, mix_a, mix_b, lam, mix_weight, pos_margin, neg_margin)
    return loss.to(embeddings.dtype)


def metrix_triples(labels, *, mode="pos_neg"):
    """The authors' triples ``(anchors, mix_a, mix_b)`` (int64, on the labels' device) for ``labels`` and
    ``mode`` (``"pos_neg"`` or ``"anc_neg"``); same index rule as
    `twinops.reference.metric.metrix_loss.metrix_triples`. Its output size depends on the labels'
    values, so it synchronises the device and is not traced by ``torch.compile`` (the loss is)."""
    rt.check_tensor(labels, "labels")
    if labels.dtype not in rt.INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor of labels, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (B,), got {labels.ndim} dimensions {tuple(labels.shape)}")
    check_choice(mode, "mode", MODES)
    b = labels.shape[0]
    if b == 0:
        empty = labels.new_zeros(0, dtype=torch.int64)
        return empty, empty.clone(), empty.clone()
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(b, dtype=torch.bool, device=labels.device)
    n_pos = positive.sum(1)
    neg_anchor, neg_row = (~same).nonzero(as_tuple=True)  # every (a, n) pair in index order
    if mode == "anc_neg":
        keep = n_pos[neg_anchor] == 0
        return neg_anchor[keep], neg_anchor[keep], neg_row[keep]
    n_neg = (~same).sum(1)
    neg_start = torch.cumsum(n_neg, 0) - n_neg  # where each anchor's negatives begin in neg_row
    first_pos = positive.to(torch.int8).argmax(1)  # first positive of each anchor (argmax takes the first max)
    pair_anchor = positive.nonzero(as_tuple=True)[0]  # the anchor of every positive pair, in index order
    sizes = n_neg[pair_anchor]
    group = torch.repeat_interleave(torch.arange(len(pair_anchor), device=labels.device), sizes)
    offset = torch.arange(int(sizes.sum()), device=labels.device) - (torch.cumsum(sizes, 0) - sizes)[group]
    anchors = pair_anchor[group]
    return anchors, first_pos[anchors], neg_row[neg_start[anchors] + offset]


class MetrixLoss(torch.nn.Module):
    """``nn.Module`` form of `metrix_loss` that builds the authors' triples from the labels and the
    mode of the iteration: ``forward(embeddings, labels, *, lam, mode)``, with the authors' weights
    (0.4 for ``"pos_neg"``, 0.3 for ``"anc_neg"`` in the embedding variant). The caller draws
    ``lam`` (the authors use Beta(2, 2)) and ``mode`` (uniformly) each iteration."""

    def __init__(self, *, pos_margin=0.0, neg_margin=0.5, pos_neg_weight=0.4, anc_neg_weight=0.3):
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.weights = {"pos_neg": pos_neg_weight, "anc_neg": anc_neg_weight}

    def forward(self, embeddings, labels, *, lam, mode="pos_neg"):
        anchors, mix_a, mix_b = metrix_triples(labels, mode=mode)
        return metrix_loss(embeddings, labels, anchors, mix_a, mix_b, lam=lam, mix_weight=self.weights[mode],
                           pos_margin=self.pos_margin, neg_margin=self.neg_margin)
