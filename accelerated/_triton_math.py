"""Elementwise Triton functions shared by the kernels: accurate ``expm1`` and ``log1p`` built from
core ops (the interpreter has no libdevice)."""

import triton
import triton.language as tl


@triton.jit
def expm1(x):
    """exp(x) - 1 without cancellation: a degree-9 Taylor polynomial for |x| < 0.5
    (truncation error < 1e-8 relative), ``exp(x) - 1`` elsewhere."""
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    return tl.where(tl.abs(x) < 0.5, p * x, tl.exp(x) - 1.0)


@triton.jit
def log1p(t):
    """log(1 + t) for t > -1 to a few ulps (Goldberg): log(u) * t / (u - 1) with u = 1 + t rounded, which
    cancels the rounding of u (t itself when u rounds to 1)."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))
