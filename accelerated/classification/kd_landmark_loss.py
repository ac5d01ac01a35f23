"""KD-Loss for facial landmarks (P14) as two elementwise Triton kernels. See
`twinops.reference.classification.kd_landmark_loss` for the definition.

Forward: one program per (BLOCK_R rows x BLOCK_K coordinates) tile reads p, g, u, o once, reflects
the teachers, evaluates the weight maps and the main term, and either stores the elementwise loss
(``reduction="none"``) or one fp32 partial sum per program. A one-program finishing kernel adds the
partials in a fixed order (deterministic, no atomics) and divides by N·2L for the mean.
Backward: the same tile walk recomputes T, b and the maps from the four inputs (nothing is saved but
the inputs) and writes d loss / d p = upstream · local slope. Two launches forward, one backward:
the tensors are tiny (N x 196 for 98 landmarks), so the op is launch-bound and the win over eager
PyTorch is replacing its ~40 elementwise launches.

The region tests compare T, b and |g - o| with p in fp32, with the reference's operation order,
so rounding can only flip a region when p lies within fp32 rounding of b (ties at p = g, p = T
and |g - p| = |g - o| are exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference.classification.kd_landmark_loss import check_kd_hyper
from .. import _runtime as rt
from .._partials import sum_partials

__all__ = ["kd_landmark_loss", "KDLandmarkLoss"]

HAS_TRITON_BACKWARD = True

INTERPRETER_TILE = dict(BLOCK_R=16, BLOCK_K=16)


def _tile(k: int) -> dict:
    """Tile sizes: 16 x 16 under the interpreter (small shapes cross tile edges); on the GPU up to
    256 coordinates wide (98 landmarks x 2 fit one tile row) and 2048 elements a tile."""
    if rt.interpreting():
        return dict(INTERPRETER_TILE)
    block_k = max(16, min(256, triton.next_power_of_2(k)))
    return dict(BLOCK_R=max(1, 2048 // block_k), BLOCK_K=block_k, num_warps=4)


# --------------------------------------------------------------------------------- the loss


@triton.jit
def _sign(x):
    """numpy's sign: sign(0) = 0, NaN stays NaN."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x * 0.0))


@triton.jit
def _assist(p, g, teacher, alpha, alpha_neg, reflection):
    """The teacher reflected to p's side of g, T, and its weight map W (the reference's ``_assist``)."""
    side = _sign(p - g)
    spread = tl.abs(teacher - g)
    t = g + side * spread
    b = g + reflection * side * spread
    pull = _sign(p - t) * _sign(t - g) > 0
    push = _sign(t - p) * _sign(p - b) >= 0
    return t, tl.where(pull, alpha, 0.0) + tl.where(push, alpha_neg, 0.0)


