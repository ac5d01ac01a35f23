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

from . import mesa_quant as mq

__all__ = ["mesa_quantize", "mesa_dequantize", "mesa_gelu", "MesaGELU"]

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
    from .. import _runtime as rt

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
    from .. import _runtime as rt

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
    from .. import _runtime as rt

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
