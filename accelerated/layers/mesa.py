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

__all__ = ["mesa_quantize", "mesa_dequantize", "mesa_gelu", "mesa_softmax", "MesaGELU", "MesaSoftmax"]

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
