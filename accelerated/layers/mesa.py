"""Mesa (P21) memory-saving layers as Triton kernels: 8-bit running-range quantisation and GELU,
softmax and LayerNorm that keep only the 8-bit activation for their backward pass.
See `twinops.reference.layers.mesa` for the definition.

Forward (training): `_minmax_kernel` (per-chunk group min / max), `_state_kernel` (running update),
then one pass that computes the exact op and writes the uint8 codes (GELU: one `_quantize_kernel`
launch does both). Backward: one pass that dequantises the codes and applies the op's backward
(GELU: `_dequantize_kernel` with OP_GELU). Saved for backward: the uint8 codes (1 byte / element) and
the fp32 (G,) state the codes were made with (plus fp32 mean / rstd per row for LayerNorm).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from . import mesa_quant as mq

__all__ = ["mesa_quantize", "mesa_dequantize", "mesa_gelu", "mesa_softmax", "mesa_layernorm", "MesaGELU",
           "MesaSoftmax", "MesaLayerNorm"]

HAS_TRITON_BACKWARD = True


def _last_axis_groups(x: torch.Tensor, groups) -> int:
    return mq.check_groups(x, groups, x.ndim - 1)


def _axis(x: torch.Tensor, dim, name: str = "x") -> int:
    from ...reference._checks import check_int

    dim = check_int(dim, "dim")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be in [-{x.ndim}, {x.ndim}) for {name} of rank {x.ndim}, got {dim}")
    return dim % x.ndim


# ------------------------------------------------------------------------------ quantisation


@torch.library.custom_op("twinops::mesa_quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, running_range: torch.Tensor, running_min: torch.Tensor,
                 noise: Optional[torch.Tensor], groups: int, dim: int, momentum: float, training: bool,
                 first_step: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x3 = mq.view3(x, dim)
    new_range, new_min = mq.update_state(x3, running_range, running_min, groups, momentum, training, first_step)
    noise3 = mq.view3(noise, dim) if noise is not None else None
    q, _ = mq.quantize(x3, new_range, new_min, noise3, groups)
    return q.reshape(x.shape), new_range, new_min


@_quantize_op.register_fake
def _(x, running_range, running_min, noise, groups, dim, momentum, training, first_step):
    state = x.new_empty((groups,), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=torch.uint8), state, torch.empty_like(state)


def mesa_quantize(x, running_range, running_min, noise=None, *, groups=1, dim=-1, momentum=0.1, training=True,
                  first_step=False):
    """8-bit group-wise quantisation of ``x`` with a running range on the GPU.

    Same arguments and semantics as `twinops.reference.layers.mesa.mesa_quantize`; returns
    ``(q, new_running_range, new_running_min)``: ``q`` uint8 of ``x``'s shape (contiguous), the state
    float32 (G,). Not differentiable. A non-finite ``x`` or state gives a NaN new state.
    """
    x = mq.check_layer_input(x)
    axis = _axis(x, dim)
    groups = mq.check_groups(x, groups, axis)
    rr, rm = mq.check_state(running_range, running_min, groups)
    noise = mq.check_noise(noise, x)
    momentum, training, first_step = mq.check_step(momentum, training, first_step)
    rt.check_device(("x", x), ("running_range", rr), ("running_min", rm), ("noise", noise))
    return _quantize_op(x.detach(), rr, rm, noise, groups, axis, momentum, training, first_step)


@torch.library.custom_op("twinops::mesa_dequantize", mutates_args=())
def _dequantize_op(q: torch.Tensor, running_range: torch.Tensor, running_min: torch.Tensor, groups: int,
                   dim: int) -> torch.Tensor:
    q3 = mq.view3(q, dim).contiguous()
    out = mq.dequantize(q3, running_range.float().contiguous(), running_min.float().contiguous(), groups,
                        running_range.dtype)
    return out.reshape(q.shape)


@_dequantize_op.register_fake
def _(q, running_range, running_min, groups, dim):
    return q.new_empty(q.shape, dtype=running_range.dtype)


def mesa_dequantize(q, running_range, running_min, *, groups=1, dim=-1):
    """``q / s_g + beta_g`` on the GPU; the result has ``running_range``'s dtype."""
    rt.check_tensor(q, "q")
    if q.dtype != torch.uint8:
        raise TypeError(f"q must be an integer (uint8) tensor of codes, got {q.dtype}")
    if q.ndim < 1:
        raise ValueError("q must have at least one dimension")
    axis = _axis(q, dim, "q")
    groups = mq.check_groups(q, groups, axis, "q")
    rr, rm = mq.check_state(running_range, running_min, groups)
    rt.check_device(("q", q), ("running_range", rr), ("running_min", rm))
    return _dequantize_op(q, rr, rm, groups, axis)


