"""Eager PyTorch Mesa (P21): the running-range 8-bit quantisation of saved activations written the way
Mesa's own Python code does it (``torch.autograd.Function`` per layer, group min / max with
``amin``/``amax``, quantise with elementwise ops). Same signatures as the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _grouped(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    dim = dim % x.ndim
    return x.reshape(*x.shape[:dim], groups, x.shape[dim] // groups, *x.shape[dim + 1:]).movedim(dim, 0)


def _state(x, running_range, running_min, groups, dim, momentum, training, first_step):
    if not training:
        return running_range.float().clone(), running_min.float().clone()
    v = _grouped(x.detach().float(), groups, dim).reshape(groups, -1)
    lo, hi = v.amin(dim=1), v.amax(dim=1)
    if first_step:
        return hi - lo, lo
    return ((1 - momentum) * running_range.float() + momentum * (hi - lo),
            (1 - momentum) * running_min.float() + momentum * lo)


def _expand(t, x, groups, dim):
    dim = dim % x.ndim
    per = torch.repeat_interleave(t, x.shape[dim] // groups)
    shape = [1] * x.ndim
    shape[dim] = x.shape[dim]
    return per.reshape(shape)


def _codes(x, new_range, new_min, noise, groups, dim):
    s = 255.0 / new_range.abs().clamp_min(1e-8)
    u = 0.5 if noise is None else noise.float()
    v = (x.detach().float() - _expand(new_min, x, groups, dim)) * _expand(s, x, groups, dim) + (u - 0.5)
    return torch.round(v).clamp(0, 255).to(torch.uint8)


def _restore(q, new_range, new_min, groups, dim):
    s = 255.0 / new_range.abs().clamp_min(1e-8)
    return q.float() / _expand(s, q, groups, dim) + _expand(new_min, q, groups, dim)


def mesa_quantize(x, running_range, running_min, noise=None, *, groups=1, dim=-1, momentum=0.1, training=True,
                  first_step=False):
    new_range, new_min = _state(x, running_range, running_min, groups, dim, momentum, training, first_step)
    return _codes(x, new_range, new_min, noise, groups, dim), new_range, new_min


def mesa_dequantize(q, running_range, running_min, *, groups=1, dim=-1):
    return _restore(q, running_range.float(), running_min.float(), groups, dim).to(running_range.dtype)


class _GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, new_range, new_min, groups):
        ctx.save_for_backward(q, new_range, new_min)
        ctx.groups = groups
        return F.gelu(x)

    @staticmethod
    def backward(ctx, grad):
        q, new_range, new_min = ctx.saved_tensors
        x_hat = _restore(q, new_range, new_min, ctx.groups, -1).requires_grad_(True)
        with torch.enable_grad():
            y = F.gelu(x_hat)
        (dx,) = torch.autograd.grad(y, x_hat, grad.float())
        return dx.to(grad.dtype), None, None, None, None


def mesa_gelu(x, running_range, running_min, noise=None, *, groups=1, momentum=0.1, training=True,
              first_step=False):
    new_range, new_min = _state(x, running_range, running_min, groups, -1, momentum, training, first_step)
    q = _codes(x, new_range, new_min, noise, groups, -1)
    return _GELU.apply(x, q, new_range, new_min, groups), new_range, new_min


def mesa_softmax(x, running_range, running_min, noise=None, *, groups=1, momentum=0.1, training=True,
                 first_step=False):
    y32 = torch.softmax(x.detach().float(), dim=-1)
    new_range, new_min = _state(y32, running_range, running_min, groups, 1, momentum, training, first_step)
    q = _codes(y32, new_range, new_min, noise, groups, 1)
    y = torch.softmax(x.detach(), dim=-1)
    return _SoftmaxGate.apply(x, y, q, new_range, new_min, groups), new_range, new_min


class _SoftmaxGate(torch.autograd.Function):
    """Returns the already computed softmax ``y`` of ``x``; the gradient comes from the saved codes."""

    @staticmethod
    def forward(ctx, x, y, q, new_range, new_min, groups):
        ctx.save_for_backward(q, new_range, new_min)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, grad):
        q, new_range, new_min = ctx.saved_tensors
        y_hat = _restore(q, new_range, new_min, ctx.groups, 1)
        g = grad.float()
        dx = y_hat * (g - (g * y_hat).sum(dim=-1, keepdim=True))
        return dx.to(grad.dtype), None, None, None, None, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, q, new_range, new_min, groups, eps):
        x32 = x.float()
        mean = x32.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x32.var(-1, unbiased=False, keepdim=True) + eps)
        ctx.save_for_backward(q, new_range, new_min, weight, mean, rstd)
        ctx.groups = groups
        return ((x32 - mean) * rstd * weight.float() + bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, new_range, new_min, weight, mean, rstd = ctx.saved_tensors
        n_hat = (_restore(q, new_range, new_min, ctx.groups, -1) - mean) * rstd
        g = grad.float()
        gw = g * weight.float()
        dx = rstd * (gw - gw.mean(-1, keepdim=True) - n_hat * (gw * n_hat).mean(-1, keepdim=True))
        lead = tuple(range(g.ndim - 1))
        return (dx.to(grad.dtype), (g * n_hat).sum(lead).to(weight.dtype), g.sum(lead).to(weight.dtype),
                None, None, None, None, None)


def mesa_layernorm(x, weight, bias, running_range, running_min, noise=None, *, groups=1, eps=1e-5, momentum=0.1,
                   training=True, first_step=False):
    new_range, new_min = _state(x, running_range, running_min, groups, -1, momentum, training, first_step)
    q = _codes(x, new_range, new_min, noise, groups, -1)
    return _LayerNorm.apply(x, weight, bias, q, new_range, new_min, groups, eps), new_range, new_min
