"""Proto-Triplet and ICNN losses (P25) as Triton kernels. See
`twinops.reference.metric.proto_triplet` for the definitions.

Few-shot episodes are small (a 5-way 15-query episode has 75 queries, 5 prototypes, 25 support
points): at these sizes every implementation, eager or fused, is bound by kernel launches, and
what the kernels save is the launches and the (N, W, D) / (n, M, D) difference tensors of the eager
form. Distances are computed from the differences, sum_k (u_k - v_k)^2, not from ||u||^2 + ||v||^2
- 2 u.v: the self-distance of the ICNN loss is sqrt(1e-6) and near neighbours matter, where the dot
form cancels catastrophically in fp32.

Every kernel takes ROWS rows (queries, prototypes, origin or target points) per program: one on
the GPU, 16 under the Triton interpreter, whose cost is per operation (the arrays gain a leading
row axis; the maths is the same).

Proto-Triplet, one program per query i (forward) and per prototype c (backward):

    forward:   d+_i = d(q_i, p_{y_i}),  (d-_i, n_i) = lexicographic min over c != y_i of (d(q_i, p_c), c),
               loss_i = max(0, d+_i - d-_i + margin)
    backward:  dq_i = g_i [loss_i > 0] ((q_i - p_{y_i}) / d+_i - (q_i - p_{n_i}) / d-_i)
               dp_c = sum_i h_ic (q_i - p_c),  h_ic = g_i [loss_i > 0] ([n_i = c] / d-_i - [y_i = c] / d+_i)

The prototype gradient is a gather over queries (each program scans the N queries), so no atomics
and a deterministic result. Extra memory: 3 numbers per query.

ICNN, four small kernels:

1. one program per origin row: distances to all M targets in tiles, the ipc + 1 nearest kept
   sorted in registers (each tile is merged into the set by ranks in the order (distance, index):
   two small comparison matrices, no serial loop), the first dropped; then the row's part of the score
   (nearest other-class distance c_i, the normalised same-class mean mu_i, counts, the row's
   different-class sum and max). Writes the sorted neighbour list (n x (ipc + 1)) and 8 + 3 numbers.
2. one program: the global max G, the counts and the score (a reduction over n rows).
3. backward, one program per origin row: d loss / d delta_ij for the row's neighbours (the min,
   the max(1, .) and the global max route to the first position in (row, rank) order), the origin
   gradient, and h_ij = (d loss / d delta_ij) / delta_ij for step 4.
4. backward, one program per target row l: d t_l = -sum_{(i, j): nbr(i, j) = l} h_ij (o_i - t_l),
   gathered from the neighbour lists (no atomics).

Extra memory O(n (ipc + 1)) (ipc is a handful of neighbours).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference._checks import check_int, check_real
from .. import _runtime as rt

__all__ = ["proto_triplet_loss", "ProtoTripletLoss", "icnn_loss", "ICNNLoss"]

HAS_TRITON_BACKWARD = True

DIST_EPS = 1e-6
SCORE_EPS = 1e-7


def _block(n: int, gpu_cap: int = 64, interpreter_cap: int = 16) -> int:
    """Tile width: 16 under the interpreter (small test shapes cross tiles), up to ``gpu_cap`` on the GPU."""
    cap = interpreter_cap if rt.interpreting() else gpu_cap
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


@triton.jit
def _sq_distances(a_ptr, stride_a_col, b_ptr, stride_b_row, stride_b_col, b_rows, b_ok, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_k (a_k - b_rk)^2 in fp32 for one row a and the rows ``b_rows`` of b, a (BLOCK_R,) vector."""
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        col_ok = cols < D
        a = tl.load(a_ptr + cols * stride_a_col, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b_row + cols[None, :] * stride_b_col,
                    mask=b_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        diff = a[None, :] - b
        acc += tl.sum(diff * diff, axis=1)
    return acc


# ================================================================================ Proto-Triplet


@triton.jit
def _proto_forward_kernel(
    q_ptr, stride_qn, stride_qd,         # (N, D) queries; element (i, k) at i*stride_qn + k*stride_qd
    y_ptr, stride_y,                     # (N,) integer labels in [0, W)
    p_ptr, stride_pw, stride_pd,         # (W, D) prototypes, row c = class c
    loss_ptr,                            # out (N,) fp32: max(0, d+ - d- + margin); NaN if label or distances invalid
    stats_ptr,                           # out (N, 2) fp32 contiguous: d+_i, d-_i
    neg_ptr,                             # out (N,) int32: n_i, the nearest other prototype (W if none)
    N, W, D, margin,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ROWS queries per program (1 on the GPU, a block under the interpreter); arrays are [query, ...].
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < N
    y = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=0).to(tl.int64)
    label_ok = (y >= 0) & (y < W)
    d_pos = tl.zeros((ROWS,), tl.float32)
    best = tl.full((ROWS,), float("inf"), tl.float32)
    best_idx = tl.zeros((ROWS,), tl.int64) + W
    bad = tl.zeros((ROWS,), tl.int32)
    for start in range(0, W, BLOCK_W):
        w_idx = start + tl.arange(0, BLOCK_W).to(tl.int64)
        w_ok = w_idx < W
        sq = tl.zeros((ROWS, BLOCK_W), tl.float32)
        for start_d in range(0, D, BLOCK_D):
            cols = start_d + tl.arange(0, BLOCK_D).to(tl.int64)
            col_ok = cols < D
            q = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :] * stride_qd,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            p = tl.load(p_ptr + w_idx[:, None] * stride_pw + cols[None, :] * stride_pd,
                        mask=w_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            diff = q[:, None, :] - p[None, :, :]
            sq += tl.sum(diff * diff, axis=2)
        dist = tl.sqrt(sq + 1e-6)
        bad += tl.sum((w_ok[None, :] & ~(dist < float("inf"))).to(tl.int32), axis=1)  # NaN or inf
        own = w_idx[None, :] == y[:, None]
        d_pos += tl.sum(tl.where(own, dist, 0.0), axis=1)
        cand = tl.where(w_ok[None, :] & ~own, dist, float("inf"))
        tile_min = tl.min(cand, axis=1)
        tile_arg = tl.min(tl.where(cand == tile_min[:, None], w_idx[None, :], W), axis=1)
        take = tile_min < best  # an earlier tile keeps ties (lower index)
        best_idx = tl.where(take, tile_arg, best_idx)
        best = tl.where(take, tile_min, best)
    hinge = d_pos - best + margin
    loss = tl.where(hinge > 0, hinge, 0.0)
    loss = tl.where((bad > 0) | ~label_ok, float("nan"), loss)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(stats_ptr + rows * 2, d_pos, mask=row_ok)
    tl.store(stats_ptr + rows * 2 + 1, best, mask=row_ok)
    tl.store(neg_ptr + rows, best_idx.to(tl.int32), mask=row_ok)


@triton.jit
def _proto_backward_queries_kernel(
    grad_ptr, stride_g,                  # (N,) upstream gradient of the per-query losses (stride 0 if broadcast)
    q_ptr, stride_qn, stride_qd,
    y_ptr, stride_y,
    p_ptr, stride_pw, stride_pd,
    loss_ptr, stats_ptr, neg_ptr,        # saved by the forward
    grad_q_ptr, stride_gqn, stride_gqd,  # out (N, D) in the queries' dtype
    N, D,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < N
    loss = tl.load(loss_ptr + rows, mask=row_ok, other=0.0)
    active = loss > 0  # False at NaN
    y = tl.load(y_ptr + rows * stride_y, mask=active, other=0).to(tl.int64)
    n = tl.load(neg_ptr + rows, mask=active, other=0).to(tl.int64)
    g = tl.load(grad_ptr + rows * stride_g, mask=row_ok, other=0.0).to(tl.float32)
    coef_pos = tl.where(active, g / tl.load(stats_ptr + rows * 2, mask=active, other=1.0), 0.0)[:, None]
    coef_neg = tl.where(active, g / tl.load(stats_ptr + rows * 2 + 1, mask=active, other=1.0), 0.0)[:, None]
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        ok = row_ok[:, None] & (cols < D)[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :] * stride_qd, mask=ok, other=0.0).to(tl.float32)
        p_y = tl.load(p_ptr + y[:, None] * stride_pw + cols[None, :] * stride_pd, mask=ok, other=0.0).to(tl.float32)
        p_n = tl.load(p_ptr + n[:, None] * stride_pw + cols[None, :] * stride_pd, mask=ok, other=0.0).to(tl.float32)
        out = coef_pos * (q - p_y) - coef_neg * (q - p_n)
        out = tl.where((loss != loss)[:, None], float("nan"), out)
        tl.store(grad_q_ptr + rows[:, None] * stride_gqn + cols[None, :] * stride_gqd,
                 out.to(grad_q_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _proto_backward_prototypes_kernel(
    grad_ptr, stride_g,
    q_ptr, stride_qn, stride_qd,
    y_ptr, stride_y,
    p_ptr, stride_pw, stride_pd,
    loss_ptr, stats_ptr, neg_ptr,
    grad_p_ptr, stride_gpw, stride_gpd,  # out (W, D) in the prototypes' dtype
    N, W, D,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ROWS prototypes c per program; [c, i, ...] arrays.
    cs = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    c_ok = cs < W
    for start_d in range(0, D, BLOCK_D):
        cols = start_d + tl.arange(0, BLOCK_D).to(tl.int64)
        col_ok = cols < D
        ok = c_ok[:, None] & col_ok[None, :]
        p = tl.load(p_ptr + cs[:, None] * stride_pw + cols[None, :] * stride_pd, mask=ok, other=0.0).to(tl.float32)
        acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            rows = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = rows < N
            loss = tl.load(loss_ptr + rows, mask=row_ok, other=0.0)
            active = row_ok & (loss > 0)
            y = tl.load(y_ptr + rows * stride_y, mask=active, other=0).to(tl.int64)
            n = tl.load(neg_ptr + rows, mask=active, other=0).to(tl.int64)
            g = tl.load(grad_ptr + rows * stride_g, mask=active, other=0.0).to(tl.float32)
            w_neg = tl.where(active, g / tl.load(stats_ptr + rows * 2 + 1, mask=active, other=1.0), 0.0)
            w_pos = tl.where(active, g / tl.load(stats_ptr + rows * 2, mask=active, other=1.0), 0.0)
            # h_ci = g_i [loss_i > 0] ([n_i = c] / d-_i - [y_i = c] / d+_i)
            h = (tl.where(n[None, :] == cs[:, None], w_neg[None, :], 0.0)
                 - tl.where(y[None, :] == cs[:, None], w_pos[None, :], 0.0))
            q = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :] * stride_qd,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(h[:, :, None] * (q[None, :, :] - p[:, None, :]), axis=1)  # sum_i h_ci (q_i - p_c)
        out = acc
        tl.store(grad_p_ptr + cs[:, None] * stride_gpw + cols[None, :] * stride_gpd,
                 out.to(grad_p_ptr.dtype.element_ty), mask=ok)


def _rows_per_program() -> int:
    """Rows (queries, prototypes, origin or target points) per program: one on the GPU, a block
    under the interpreter, where every operation has a fixed cost."""
    return 16 if rt.interpreting() else 1


@torch.library.custom_op("twinops::proto_triplet_loss_rows", mutates_args=())
def _proto_rows(
    queries: torch.Tensor, query_labels: torch.Tensor, prototypes: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d = queries.shape
    w = prototypes.shape[0]
    loss = torch.empty(n, device=queries.device, dtype=torch.float32)
    stats = torch.empty((n, 2), device=queries.device, dtype=torch.float32)
    neg = torch.empty(n, device=queries.device, dtype=torch.int32)
    if n > 0:
        rows = _rows_per_program()
        _proto_forward_kernel[(triton.cdiv(n, rows),)](
            queries, queries.stride(0), queries.stride(1), query_labels, query_labels.stride(0),
            prototypes, prototypes.stride(0), prototypes.stride(1), loss, stats, neg, n, w, d, margin,
            ROWS=rows, BLOCK_W=_block(w), BLOCK_D=_block(d, 64, 32),
        )
    return loss, stats, neg


@_proto_rows.register_fake
def _(queries, query_labels, prototypes, margin):
    n = queries.shape[0]
    return (queries.new_empty(n, dtype=torch.float32), queries.new_empty((n, 2), dtype=torch.float32),
            queries.new_empty(n, dtype=torch.int32))


@torch.library.custom_op("twinops::proto_triplet_loss_rows_backward", mutates_args=())
def _proto_rows_backward(
    grad: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor, prototypes: torch.Tensor,
    loss: torch.Tensor, stats: torch.Tensor, neg: torch.Tensor, need_queries: bool, need_prototypes: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = queries.shape
    w = prototypes.shape[0]
    grad_q = torch.empty((n, d) if need_queries else (0, d), device=queries.device, dtype=queries.dtype)
    grad_p = torch.empty((w, d) if need_prototypes else (0, d), device=queries.device, dtype=prototypes.dtype)
    args = (queries, queries.stride(0), queries.stride(1), query_labels, query_labels.stride(0),
            prototypes, prototypes.stride(0), prototypes.stride(1), loss, stats, neg)
    rows = _rows_per_program()
    if need_queries and n > 0:
        _proto_backward_queries_kernel[(triton.cdiv(n, rows),)](
            grad, grad.stride(0), *args, grad_q, grad_q.stride(0), grad_q.stride(1), n, d,
            ROWS=rows, BLOCK_D=_block(d, 128, 32),
        )
    if need_prototypes and w > 0:
        _proto_backward_prototypes_kernel[(triton.cdiv(w, rows),)](
            grad, grad.stride(0), *args, grad_p, grad_p.stride(0), grad_p.stride(1), n, w, d,
            ROWS=rows, BLOCK_N=_block(n), BLOCK_D=_block(d, 64, 32),
        )
    return grad_q, grad_p


@_proto_rows_backward.register_fake
def _(grad, queries, query_labels, prototypes, loss, stats, neg, need_queries, need_prototypes):
    d = queries.shape[1]
    return (queries.new_empty((queries.shape[0] if need_queries else 0, d)),
            prototypes.new_empty((prototypes.shape[0] if need_prototypes else 0, d)))


def _proto_setup_context(ctx, inputs, output):
    queries, query_labels, prototypes, margin = inputs
    loss, stats, neg = output
    ctx.save_for_backward(queries, query_labels, prototypes, loss, stats, neg)


def _proto_backward(ctx, grad_loss, grad_stats, grad_neg):
    queries, query_labels, prototypes, loss, stats, neg = ctx.saved_tensors
    need_q, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_q or need_p):
        return None, None, None, None
    grad_q, grad_p = _proto_rows_backward(grad_loss, queries, query_labels, prototypes, loss, stats, neg,
                                          need_q, need_p)
    return (grad_q if need_q else None), None, (grad_p if need_p else None), None


_proto_rows.register_autograd(_proto_backward, setup_context=_proto_setup_context)


def proto_triplet_loss(queries, query_labels, prototypes, *, margin=0.5, reduction="mean"):
    """Proto-Triplet loss of P25 on the GPU.

    Same arguments and semantics as `twinops.reference.metric.proto_triplet.proto_triplet_loss`;
    returns the queries' dtype. Labels outside [0, W) give NaN for their query (and so for a mean or
    sum) instead of an error, since checking them would synchronise the device.
    """
    rt.check_float_tensor(queries, "queries", 2, "(N, D)")
    rt.check_float_tensor(prototypes, "prototypes", 2, "(W, D)")
    if prototypes.shape[1] != queries.shape[1]:
        raise ValueError(f"prototypes must have D = {queries.shape[1]} columns like queries, got {prototypes.shape[1]}")
    if prototypes.shape[0] < 1:
        raise ValueError("prototypes must have at least one row (one per class)")
    rt.check_int_tensor(query_labels, "query_labels", (queries.shape[0],))
    margin = check_real(margin, "margin")
    rt.check_reduction(reduction)
    rt.check_device(("queries", queries), ("query_labels", query_labels), ("prototypes", prototypes))
    loss, _, _ = _proto_rows(queries, query_labels, prototypes, margin)
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.mean()
    return out.to(queries.dtype)


class ProtoTripletLoss(torch.nn.Module):
    """``nn.Module`` form of `proto_triplet_loss`: ``forward(queries, query_labels, prototypes)``."""

    def __init__(self, *, margin=0.5, reduction="mean"):
        super().__init__()
        self.margin, self.reduction = margin, reduction

    def forward(self, queries, query_labels, prototypes):
        return proto_triplet_loss(queries, query_labels, prototypes, margin=self.margin, reduction=self.reduction)


# ========================================================================================= ICNN

# Per-row statistics written by the row kernel (fp32, ROW_STATS per row) and their columns.
ROW_STATS = 8
C_NEAR, R_MAX, CNT, DCNT, MU, DSUM, DMAX, BAD = range(ROW_STATS)
# Per-row positions (int32, 3 per row): ranks of the arg-min of c_i, the arg-max of u and of dd.
C_RANK, R_RANK, D_RANK = range(3)
# Scalars written by the combine kernel (fp32).
SCALARS = 8
SCORE, BIG, BIG_LAM, N_SC, N_DC, LAM_SIGN, BIG_ROW, LOSS = range(SCALARS)


@triton.jit
def _icnn_rows_kernel(
    o_ptr, stride_on, stride_od,         # (n, D) origin points
    yo_ptr, stride_yo,                   # (n,) origin labels
    t_ptr, stride_tm, stride_td,         # (M, D) target points
    yt_ptr, stride_yt,                   # (M,) target labels
    nbr_ptr,                             # out (n, K) int32 contiguous: neighbour indices by rank (rank 0 = dropped)
    ndist_ptr,                           # out (n, K) fp32 contiguous: their distances
    stats_ptr,                           # out (n, ROW_STATS) fp32 contiguous
    pos_ptr,                             # out (n, 3) int32 contiguous
    n, M, D, K, k,                       # K = ipc + 1 neighbours kept, the first k after the dropped one scored
    ROWS: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ROWS origin rows per program (1 on the GPU; a block under the interpreter, where every
    # operation has a fixed cost). Arrays are [row, ...].
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < n
    y_i = tl.load(yo_ptr + rows * stride_yo, mask=row_ok, other=0).to(tl.int64)
    slot = tl.arange(0, KP)
    slot_ok = slot < K
    # The K nearest so far, sorted: slot s holds the s-th in the order (distance, index). Empty slots
    # hold (+inf, M + s), distinct and after every target.
    best_d = tl.full((ROWS, KP), float("inf"), tl.float32)
    best_i = tl.zeros((ROWS, KP), tl.int64) + (M + slot.to(tl.int64))[None, :]
    bad = tl.zeros((ROWS,), tl.int32)
    for start in range(0, M, BLOCK_M):
        t_idx = start + tl.arange(0, BLOCK_M).to(tl.int64)
        t_ok = t_idx < M
        sq = tl.zeros((ROWS, BLOCK_M), tl.float32)
        for start_d in range(0, D, BLOCK_D):
            cols = start_d + tl.arange(0, BLOCK_D).to(tl.int64)
            col_ok = cols < D
            a = tl.load(o_ptr + rows[:, None] * stride_on + cols[None, :] * stride_od,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            b = tl.load(t_ptr + t_idx[:, None] * stride_tm + cols[None, :] * stride_td,
                        mask=t_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            diff = a[:, None, :] - b[None, :, :]
            sq += tl.sum(diff * diff, axis=2)
        dist = tl.where(t_ok[None, :], tl.sqrt(sq + 1e-6), float("inf"))
        bad += tl.sum((t_ok[None, :] & ~(dist < float("inf"))).to(tl.int32), axis=1)  # NaN or inf
        # Merge the tile into the sorted set by ranks: an element's new position is the number of
        # elements (of the set and the tile) before it. [r, c, c2]: candidate c2 before candidate c.
        tile_before = ((dist[:, None, :] < dist[:, :, None])
                       | ((dist[:, None, :] == dist[:, :, None]) & (t_idx[None, None, :] < t_idx[None, :, None])))
        # [r, c, s]: set element s before candidate c (the order is total: otherwise c is before s).
        set_before = ((best_d[:, None, :] < dist[:, :, None])
                      | ((best_d[:, None, :] == dist[:, :, None]) & (best_i[:, None, :] < t_idx[None, :, None])))
        set_before = set_before & slot_ok[None, None, :]
        rank_c = (tl.sum((tile_before & t_ok[None, None, :]).to(tl.int32), axis=2)
                  + tl.sum(set_before.to(tl.int32), axis=2))
        rank_s = slot[None, :] + tl.sum((~set_before & t_ok[None, :, None] & slot_ok[None, None, :]).to(tl.int32),
                                        axis=1)
        from_set = (rank_s[:, None, :] == slot[None, :, None]) & slot_ok[None, None, :]  # [r, p, s]
        from_tile = (rank_c[:, None, :] == slot[None, :, None]) & t_ok[None, None, :]   # [r, p, c]
        new_d = (tl.sum(tl.where(from_set, best_d[:, None, :], 0.0), axis=2)
                 + tl.sum(tl.where(from_tile, dist[:, None, :], 0.0), axis=2))
        new_i = (tl.sum(tl.where(from_set, best_i[:, None, :], 0), axis=2)
                 + tl.sum(tl.where(from_tile, t_idx[None, None, :], 0), axis=2))
        best_d = tl.where(slot_ok[None, :], new_d, float("inf"))
        best_i = tl.where(slot_ok[None, :], new_i, M + slot[None, :])
    # Only NaN distances (a NaN loss) can leave a slot without a target; keep its index in range.
    best_i = tl.where((best_i >= 0) & (best_i < M), best_i, 0)
    out_ok = row_ok[:, None] & slot_ok[None, :]
    tl.store(nbr_ptr + rows[:, None] * K + slot[None, :], best_i.to(tl.int32), mask=out_ok)
    tl.store(ndist_ptr + rows[:, None] * K + slot[None, :], best_d, mask=out_ok)

    in_ipc = (slot_ok & (slot >= 1))[None, :]
    in_k = (slot_ok & (slot >= 1) & (slot <= k))[None, :]
    y_n = tl.load(yt_ptr + best_i * stride_yt, mask=out_ok, other=0).to(tl.int64)
    other = y_n != y_i[:, None]
    # c_i: nearest other-class neighbour among the ipc; +inf if none.
    c_cand = tl.where(in_ipc & other, best_d, float("inf"))
    c = tl.min(c_cand, axis=1)
    c_rank = tl.min(tl.where(in_ipc & other & (c_cand == c[:, None]), slot[None, :], KP), axis=1)
    u = tl.where(in_k, best_d / (c[:, None] + 1e-7), 0.0)
    u_max = tl.max(u, axis=1)
    r_rank = tl.min(tl.where(in_k & (u == u_max[:, None]), slot[None, :], KP), axis=1)
    r = tl.maximum(u_max, 1.0)
    same_k = in_k & ~other
    other_k = in_k & other
    cnt = tl.sum(same_k.to(tl.float32), axis=1)
    dcnt = tl.sum(other_k.to(tl.float32), axis=1)
    mu = tl.sum(tl.where(same_k, u / r[:, None], 0.0), axis=1) / (cnt + 1e-7)
    dd = tl.where(other_k, best_d, 0.0)
    d_max = tl.max(dd, axis=1)
    d_rank = tl.min(tl.where(other_k & (dd == d_max[:, None]), slot[None, :], KP), axis=1)
    d_sum = tl.sum(dd, axis=1) / (dcnt + 1e-7)

    row = stats_ptr + rows * 8
    tl.store(row + 0, c, mask=row_ok)
    tl.store(row + 1, r, mask=row_ok)
    tl.store(row + 2, cnt, mask=row_ok)
    tl.store(row + 3, dcnt, mask=row_ok)
    tl.store(row + 4, mu, mask=row_ok)
    tl.store(row + 5, d_sum, mask=row_ok)
    tl.store(row + 6, d_max, mask=row_ok)
    tl.store(row + 7, bad.to(tl.float32), mask=row_ok)
    tl.store(pos_ptr + rows * 3 + 0, c_rank, mask=row_ok)
    tl.store(pos_ptr + rows * 3 + 1, r_rank, mask=row_ok)
    tl.store(pos_ptr + rows * 3 + 2, d_rank, mask=row_ok)


@triton.jit
def _icnn_combine_kernel(
    stats_ptr,                           # (n, ROW_STATS) fp32 from the row kernel
    scalars_ptr,                         # out (SCALARS,) fp32
    n, k, clamped,
    BLOCK_N: tl.constexpr,
):
    mu_sum = 0.0
    d_sum = 0.0
    cnt_sum = 0.0
    n_sc = 0.0
    n_dc = 0.0
    bad = 0.0
    big = tl.full((), -1.0, tl.float32)
    big_row = tl.zeros((), tl.int64)
    for start in range(0, n, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N).to(tl.int64)
        ok = rows < n
        row = stats_ptr + rows * 8
        cnt = tl.load(row + 2, mask=ok, other=0.0)
        dcnt = tl.load(row + 3, mask=ok, other=0.0)
        mu_sum += tl.sum(tl.load(row + 4, mask=ok, other=0.0), axis=0)
        d_sum += tl.sum(tl.load(row + 5, mask=ok, other=0.0), axis=0)
        cnt_sum += tl.sum(cnt, axis=0)
        n_sc += tl.sum((cnt > 0).to(tl.float32), axis=0)
        n_dc += tl.sum((dcnt > 0).to(tl.float32), axis=0)
        bad += tl.sum(tl.load(row + 7, mask=ok, other=0.0), axis=0)
        d_max = tl.load(row + 6, mask=ok, other=-1.0)
        tile_max = tl.max(d_max, axis=0)
        tile_row = tl.min(tl.where(d_max == tile_max, rows, n), axis=0)
        take = tile_max > big  # the first row keeps ties
        big_row = tl.where(take, tile_row, big_row)
        big = tl.where(take, tile_max, big)
    lam_sc = 1.0 - mu_sum / (n_sc + 1e-7)
    big_lam = d_sum / (big + 1e-7) / (n_dc + 1e-7)
    shifted = big_lam + tl.where(n_dc > 0, 0.0, -1.0)
    lam_dc = tl.abs(shifted)
    gamma = tl.where(clamped != 0, 1.0, cnt_sum / k / n)
    score = ((lam_sc + lam_dc) / 2 + gamma) / 2
    loss = tl.where(bad > 0, float("nan"), -tl.log(score))
    tl.store(scalars_ptr + 0, score)
    tl.store(scalars_ptr + 1, big)
    tl.store(scalars_ptr + 2, big_lam)
    tl.store(scalars_ptr + 3, n_sc)
    tl.store(scalars_ptr + 4, n_dc)
    tl.store(scalars_ptr + 5, tl.where(shifted > 0, 1.0, tl.where(shifted < 0, -1.0, 0.0)))
    tl.store(scalars_ptr + 6, big_row.to(tl.float32))
    tl.store(scalars_ptr + 7, loss)


@triton.jit
def _icnn_backward_rows_kernel(
    grad_ptr,                            # () upstream gradient of the loss
    o_ptr, stride_on, stride_od,
    yo_ptr, stride_yo,
    t_ptr, stride_tm, stride_td,
    yt_ptr, stride_yt,
    nbr_ptr, ndist_ptr, stats_ptr, pos_ptr, scalars_ptr,  # saved by the forward
    h_ptr,                               # out (n, K) fp32 contiguous: (d loss / d delta_ij) / delta_ij
    grad_o_ptr, stride_gon, stride_god,  # out (n, D) in the origin's dtype
    n, D, K, k,
    WRITE_ORIGIN: tl.constexpr, ROWS: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < n
    col = tl.arange(0, KP)
    ok = row_ok[:, None] & (col < K)[None, :]
    idx = tl.load(nbr_ptr + rows[:, None] * K + col[None, :], mask=ok, other=0).to(tl.int64)
    delta = tl.load(ndist_ptr + rows[:, None] * K + col[None, :], mask=ok, other=1.0)
    y_i = tl.load(yo_ptr + rows * stride_yo, mask=row_ok, other=0).to(tl.int64)
    other = tl.load(yt_ptr + idx * stride_yt, mask=ok, other=0).to(tl.int64) != y_i[:, None]
    in_ipc = ok & (col >= 1)[None, :]
    in_k = in_ipc & (col <= k)[None, :]
    row = stats_ptr + rows * 8
    c = tl.load(row + 0, mask=row_ok, other=1.0)[:, None]
    r = tl.load(row + 1, mask=row_ok, other=1.0)[:, None]
    cnt = tl.load(row + 2, mask=row_ok, other=0.0)[:, None]
    dcnt = tl.load(row + 3, mask=row_ok, other=0.0)[:, None]
    mu = tl.load(row + 4, mask=row_ok, other=0.0)[:, None]
    c_rank = tl.load(pos_ptr + rows * 3 + 0, mask=row_ok, other=-1)[:, None]
    r_rank = tl.load(pos_ptr + rows * 3 + 1, mask=row_ok, other=-1)[:, None]
    d_rank = tl.load(pos_ptr + rows * 3 + 2, mask=row_ok, other=-1)[:, None]
    score = tl.load(scalars_ptr + 0)
    big = tl.load(scalars_ptr + 1)
    big_lam = tl.load(scalars_ptr + 2)
    n_sc = tl.load(scalars_ptr + 3)
    n_dc = tl.load(scalars_ptr + 4)
    lam_sign = tl.load(scalars_ptr + 5)
    big_row = tl.load(scalars_ptr + 6).to(tl.int64)
    loss = tl.load(scalars_ptr + 7)

    a = tl.load(grad_ptr).to(tl.float32) * (-1.0 / score) * 0.25  # d loss / d lambda_sc = d loss / d lambda_dc
    # Same-class part: lambda_sc = 1 - sum_i mu_i / (n_sc + eps), mu_i = sum_j w_ij u_ij / r_i.
    g_u = tl.where(in_k & ~other, 1.0 / ((cnt + 1e-7) * r), 0.0)
    g_u -= tl.where((col[None, :] == r_rank) & (r > 1.0), mu / r, 0.0)  # r_i = max_j u_ij when that exceeds 1
    g_u *= a * -1.0 / (n_sc + 1e-7)
    has_c = c < float("inf")
    scale = tl.where(has_c, 1.0 / (c + 1e-7), 0.0)
    u = delta * scale
    g_delta = tl.where(in_k, g_u * scale, 0.0)
    g_c = -tl.sum(tl.where(in_k, g_u * u, 0.0), axis=1)[:, None] * scale  # through u_ij = delta_ij / (c_i + eps)
    g_delta += tl.where(has_c & (col[None, :] == c_rank), g_c, 0.0)
    # Different-class part: lambda_dc = |Lambda + o|,
    # Lambda = sum_i sum_j dd_ij / (G + eps) / (dcnt_i + eps) / (n_dc + eps).
    g_lam = a * lam_sign
    den = big + 1e-7
    g_delta += tl.where(in_k & other, g_lam / (den * (dcnt + 1e-7) * (n_dc + 1e-7)), 0.0)
    at_big = (rows == big_row)[:, None] & (col[None, :] == d_rank)  # the entry holding the global max G
    g_delta += tl.where(at_big, tl.where(n_dc > 0, g_lam * -big_lam / den, 0.0), 0.0)

    h = tl.where(in_ipc, g_delta / delta, 0.0)
    h = tl.where(loss != loss, float("nan"), h)
    tl.store(h_ptr + rows[:, None] * K + col[None, :], h, mask=ok)
    if WRITE_ORIGIN:
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
            d_ok = cols < D
            o = tl.load(o_ptr + rows[:, None] * stride_on + cols[None, :] * stride_od,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            t = tl.load(t_ptr + idx[:, :, None] * stride_tm + cols[None, None, :] * stride_td,
                        mask=in_ipc[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
            out = tl.sum(tl.where(in_ipc[:, :, None], h[:, :, None] * (o[:, None, :] - t), 0.0), axis=1)
            out = tl.where(loss != loss, float("nan"), out)
            tl.store(grad_o_ptr + rows[:, None] * stride_gon + cols[None, :] * stride_god,
                     out.to(grad_o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _icnn_backward_targets_kernel(
    o_ptr, stride_on, stride_od,
    t_ptr, stride_tm, stride_td,
    nbr_ptr, h_ptr,                      # (n, K) neighbour lists and coefficients
    grad_t_ptr, stride_gtm, stride_gtd,  # out (M, D) in the target's dtype
    n, M, D, K,
    ROWS: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ROWS target rows l per program; [l, i, ...] arrays.
    ls = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    l_ok = ls < M
    col = tl.arange(0, KP)
    col_ok = (col >= 1) & (col < K)
    for start_d in range(0, D, BLOCK_D):
        cols = start_d + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = cols < D
        t = tl.load(t_ptr + ls[:, None] * stride_tm + cols[None, :] * stride_td,
                    mask=l_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, n, BLOCK_N):
            rows = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = rows < n
            ok = row_ok[:, None] & col_ok[None, :]
            idx = tl.load(nbr_ptr + rows[:, None] * K + col[None, :], mask=ok, other=-1)
            h = tl.load(h_ptr + rows[:, None] * K + col[None, :], mask=ok, other=0.0)
            # origin row i's coefficient on target l
            h_l = tl.sum(tl.where(idx[None, :, :] == ls[:, None, None], h[None, :, :], 0.0), axis=2)
            o = tl.load(o_ptr + rows[:, None] * stride_on + cols[None, :] * stride_od,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            # the differences o_i - t_l themselves: h (o - t) summed, not h o - (sum h) t, which cancels
            acc += tl.sum(tl.where(row_ok[None, :, None], h_l[:, :, None] * (o[None, :, :] - t[:, None, :]), 0.0),
                          axis=1)
        out = -acc  # -sum_i h_il (o_i - t_l)
        tl.store(grad_t_ptr + ls[:, None] * stride_gtm + cols[None, :] * stride_gtd,
                 out.to(grad_t_ptr.dtype.element_ty), mask=l_ok[:, None] & d_ok[None, :])


@torch.library.custom_op("twinops::icnn_loss", mutates_args=())
def _icnn(
    origin: torch.Tensor, origin_labels: torch.Tensor, target: torch.Tensor, target_labels: torch.Tensor,
    k: int, ipc: int, clamped: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d = origin.shape
    m = target.shape[0]
    big_k = ipc + 1
    dev = origin.device
    nbr = torch.empty((n, big_k), device=dev, dtype=torch.int32)
    ndist = torch.empty((n, big_k), device=dev, dtype=torch.float32)
    stats = torch.empty((n, ROW_STATS), device=dev, dtype=torch.float32)
    pos = torch.empty((n, 3), device=dev, dtype=torch.int32)
    scalars = torch.empty(SCALARS, device=dev, dtype=torch.float32)
    rows = _rows_per_program()
    _icnn_rows_kernel[(triton.cdiv(n, rows),)](
        origin, origin.stride(0), origin.stride(1), origin_labels, origin_labels.stride(0),
        target, target.stride(0), target.stride(1), target_labels, target_labels.stride(0),
        nbr, ndist, stats, pos, n, m, d, big_k, k,
        ROWS=rows, KP=triton.next_power_of_2(big_k), BLOCK_M=_block(m), BLOCK_D=_block(d, 64, 32),
    )
    _icnn_combine_kernel[(1,)](stats, scalars, n, k, int(clamped), BLOCK_N=_block(n, 256))
    loss = scalars[LOSS].clone()
    return loss, nbr, ndist, stats, pos, scalars


@_icnn.register_fake
def _(origin, origin_labels, target, target_labels, k, ipc, clamped):
    n = origin.shape[0]
    f32 = dict(dtype=torch.float32)
    return (origin.new_empty((), **f32), origin.new_empty((n, ipc + 1), dtype=torch.int32),
            origin.new_empty((n, ipc + 1), **f32), origin.new_empty((n, ROW_STATS), **f32),
            origin.new_empty((n, 3), dtype=torch.int32), origin.new_empty(SCALARS, **f32))


@torch.library.custom_op("twinops::icnn_loss_backward", mutates_args=())
def _icnn_backward(
    grad: torch.Tensor, origin: torch.Tensor, origin_labels: torch.Tensor, target: torch.Tensor,
    target_labels: torch.Tensor, nbr: torch.Tensor, ndist: torch.Tensor, stats: torch.Tensor, pos: torch.Tensor,
    scalars: torch.Tensor, k: int, need_origin: bool, need_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = origin.shape
    m = target.shape[0]
    big_k = nbr.shape[1]
    kp = triton.next_power_of_2(big_k)
    h = torch.empty((n, big_k), device=origin.device, dtype=torch.float32)
    grad_o = torch.empty((n, d) if need_origin else (0, d), device=origin.device, dtype=origin.dtype)
    grad_t = torch.empty((m, d) if need_target else (0, d), device=origin.device, dtype=target.dtype)
    rows = _rows_per_program()
    _icnn_backward_rows_kernel[(triton.cdiv(n, rows),)](
        grad, origin, origin.stride(0), origin.stride(1), origin_labels, origin_labels.stride(0),
        target, target.stride(0), target.stride(1), target_labels, target_labels.stride(0),
        nbr, ndist, stats, pos, scalars, h, grad_o, grad_o.stride(0), grad_o.stride(1), n, d, big_k, k,
        WRITE_ORIGIN=need_origin, ROWS=rows, KP=kp, BLOCK_D=_block(d, 64, 32),
    )
    if need_target:
        _icnn_backward_targets_kernel[(triton.cdiv(m, rows),)](
            origin, origin.stride(0), origin.stride(1), target, target.stride(0), target.stride(1),
            nbr, h, grad_t, grad_t.stride(0), grad_t.stride(1), n, m, d, big_k,
            ROWS=rows, KP=kp, BLOCK_N=_block(n), BLOCK_D=_block(d, 64, 32),
        )
    return grad_o, grad_t


@_icnn_backward.register_fake
def _(grad, origin, origin_labels, target, target_labels, nbr, ndist, stats, pos, scalars, k, need_origin,
      need_target):
    d = origin.shape[1]
    return (origin.new_empty((origin.shape[0] if need_origin else 0, d)),
            target.new_empty((target.shape[0] if need_target else 0, d)))


def _icnn_setup_context(ctx, inputs, output):
    origin, origin_labels, target, target_labels, k, ipc, clamped = inputs
    _, nbr, ndist, stats, pos, scalars = output
    ctx.save_for_backward(origin, origin_labels, target, target_labels, nbr, ndist, stats, pos, scalars)
    ctx.k = k


def _icnn_backward_autograd(ctx, grad_loss, *unused):
    origin, origin_labels, target, target_labels, nbr, ndist, stats, pos, scalars = ctx.saved_tensors
    need_o, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_o or need_t):
        return None, None, None, None, None, None, None
    grad_o, grad_t = _icnn_backward(grad_loss, origin, origin_labels, target, target_labels, nbr, ndist, stats,
                                    pos, scalars, ctx.k, need_o, need_t)
    return (grad_o if need_o else None), None, (grad_t if need_t else None), None, None, None, None


_icnn.register_autograd(_icnn_backward_autograd, setup_context=_icnn_setup_context)


def icnn_loss(origin, origin_labels, target=None, target_labels=None, *, k=4, ipc=None):
    """ICNN loss of P25 (``-log`` of the authors' modified ICNN score) on the GPU.

    Same arguments and semantics as `twinops.reference.metric.proto_triplet.icnn_loss`; returns
    the origin's dtype. With the target omitted the origin set is scored against itself and its
    gradient collects both roles.
    """
    rt.check_float_tensor(origin, "origin", 2, "(n, D)")
    if origin.shape[0] < 1:
        raise ValueError("origin must have at least one row")
    rt.check_int_tensor(origin_labels, "origin_labels", (origin.shape[0],))
    if (target is None) != (target_labels is None):
        raise ValueError("target and target_labels must be given together (or both omitted)")
    if target is None:
        target, target_labels = origin, origin_labels
    else:
        rt.check_float_tensor(target, "target", 2, "(M, D)")
        if target.shape[1] != origin.shape[1]:
            raise ValueError(f"target must have D = {origin.shape[1]} columns like origin, got {target.shape[1]}")
        rt.check_int_tensor(target_labels, "target_labels", (target.shape[0],))
    m = target.shape[0]
    if m < 3:
        raise ValueError(f"target must have at least 3 rows (k is clamped to M - 2 >= 1), got M = {m}")
    k = check_int(k, "k")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    clamped = k + 2 >= m
    if clamped:
        k = m - 2
    ipc = k + 1 if ipc is None else check_int(ipc, "ipc")
    if not k <= ipc <= m - 1:
        raise ValueError(f"ipc must lie in [k, M - 1] = [{k}, {m - 1}] (k after clamping), got {ipc}")
    rt.check_device(("origin", origin), ("origin_labels", origin_labels), ("target", target),
                    ("target_labels", target_labels))
    loss = _icnn(origin, origin_labels, target, target_labels, k, ipc, clamped)[0]
    return loss.to(origin.dtype)


class ICNNLoss(torch.nn.Module):
    """``nn.Module`` form of `icnn_loss`: ``forward(origin, origin_labels, target=None, target_labels=None)``."""

    def __init__(self, *, k=4, ipc=None):
        super().__init__()
        self.k, self.ipc = k, ipc

    def forward(self, origin, origin_labels, target=None, target_labels=None):
        return icnn_loss(origin, origin_labels, target, target_labels, k=self.k, ipc=self.ipc)