# ------------------------------------------------------------------------------------ GELU


@torch.library.custom_op("twinops::mesa_gelu_fwd", mutates_args=())
def _gelu_fwd(x: torch.Tensor, running_range: torch.Tensor, running_min: torch.Tensor,
              noise: Optional[torch.Tensor], groups: int, momentum: float, training: bool, first_step: bool,
              save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x3 = mq.view3(x, x.ndim - 1)
    new_range, new_min = mq.update_state(x3, running_range, running_min, groups, momentum, training, first_step)
    noise3 = mq.view3(noise, x.ndim - 1) if noise is not None else None
    q, y = mq.quantize(x3, new_range, new_min, noise3, groups, op=mq.OP_GELU, write_q=save)
    return y.reshape(x.shape), new_range, new_min, q.reshape(x.shape) if save else q


@_gelu_fwd.register_fake
def _(x, running_range, running_min, noise, groups, momentum, training, first_step, save):
    state = x.new_empty((groups,), dtype=torch.float32)
    q = x.new_empty(x.shape if save else (0,), dtype=torch.uint8)
    return torch.empty_like(x, memory_format=torch.contiguous_format), state, torch.empty_like(state), q


@torch.library.custom_op("twinops::mesa_gelu_bwd", mutates_args=())
def _gelu_bwd(grad: torch.Tensor, q: torch.Tensor, state_range: torch.Tensor, state_min: torch.Tensor,
              groups: int) -> torch.Tensor:
    """grad * GELU'(x_hat), x_hat dequantised from the saved codes ``q``."""
    dx = mq.dequantize(mq.view3(q, q.ndim - 1), state_range, state_min, groups, grad.dtype,
                       grad3=mq.view3(grad, grad.ndim - 1))
    return dx.reshape(q.shape)


@_gelu_bwd.register_fake
def _(grad, q, state_range, state_min, groups):
    return grad.new_empty(q.shape)


def _gelu_setup(ctx, inputs, output):
    ctx.groups = inputs[4]
    ctx.save_for_backward(output[3], output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _gelu_backward(ctx, grad_y, grad_range, grad_min, grad_q):
    q, state_range, state_min = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] and grad_y is not None:
        dx = _gelu_bwd(grad_y, q, state_range, state_min, ctx.groups)
    return dx, None, None, None, None, None, None, None, None


_gelu_fwd.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def _check_layer(x, running_range, running_min, noise, groups, momentum, training, first_step, axis=None):
    x = mq.check_layer_input(x)
    groups = mq.check_groups(x, groups, x.ndim - 1 if axis is None else axis)
    rr, rm = mq.check_state(running_range, running_min, groups)
    noise = mq.check_noise(noise, x)
    momentum, training, first_step = mq.check_step(momentum, training, first_step)
    rt.check_device(("x", x), ("running_range", rr), ("running_min", rm), ("noise", noise))
    return x, rr, rm, noise, groups, momentum, training, first_step


def _saves(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mesa_gelu(x, running_range, running_min, noise=None, *, groups=1, momentum=0.1, training=True,
              first_step=False):
    """Exact (erf) GELU that keeps only the 8-bit ``x`` (grouped along the last axis) for backward.

    Same arguments and semantics as `twinops.reference.layers.mesa.mesa_gelu`; returns
    ``(y, new_running_range, new_running_min)`` with ``y`` in ``x``'s dtype and the state float32 (G,).
    The gradient is ``grad * GELU'(x_hat)`` at the dequantised input. The codes are only made when a
    gradient is needed.
    """
    x, rr, rm, noise, groups, momentum, training, first_step = _check_layer(
        x, running_range, running_min, noise, groups, momentum, training, first_step)
    y, new_range, new_min, _ = _gelu_fwd(x, rr, rm, noise, groups, momentum, training, first_step, _saves(x))
    return y, new_range, new_min


# --------------------------------------------------------------------------------- softmax
#
# Scores (B, H, N, M), softmax over M, groups over heads. Row r = (b, h, n) of R = B H N rows.
# Pass 1 (`_softmax_stats_kernel`): per row the running max m and sum l (online, chunks of BLOCK_M),
#   and the row's min / max of y = exp(x - m) / l, i.e. exp(min x - m) / l and 1 / l, as partials for
#   `_state_kernel` (group g holds rows with h in [g H/G, (g + 1) H/G)).
# Pass 2 (`_softmax_quant_kernel`): recomputes y in fp32 from x, m, l; writes y and its codes.
# Backward (`_softmax_bwd_kernel`): y_hat = q / s + beta; dx = y_hat (g - sum_j g_j y_hat_j).


@triton.jit
def _row_pointer_offset(r, H, N, stride_b, stride_h, stride_n):
    return (r // (H * N)) * stride_b + ((r // N) % H) * stride_h + (r % N) * stride_n


@triton.jit
def _softmax_stats_kernel(
    x_ptr, stride_b, stride_h, stride_n, stride_m,  # (B, H, N, M) scores
    ml_ptr,                                          # out (R, 2) fp32: row max m and sum l
    part_ptr,                                        # out (3, R) fp32: row min y, max y, non-finite count
    H, N, M, R,
    BLOCK_M: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + _row_pointer_offset(r, H, N, stride_b, stride_h, stride_n)
    m = float("-inf")
    l = 0.0
    lo = float("inf")
    bad = 0.0
    for start in range(0, M, BLOCK_M):
        k = start + tl.arange(0, BLOCK_M)
        live = k < M
        x = tl.load(row + k.to(tl.int64) * stride_m, mask=live, other=float("-inf")).to(tl.float32)
        bad += tl.sum(tl.where(live & ((x - x) != 0.0), 1.0, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        lo = tl.minimum(lo, tl.min(tl.where(live, x, float("inf")), axis=0))
        m = m_new
    tl.store(ml_ptr + 2 * r, m)
    tl.store(ml_ptr + 2 * r + 1, l)
    tl.store(part_ptr + r, tl.exp(lo - m) / l)
    tl.store(part_ptr + R + r, 1.0 / l)
    tl.store(part_ptr + 2 * R + r, bad)


@triton.jit
def _softmax_quant_kernel(
    x_ptr, stride_b, stride_h, stride_n, stride_m,  # (B, H, N, M) scores
    u_ptr, u_stride_b, u_stride_h, u_stride_n, u_stride_m,  # rounding noise, read when HAS_NOISE
    ml_ptr,                                          # (R, 2) fp32 row max and sum from pass 1
    range_ptr, min_ptr,                              # (G,) fp32 state for this step
    y_ptr, q_ptr,                                    # out y (input dtype) and uint8 codes, contiguous (R, M)
    H, N, M, Hg,
    HAS_NOISE: tl.constexpr, WRITE_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + _row_pointer_offset(r, H, N, stride_b, stride_h, stride_n)
    m = tl.load(ml_ptr + 2 * r)
    inv_l = 1.0 / tl.load(ml_ptr + 2 * r + 1)
    g = ((r // N) % H) // Hg
    s, beta = mq.group_scale(range_ptr, min_ptr, g)
    for start in range(0, M, BLOCK_M):
        k = start + tl.arange(0, BLOCK_M)
        live = k < M
        x = tl.load(row + k.to(tl.int64) * stride_m, mask=live, other=0.0).to(tl.float32)
        y = tl.exp(x - m) * inv_l
        tl.store(y_ptr + r * M + k, y.to(y_ptr.dtype.element_ty), mask=live)
        if WRITE_Q:
            if HAS_NOISE:
                u_row = u_ptr + _row_pointer_offset(r, H, N, u_stride_b, u_stride_h, u_stride_n)
                u = tl.load(u_row + k.to(tl.int64) * u_stride_m, mask=live, other=0.5).to(tl.float32)
            else:
                u = 0.5
            v = tl.minimum(tl.maximum((y - beta) * s + (u - 0.5), 0.0), 255.0)
            tl.store(q_ptr + r * M + k, mq.round_half_even(v).to(tl.uint8), mask=live)


@triton.jit
def _softmax_bwd_kernel(
    q_ptr,                                           # uint8 codes of y, contiguous (R, M)
    range_ptr, min_ptr,                              # (G,) fp32 state the codes were made with
    g_ptr, g_stride_b, g_stride_h, g_stride_n, g_stride_m,  # upstream gradient (B, H, N, M)
    dx_ptr,                                          # out (R, M) contiguous
    H, N, M, Hg,
    BLOCK_M: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    g_row = g_ptr + _row_pointer_offset(r, H, N, g_stride_b, g_stride_h, g_stride_n)
    s, beta = mq.group_scale(range_ptr, min_ptr, ((r // N) % H) // Hg)
    dot = 0.0
    for start in range(0, M, BLOCK_M):
        k = start + tl.arange(0, BLOCK_M)
        live = k < M
        y = tl.load(q_ptr + r * M + k, mask=live, other=0).to(tl.float32) / s + beta
        gy = tl.load(g_row + k.to(tl.int64) * g_stride_m, mask=live, other=0.0).to(tl.float32)
        dot += tl.sum(tl.where(live, y * gy, 0.0), axis=0)
    for start in range(0, M, BLOCK_M):
        k = start + tl.arange(0, BLOCK_M)
        live = k < M
        y = tl.load(q_ptr + r * M + k, mask=live, other=0).to(tl.float32) / s + beta
        gy = tl.load(g_row + k.to(tl.int64) * g_stride_m, mask=live, other=0.0).to(tl.float32)
        tl.store(dx_ptr + r * M + k, (y * (gy - dot)).to(dx_ptr.dtype.element_ty), mask=live)


def _row_block(m: int) -> int:
    cap = 16 if rt.interpreting() else 1024
    return max(16, min(cap, triton.next_power_of_2(m)))


@torch.library.custom_op("twinops::mesa_softmax_fwd", mutates_args=())
def _softmax_fwd(x: torch.Tensor, running_range: torch.Tensor, running_min: torch.Tensor,
                 noise: Optional[torch.Tensor], groups: int, momentum: float, training: bool, first_step: bool,
                 save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, n, m = x.shape
    rows = b * h * n
    block = _row_block(m)
    ml = torch.empty((rows, 2), device=x.device, dtype=torch.float32)
    part = torch.empty((3, rows), device=x.device, dtype=torch.float32)
    _softmax_stats_kernel[(rows,)](x, *x.stride(), ml, part, h, n, m, rows, BLOCK_M=block)
    if training:
        # row (b, h, n) of group g: the (B, H, N) row grid seen by group_offsets with Dg = H / G heads
        new_range, new_min = mq.fold_state(part, rows, (h * n, n, 1), h // groups, n, b * (h // groups) * n,
                                           running_range, running_min, groups, momentum, first_step)
    else:
        new_range, new_min = running_range.float().clone(), running_min.float().clone()
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    q = torch.empty(x.shape if save else (0,), device=x.device, dtype=torch.uint8)
    u = noise if noise is not None else x
    _softmax_quant_kernel[(rows,)](x, *x.stride(), u, *u.stride(), ml, new_range, new_min, y, q, h, n, m,
                                   h // groups, HAS_NOISE=noise is not None, WRITE_Q=save, BLOCK_M=block)
    return y, new_range, new_min, q


@_softmax_fwd.register_fake
def _(x, running_range, running_min, noise, groups, momentum, training, first_step, save):
    state = x.new_empty((groups,), dtype=torch.float32)
    q = x.new_empty(x.shape if save else (0,), dtype=torch.uint8)
    return torch.empty_like(x, memory_format=torch.contiguous_format), state, torch.empty_like(state), q


@torch.library.custom_op("twinops::mesa_softmax_bwd", mutates_args=())
def _softmax_bwd(grad: torch.Tensor, q: torch.Tensor, state_range: torch.Tensor, state_min: torch.Tensor,
                 groups: int) -> torch.Tensor:
    """y_hat * (grad - sum(grad * y_hat)), y_hat dequantised from the saved codes ``q``."""
    b, h, n, m = q.shape
    dx = torch.empty(q.shape, device=q.device, dtype=grad.dtype)
    _softmax_bwd_kernel[(b * h * n,)](q, state_range, state_min, grad, *grad.stride(), dx, h, n, m, h // groups,
                                      BLOCK_M=_row_block(m))
    return dx


@_softmax_bwd.register_fake
def _(grad, q, state_range, state_min, groups):
    return grad.new_empty(q.shape)


def _softmax_backward(ctx, grad_y, grad_range, grad_min, grad_q):
    q, state_range, state_min = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] and grad_y is not None:
        dx = _softmax_bwd(grad_y, q, state_range, state_min, ctx.groups)
    return dx, None, None, None, None, None, None, None, None


_softmax_fwd.register_autograd(_softmax_backward, setup_context=_gelu_setup)


def mesa_softmax(x, running_range, running_min, noise=None, *, groups=1, momentum=0.1, training=True,
                 first_step=False):
    """Exact softmax over the last axis of (B, H, N, M) scores that keeps only the 8-bit output
    (grouped by heads, axis 1) for backward.

    Same arguments and semantics as `twinops.reference.layers.mesa.mesa_softmax`; returns
    ``(y, new_running_range, new_running_min)``, the state float32 (G,) tracking ``y``. The gradient is
    ``y_hat * (grad - sum(grad * y_hat))`` at the dequantised output.
    """
    rt.check_tensor(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, H, N, M), got {x.ndim} dimensions {tuple(x.shape)}")
    x, rr, rm, noise, groups, momentum, training, first_step = _check_layer(
        x, running_range, running_min, noise, groups, momentum, training, first_step, axis=1)
    y, new_range, new_min, _ = _softmax_fwd(x, rr, rm, noise, groups, momentum, training, first_step, _saves(x))
    return y, new_range, new_min


# ------------------------------------------------------------------------------- LayerNorm
#
# x viewed as (R, C) rows, normalised over C, groups over C (chunks of Cg = C / G columns).
# Forward: the shared `_minmax_kernel` / `_state_kernel` on x, then `_layernorm_fwd_kernel` per row:
#   mean, rstd (two passes over the row), y = (x - mean) rstd w + b, and the codes of x.
# Backward: `_layernorm_dx_kernel` per row recomputes n_hat = (x_hat - mean) rstd from the codes and
#   the exact saved mean / rstd; `_layernorm_dwdb_kernel` sums g n_hat and g over blocks of rows into
#   (splits, C) fp32 partials that the host adds up (deterministic, extra memory splits * C).


@triton.jit
def _layernorm_fwd_kernel(
    x_ptr, stride_r, stride_c,          # (R, C) input rows
    u_ptr, u_stride_r, u_stride_c,      # rounding noise, read when HAS_NOISE
    w_ptr, w_stride, b_ptr, b_stride,   # (C,) weight and bias
    range_ptr, min_ptr,                 # (G,) fp32 state for this step
    y_ptr, q_ptr,                       # out (R, C) contiguous: y (input dtype) and uint8 codes of x
    mean_ptr, rstd_ptr,                 # out (R,) fp32
    C, Cg, eps,
    HAS_NOISE: tl.constexpr, WRITE_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * stride_r
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(0, C, BLOCK_C):
        k = start + tl.arange(0, BLOCK_C)
        acc += tl.load(row + k.to(tl.int64) * stride_c, mask=k < C, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / C
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(0, C, BLOCK_C):
        k = start + tl.arange(0, BLOCK_C)
        x = tl.load(row + k.to(tl.int64) * stride_c, mask=k < C, other=0.0).to(tl.float32)
        acc += tl.where(k < C, (x - mean) * (x - mean), 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps)
    tl.store(mean_ptr + r, mean)
    tl.store(rstd_ptr + r, rstd)
    for start in range(0, C, BLOCK_C):
        k = start + tl.arange(0, BLOCK_C)
        live = k < C
        x = tl.load(row + k.to(tl.int64) * stride_c, mask=live, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k * w_stride, mask=live, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + k * b_stride, mask=live, other=0.0).to(tl.float32)
        tl.store(y_ptr + r * C + k, ((x - mean) * rstd * w + b).to(y_ptr.dtype.element_ty), mask=live)
        if WRITE_Q:
            s, beta = mq.group_scale(range_ptr, min_ptr, tl.where(live, k // Cg, 0))
            if HAS_NOISE:
                u = tl.load(u_ptr + r * u_stride_r + k.to(tl.int64) * u_stride_c, mask=live,
                            other=0.5).to(tl.float32)
            else:
                u = 0.5
            v = tl.minimum(tl.maximum((x - beta) * s + (u - 0.5), 0.0), 255.0)
            tl.store(q_ptr + r * C + k, mq.round_half_even(v).to(tl.uint8), mask=live)


@triton.jit
def _layernorm_dx_kernel(
    q_ptr, range_ptr, min_ptr,          # (R, C) contiguous codes of x; (G,) fp32 state they were made with
    g_ptr, g_stride_r, g_stride_c,      # (R, C) upstream gradient
    w_ptr, w_stride,                    # (C,) weight
    mean_ptr, rstd_ptr,                 # (R,) fp32 exact row statistics of the forward pass
    dx_ptr,                             # out (R, C) contiguous
    C, Cg,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + r)
    rstd = tl.load(rstd_ptr + r)
    sum_gw = tl.zeros((BLOCK_C,), tl.float32)
    sum_gwn = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(0, C, BLOCK_C):
        k = start + tl.arange(0, BLOCK_C)
        live = k < C
        s, beta = mq.group_scale(range_ptr, min_ptr, tl.where(live, k // Cg, 0))
        n_hat = (tl.load(q_ptr + r * C + k, mask=live, other=0).to(tl.float32) / s + beta - mean) * rstd
        gw = tl.load(g_ptr + r * g_stride_r + k.to(tl.int64) * g_stride_c, mask=live, other=0.0).to(tl.float32) \
            * tl.load(w_ptr + k * w_stride, mask=live, other=0.0).to(tl.float32)
        sum_gw += gw
        sum_gwn += tl.where(live, gw * n_hat, 0.0)
    mean_gw = tl.sum(sum_gw, axis=0) / C
    mean_gwn = tl.sum(sum_gwn, axis=0) / C
    for start in range(0, C, BLOCK_C):
        k = start + tl.arange(0, BLOCK_C)
        live = k < C
        s, beta = mq.group_scale(range_ptr, min_ptr, tl.where(live, k // Cg, 0))
        n_hat = (tl.load(q_ptr + r * C + k, mask=live, other=0).to(tl.float32) / s + beta - mean) * rstd
        gw = tl.load(g_ptr + r * g_stride_r + k.to(tl.int64) * g_stride_c, mask=live, other=0.0).to(tl.float32) \
            * tl.load(w_ptr + k * w_stride, mask=live, other=0.0).to(tl.float32)
        dx = rstd * (gw - mean_gw - n_hat * mean_gwn)
        tl.store(dx_ptr + r * C + k, dx.to(dx_ptr.dtype.element_ty), mask=live)


@triton.jit
def _layernorm_dwdb_kernel(
    q_ptr, range_ptr, min_ptr,          # as in _layernorm_dx_kernel
    g_ptr, g_stride_r, g_stride_c,
    mean_ptr, rstd_ptr,
    dw_part_ptr, db_part_ptr,           # out (splits, C) fp32 partial sums of g n_hat and g
    R, C, Cg, rows_per_split,
    BLOCK_C: tl.constexpr,
):
    cb = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    k = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    live = k < C
    s, beta = mq.group_scale(range_ptr, min_ptr, tl.where(live, k // Cg, 0))
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    first = split * rows_per_split
    for i in range(0, rows_per_split):
        r = first + i
        ok = live & (r < R)
        n_hat = (tl.load(q_ptr + r * C + k, mask=ok, other=0).to(tl.float32) / s + beta - tl.load(
            mean_ptr + r, mask=r < R, other=0.0)) * tl.load(rstd_ptr + r, mask=r < R, other=0.0)
        gy = tl.load(g_ptr + r * g_stride_r + k.to(tl.int64) * g_stride_c, mask=ok, other=0.0).to(tl.float32)
        dw += tl.where(ok, gy * n_hat, 0.0)
        db += gy
    tl.store(dw_part_ptr + split * C + k, dw, mask=live)
    tl.store(db_part_ptr + split * C + k, db, mask=live)


def _ln_block(c: int) -> int:
    cap = 16 if rt.interpreting() else 1024
    return max(16, min(cap, triton.next_power_of_2(c)))


@torch.library.custom_op("twinops::mesa_layernorm_fwd", mutates_args=())
def _layernorm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_range: torch.Tensor,
                   running_min: torch.Tensor, noise: Optional[torch.Tensor], groups: int, eps: float,
                   momentum: float, training: bool, first_step: bool, save: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    rows = x2.shape[0]
    new_range, new_min = mq.update_state(x2.unsqueeze(2), running_range, running_min, groups, momentum, training,
                                         first_step)
    y = torch.empty((rows, c), device=x.device, dtype=x.dtype)
    q = torch.empty((rows, c) if save else (0,), device=x.device, dtype=torch.uint8)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    u = noise.reshape(-1, c) if noise is not None else x2
    _layernorm_fwd_kernel[(rows,)](
        x2, x2.stride(0), x2.stride(1), u, u.stride(0), u.stride(1), weight, weight.stride(0), bias, bias.stride(0),
        new_range, new_min, y, q, mean, rstd, c, c // groups, float(eps),
        HAS_NOISE=noise is not None, WRITE_Q=save, BLOCK_C=_ln_block(c),
    )
    return y.reshape(x.shape), new_range, new_min, q.reshape(x.shape) if save else q, mean, rstd


@_layernorm_fwd.register_fake
def _(x, weight, bias, running_range, running_min, noise, groups, eps, momentum, training, first_step, save):
    state = x.new_empty((groups,), dtype=torch.float32)
    rows = x.numel() // x.shape[-1]
    q = x.new_empty(x.shape if save else (0,), dtype=torch.uint8)
    stat = x.new_empty((rows,), dtype=torch.float32)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), state, torch.empty_like(state), q, stat,
            torch.empty_like(stat))


@torch.library.custom_op("twinops::mesa_layernorm_bwd", mutates_args=())
def _layernorm_bwd(grad: torch.Tensor, q: torch.Tensor, state_range: torch.Tensor, state_min: torch.Tensor,
                   weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, groups: int, need_x: bool,
                   need_params: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) at the dequantised input; empty tensors for those not asked for."""
    c = q.shape[-1]
    q2, g2 = q.reshape(-1, c), grad.reshape(-1, c)
    rows = q2.shape[0]
    block = _ln_block(c)
    dx = torch.empty((rows, c) if need_x else (0,), device=q.device, dtype=grad.dtype)
    if need_x:
        _layernorm_dx_kernel[(rows,)](q2, state_range, state_min, g2, g2.stride(0), g2.stride(1), weight,
                                      weight.stride(0), mean, rstd, dx, c, c // groups, BLOCK_C=block)
    dw = weight.new_empty((0,))
    db = weight.new_empty((0,))
    if need_params:
        per = 16 if rt.interpreting() else 64
        splits = triton.cdiv(rows, per)
        dw_part = torch.empty((splits, c), device=q.device, dtype=torch.float32)
        db_part = torch.empty_like(dw_part)
        _layernorm_dwdb_kernel[(triton.cdiv(c, block), splits)](
            q2, state_range, state_min, g2, g2.stride(0), g2.stride(1), mean, rstd, dw_part, db_part, rows, c,
            c // groups, per, BLOCK_C=block)
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(weight.dtype)
    return dx.reshape(q.shape) if need_x else dx, dw, db


@_layernorm_bwd.register_fake
def _(grad, q, state_range, state_min, weight, mean, rstd, groups, need_x, need_params):
    dx = grad.new_empty(q.shape if need_x else (0,))
    n = weight.shape[0] if need_params else 0
    return dx, weight.new_empty((n,)), weight.new_empty((n,))


def _layernorm_setup(ctx, inputs, output):
    ctx.groups = inputs[6]
    ctx.save_for_backward(output[3], output[1], output[2], inputs[1], output[4], output[5])
    ctx.mark_non_differentiable(*output[1:])


def _layernorm_backward(ctx, grad_y, *unused):
    q, state_range, state_min, weight, mean, rstd = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_params = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx = dw = db = None
    if grad_y is not None and (need_x or need_params):
        dx, dw, db = _layernorm_bwd(grad_y, q, state_range, state_min, weight, mean, rstd, ctx.groups, need_x,
                                    need_params)
    return ((dx if need_x else None), (dw if ctx.needs_input_grad[1] else None),
            (db if ctx.needs_input_grad[2] else None)) + (None,) * 9


_layernorm_fwd.register_autograd(_layernorm_backward, setup_context=_layernorm_setup)


def mesa_layernorm(x, weight, bias, running_range, running_min, noise=None, *, groups=1, eps=1e-5, momentum=0.1,
                   training=True, first_step=False):
    """Exact LayerNorm over the last axis that keeps only the 8-bit ``x`` (plus fp32 mean / rstd per
    row) for backward.

    Same arguments and semantics as `twinops.reference.layers.mesa.mesa_layernorm`; returns
    ``(y, new_running_range, new_running_min)``. Gradients reach ``x``, ``weight`` and ``bias``,
    evaluated at the dequantised input.
    """
    from ...reference._checks import check_real

    x, rr, rm, noise, groups, momentum, training, first_step = _check_layer(
        x, running_range, running_min, noise, groups, momentum, training, first_step)
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        rt.check_tensor(t, name)
        if t.dtype not in rt.FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
    rt.check_device(("x", x), ("weight", weight), ("bias", bias))
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    y, new_range, new_min, *_ = _layernorm_fwd(x, weight, bias, rr, rm, noise, groups, eps, momentum, training,
                                               first_step, _saves(x, weight, bias))
    return y, new_range, new_min


# ---------------------------------------------------------------------------------- modules


class _MesaState(torch.nn.Module):
    """Holds the running quantisation state as buffers ``running_range`` and ``running_min`` (float32
    (G,)) and whether any statistic exists yet (``initialised``, kept in the state dict as extra state)."""

    def __init__(self, groups: int, momentum: float, stochastic: bool):
        super().__init__()
        self.groups, self.momentum, self.stochastic = int(groups), float(momentum), bool(stochastic)
        self.register_buffer("running_range", torch.zeros(self.groups))
        self.register_buffer("running_min", torch.zeros(self.groups))
        self.initialised = False

    def get_extra_state(self):
        return {"initialised": self.initialised}

    def set_extra_state(self, state):
        self.initialised = bool(state["initialised"])

    def _step(self, x):
        if not self.training and not self.initialised:
            raise RuntimeError(f"{type(self).__name__} in eval mode before any running statistic exists: "
                               "run at least one training step first")
        noise = torch.rand_like(x, dtype=torch.float32) if self.stochastic and self.training else None
        return dict(noise=noise, groups=self.groups, momentum=self.momentum, training=self.training,
                    first_step=self.training and not self.initialised)

    def _store(self, new_range, new_min):
        if self.training:
            with torch.no_grad():
                self.running_range.copy_(new_range)
                self.running_min.copy_(new_min)
            self.initialised = True


class MesaGELU(_MesaState):
    """``nn.GELU`` (erf form) that keeps only the 8-bit input for backward.

    ``groups`` (default 1) cuts the last axis into equal chunks, each with its own running range;
    ``momentum`` 0.1 (Mesa's ``ema_decay`` 0.9); ``stochastic`` (default True, as Mesa) draws fresh
    rounding noise each training step with ``torch.rand_like`` (costs one extra read; False rounds to
    nearest). The first training step sets the running state from the batch; eval mode before that
    raises ``RuntimeError``. In training mode the buffers take the returned state.
    """

    def __init__(self, groups: int = 1, *, momentum: float = 0.1, stochastic: bool = True):
        super().__init__(groups, momentum, stochastic)

    def forward(self, x):
        y, new_range, new_min = mesa_gelu(x, self.running_range, self.running_min, **self._step(x))
        self._store(new_range, new_min)
        return y


class MesaSoftmax(_MesaState):
    """Softmax over the last axis of (B, H, N, M) attention scores that keeps only the 8-bit output
    for backward; ``groups`` (default 1; Mesa uses one group per head) divides the head axis. Same
    buffers, ``momentum`` and ``stochastic`` as `MesaGELU`."""

    def __init__(self, groups: int = 1, *, momentum: float = 0.1, stochastic: bool = True):
        super().__init__(groups, momentum, stochastic)

    def forward(self, x):
        y, new_range, new_min = mesa_softmax(x, self.running_range, self.running_min, **self._step(x))
        self._store(new_range, new_min)
        return y


class MesaLayerNorm(_MesaState):
    """``nn.LayerNorm(normalized_shape)`` over the last axis (``weight`` ones, ``bias`` zeros, ``eps``
    1e-5) that keeps only the 8-bit input (plus fp32 mean / rstd per row) for backward. ``groups``
    divides the feature axis; buffers, ``momentum`` and ``stochastic`` as in `MesaGELU`."""

    def __init__(self, normalized_shape: int, groups: int = 1, *, eps: float = 1e-5, momentum: float = 0.1,
                 stochastic: bool = True, device=None, dtype=None):
        super().__init__(groups, momentum, stochastic)
        self.eps = float(eps)
        self.weight = torch.nn.Parameter(torch.ones(int(normalized_shape), device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(int(normalized_shape), device=device, dtype=dtype))

    def forward(self, x):
        y, new_range, new_min = mesa_layernorm(x, self.weight, self.bias, self.running_range, self.running_min,
                                               eps=self.eps, **self._step(x))
        self._store(new_range, new_min)
        return y