@triton.jit
def _load_tile(ptr, s_row, s_col, rows, cols, mask):
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _kd_forward_kernel(
    p_ptr, s_p0, s_p1,   # (N, K) student prediction; element (i, k) at i*s_p0 + k*s_p1
    g_ptr, s_g0, s_g1,   # (N, K) ground truth
    u_ptr, s_u0, s_u1,   # (N, K) tough teacher
    o_ptr, s_o0, s_o1,   # (N, K) tolerant teacher
    out_ptr, s_out0, s_out1,  # ELEMENTWISE: out (N, K) losses in p's dtype; else out (programs,) fp32 partial sums
    N, K, K_BLOCKS,
    alpha_u, alpha_u_neg, alpha_o, alpha_o_neg, w_main, w_u, w_o, reflection,
    ELEMENTWISE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # row block * K_BLOCKS + coordinate block
    rows = (pid // K_BLOCKS) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = (pid % K_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    p = _load_tile(p_ptr, s_p0, s_p1, rows, cols, mask)
    g = _load_tile(g_ptr, s_g0, s_g1, rows, cols, mask)
    u = _load_tile(u_ptr, s_u0, s_u1, rows, cols, mask)
    o = _load_tile(o_ptr, s_o0, s_o1, rows, cols, mask)

    t_u, map_u = _assist(p, g, u, alpha_u, alpha_u_neg, reflection)
    t_o, map_o = _assist(p, g, o, alpha_o, alpha_o_neg, reflection)
    e = tl.abs(g - p)
    d = tl.abs(g - o)
    main = tl.where(e <= d, 3.0 * e, e * e + 3.0 * d - d * d)
    loss = w_main * main + w_u * (map_u * tl.abs(t_u - p)) + w_o * (map_o * tl.abs(t_o - p))

    if ELEMENTWISE:
        tl.store(out_ptr + rows[:, None] * s_out0 + cols[None, :] * s_out1,
                 loss.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(tl.sum(tl.where(mask, loss, 0.0), axis=1), axis=0))


@triton.jit
def _kd_backward_kernel(
    up_ptr, s_up0, s_up1,  # upstream gradient: (N, K) for "none", else a 0-d tensor read with strides 0
    p_ptr, s_p0, s_p1,
    g_ptr, s_g0, s_g1,
    u_ptr, s_u0, s_u1,
    o_ptr, s_o0, s_o1,
    dp_ptr, s_dp0, s_dp1,  # out (N, K) d loss / d pred in p's dtype
    N, K, K_BLOCKS, divisor,  # divisor: N*K for the mean, else 1
    alpha_u, alpha_u_neg, alpha_o, alpha_o_neg, w_main, w_u, w_o, reflection,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // K_BLOCKS) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = (pid % K_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    p = _load_tile(p_ptr, s_p0, s_p1, rows, cols, mask)
    g = _load_tile(g_ptr, s_g0, s_g1, rows, cols, mask)
    u = _load_tile(u_ptr, s_u0, s_u1, rows, cols, mask)
    o = _load_tile(o_ptr, s_o0, s_o1, rows, cols, mask)
    up = _load_tile(up_ptr, s_up0, s_up1, rows, cols, mask) / divisor

    t_u, map_u = _assist(p, g, u, alpha_u, alpha_u_neg, reflection)
    t_o, map_o = _assist(p, g, o, alpha_o, alpha_o_neg, reflection)
    linear = tl.abs(g - p) <= tl.abs(g - o)
    main = tl.where(linear, 3.0 * _sign(p - g), 2.0 * (p - g))
    local = w_main * main + w_u * (map_u * _sign(p - t_u)) + w_o * (map_o * _sign(p - t_o))
    tl.store(dp_ptr + rows[:, None] * s_dp0 + cols[None, :] * s_dp1,
             (up * local).to(dp_ptr.dtype.element_ty), mask=mask)


def _grid(n: int, k: int, tile: dict) -> tuple[int, int]:
    k_blocks = triton.cdiv(k, tile["BLOCK_K"])
    return triton.cdiv(n, tile["BLOCK_R"]) * k_blocks, k_blocks


@torch.library.custom_op("twinops::kd_landmark_loss", mutates_args=())
def _kd_forward(
    pred: torch.Tensor, target: torch.Tensor, tough: torch.Tensor, tolerant: torch.Tensor,
    hyper: list[float], reduction: str,
) -> torch.Tensor:
    n, k = pred.shape
    tile = _tile(k)
    programs, k_blocks = _grid(n, k, tile)
    inputs = [arg for x in (pred, target, tough, tolerant) for arg in (x, x.stride(0), x.stride(1))]
    if reduction == "none":
        out = torch.empty((n, k), device=pred.device, dtype=pred.dtype)
        _kd_forward_kernel[(programs,)](*inputs, out, out.stride(0), out.stride(1), n, k, k_blocks, *hyper,
                                        ELEMENTWISE=True, **tile)
        return out
    partials = torch.empty((1, programs), device=pred.device, dtype=torch.float32)
    _kd_forward_kernel[(programs,)](*inputs, partials, 0, 0, n, k, k_blocks, *hyper, ELEMENTWISE=False, **tile)
    out = torch.empty((), device=pred.device, dtype=pred.dtype)
    return sum_partials(partials, float(n * k) if reduction == "mean" else 1.0, out)


@_kd_forward.register_fake
def _(pred, target, tough, tolerant, hyper, reduction):
    return pred.new_empty(pred.shape if reduction == "none" else ())


@torch.library.custom_op("twinops::kd_landmark_loss_backward", mutates_args=())
def _kd_backward(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, tough: torch.Tensor, tolerant: torch.Tensor,
    hyper: list[float], reduction: str,
) -> torch.Tensor:
    n, k = pred.shape
    tile = _tile(k)
    programs, k_blocks = _grid(n, k, tile)
    grad_strides = (grad.stride(0), grad.stride(1)) if reduction == "none" else (0, 0)
    dp = torch.empty((n, k), device=pred.device, dtype=pred.dtype)
    inputs = [arg for x in (pred, target, tough, tolerant) for arg in (x, x.stride(0), x.stride(1))]
    _kd_backward_kernel[(programs,)](
        grad, *grad_strides, *inputs, dp, dp.stride(0), dp.stride(1), n, k, k_blocks,
        float(n * k) if reduction == "mean" else 1.0, *hyper, **tile,
    )
    return dp


@_kd_backward.register_fake
def _(grad, pred, target, tough, tolerant, hyper, reduction):
    return pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    pred, target, tough, tolerant, hyper, reduction = inputs
    ctx.save_for_backward(pred, target, tough, tolerant)
    ctx.hyper, ctx.reduction = hyper, reduction


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    pred, target, tough, tolerant = ctx.saved_tensors
    return _kd_backward(grad, pred, target, tough, tolerant, ctx.hyper, ctx.reduction), None, None, None, None, None


_kd_forward.register_autograd(_backward, setup_context=_setup_context)


def kd_landmark_loss(pred, target, tough, tolerant, *, alpha_tough=1.9, alpha_tough_neg=-0.45,
                     alpha_tolerant=1.8, alpha_tolerant_neg=-0.4, main_weight=2.0, tough_weight=1.0,
                     tolerant_weight=1.0, reflection=0.15, reduction="mean"):
    """KD-Loss of P14 (main term + tough and tolerant teachers' assistive terms), on the GPU.

    Same arguments and semantics as `twinops.reference.classification.kd_landmark_loss`; the four
    tensors may have different floating dtypes, the result and the gradient have ``pred``'s. Only
    ``pred`` is differentiated: ``target``, ``tough`` and ``tolerant`` must not require grad.
    """
    hyper = check_kd_hyper(alpha_tough, alpha_tough_neg, alpha_tolerant, alpha_tolerant_neg,
                           main_weight, tough_weight, tolerant_weight, reflection, reduction)
    rt.check_float_tensor(pred, "pred", 2, "(N, 2L)")
    if pred.shape[0] == 0 or pred.shape[1] == 0:
        raise ValueError(f"pred must have at least one row and one coordinate, got shape {tuple(pred.shape)}")
    for x, name in ((target, "target"), (tough, "tough"), (tolerant, "tolerant")):
        rt.check_float_tensor(x, name, 2, "(N, 2L)")
        if x.shape != pred.shape:
            raise ValueError(f"{name} must have the shape of pred {tuple(pred.shape)}, got {tuple(x.shape)}")
        if x.requires_grad:
            raise ValueError(f"{name}: only pred is differentiated (the teachers and the ground truth are "
                             f"constants of the loss); pass {name}.detach()")
    rt.check_device(("pred", pred), ("target", target), ("tough", tough), ("tolerant", tolerant))
    return _kd_forward(pred, target, tough, tolerant, list(hyper), reduction)


class KDLandmarkLoss(torch.nn.Module):
    """``nn.Module`` form of `kd_landmark_loss`: ``loss(pred, target, tough, tolerant)``."""

    def __init__(self, *, alpha_tough=1.9, alpha_tough_neg=-0.45, alpha_tolerant=1.8, alpha_tolerant_neg=-0.4,
                 main_weight=2.0, tough_weight=1.0, tolerant_weight=1.0, reflection=0.15, reduction="mean"):
        super().__init__()
        self.kwargs = dict(alpha_tough=alpha_tough, alpha_tough_neg=alpha_tough_neg, alpha_tolerant=alpha_tolerant,
                           alpha_tolerant_neg=alpha_tolerant_neg, main_weight=main_weight,
                           tough_weight=tough_weight, tolerant_weight=tolerant_weight, reflection=reflection,
                           reduction=reduction)
        check_kd_hyper(**self.kwargs)

    def forward(self, pred, target, tough, tolerant):
        return kd_landmark_loss(pred, target, tough, tolerant, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
